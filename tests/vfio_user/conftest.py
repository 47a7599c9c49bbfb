"""Fixtures of the vfio-user suites: the peer build (see peer.py)."""

from peer import peer_build  # noqa: F401
