"""vfio-user: serve Python device models to VMMs over a UNIX socket.

:mod:`~dmarw.vfio_user.protocol` is the wire format without I/O; :class:`Device` (with
:class:`Region`, :class:`PciConfig`) is what a device model implements;
:class:`Server` serves one on a socket (:mod:`.session` handles one client, :mod:`.dma`
the client's memory, :mod:`.features` migration and DMA logging).
"""

from __future__ import annotations

from .client import Client
from .device import Device, DmaPort, PciConfig, Region
from .protocol import Command, MigState, ProtocolError
from .server import Server

__all__ = [
    "Client", "Command", "Device", "DmaPort", "MigState", "PciConfig", "ProtocolError", "Region", "Server",
]
