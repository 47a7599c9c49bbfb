"""vfio-user: serve Python device models to VMMs over a UNIX socket.

:mod:`~dmarw.vfio_user.protocol` is the wire format without I/O; the server and the
:class:`Device` API for device models build on it.
"""

from __future__ import annotations

from .client import Client
from .protocol import Command, MigState, ProtocolError

__all__ = ["Client", "Command", "MigState", "ProtocolError"]
