"""Multicluster, as Linkerd multicluster: the gateway program, the mirror controller that
keeps a linked cluster's exported Services in step here, and the link's manifests."""
