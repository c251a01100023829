"""Pinion: a sidecarless service mesh for small k3s clusters."""

__version__ = "0.1.0"
