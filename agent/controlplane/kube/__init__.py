"""Kubernetes access for the agent and the issuer: a small stdlib client and list/watch reflectors."""

from __future__ import annotations

from agent.controlplane.kube.client import ApiError, Gone, KubeClient, KubeConfig, KubeConfigError

__all__ = ["ApiError", "Gone", "KubeClient", "KubeConfig", "KubeConfigError"]
