"""The vfio-user server: a :class:`~.device.Device` on a UNIX socket, one client at a time.

``Server(path, device)`` binds ``path`` (a stale socket file there, one nobody listens on,
is replaced; a live server's is ``EADDRINUSE``, anything else ``EEXIST``); :meth:`Server.serve_one` accepts a client and serves it until it goes
(:class:`~.session.Session`), :meth:`Server.serve_forever` does that again and again.  The
socket file is removed on :meth:`Server.close` (also on Ctrl-C through ``with``).

Capabilities offered: ``max_msg_fds``, ``max_data_xfer_size``, ``pgsizes`` (4 KiB),
``max_dma_maps`` (1024 by default, see :data:`MAX_DMA_MAPS`), ``migration`` (``pgsize``, ``max_bitmap_size``) and ``write_multiple``;
``twin_socket`` is not offered, so server-to-client DMA messages share the one socket.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import fail
from . import protocol as p
from .device import Device
from .listening import live
from .session import Session

# DMA regions one client may map at once.  Each fd-backed map rebuilds the container's
# table (O(regions)), so the spec's default of 65535 would let a client spend minutes of
# CPU on maps alone; 1024 maps cost ~2 s, and a VMM without a vIOMMU maps a handful.
MAX_DMA_MAPS = 1024


class Server:
    def __init__(
        self,
        path: str | os.PathLike[str],
        device: Device,
        *,
        max_msg_fds: int = 8,
        max_data_xfer_size: int = p.DEFAULT_MAX_DATA_XFER_SIZE,
        max_dma_maps: int = MAX_DMA_MAPS,
        io_timeout: float = 10.0,
        core: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if not 1 <= max_msg_fds <= p.MAX_MSG_FDS:
            raise fail(errno.EINVAL, f"max_msg_fds {max_msg_fds} not in 1..{p.MAX_MSG_FDS}")
        if not 1024 <= max_data_xfer_size <= p.DEFAULT_MAX_DATA_XFER_SIZE:
            raise fail(errno.EINVAL, f"max_data_xfer_size {max_data_xfer_size:#x} not in 0x400..{p.DEFAULT_MAX_DATA_XFER_SIZE:#x}")
        self.path = Path(path)
        self.device = device
        self.max_msg_fds = max_msg_fds
        self.max_xfer = max_data_xfer_size
        self.max_msg_size = p.HEADER_SIZE + 16 + max_data_xfer_size
        if not 1 <= max_dma_maps <= p.DEFAULT_MAX_DMA_MAPS:
            raise fail(errno.EINVAL, f"max_dma_maps {max_dma_maps} not in 1..{p.DEFAULT_MAX_DMA_MAPS}")
        self.max_dma_maps = max_dma_maps
        self.io_timeout = io_timeout
        self.core = core
        self._log = log
        self.sock: socket.socket | None = None
        self.session: Session | None = None
        self.clients = 0
        self.errors: list[str] = []  # fatal errors of past sessions

    def log(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)

    def capabilities(self) -> dict[str, Any]:
        return {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_xfer,
            "pgsizes": 4096,
            "max_dma_maps": self.max_dma_maps,
            "migration": {"pgsize": 4096, "max_bitmap_size": self.max_xfer},
            "write_multiple": True,
        }

    # -- socket -----------------------------------------------------------------------------
    def listen(self) -> Server:
        """Create the socket file and listen (idempotent)."""
        if self.sock is not None:
            return self
        path = self.path
        if len(os.fsencode(path)) >= 108:
            raise fail(errno.ENAMETOOLONG, f"socket path {str(path)!r} is longer than a UNIX socket allows (107 bytes)")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise fail(errno.EEXIST, f"{path}: exists and is not a socket")
            if live(path):
                raise fail(errno.EADDRINUSE, f"{path}: a server is listening there already")
            os.unlink(path)
        # bind a temporary name and rename it into place once listening: a client that
        # waits for the path to appear (libvfio-user's does) must never find it refusing
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        if len(os.fsencode(tmp)) >= 108:
            tmp = path
        elif os.path.lexists(tmp) and stat.S_ISSOCK(os.lstat(tmp).st_mode):
            os.unlink(tmp)  # left by an earlier process with our pid
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(os.fspath(tmp))
            s.listen(1)
            if tmp != path:
                os.rename(tmp, path)
        except OSError as e:
            s.close()
            if tmp != path:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            raise fail(e.errno or errno.EINVAL, f"{path}: {e.strerror}") from e
        self.sock = s
        return self

    def close(self) -> None:
        """Stop listening and remove the socket file (idempotent)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            try:
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> Server:
        return self.listen()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- serving ----------------------------------------------------------------------------
    def serve_one(self) -> bool:
        """Accept one client and serve it until it disconnects; True if all went well."""
        self.listen()
        assert self.sock is not None
        conn, _ = self.sock.accept()
        self.clients += 1
        self.log(f"client {self.clients} connected")
        return self.serve_connection(conn)

    def serve_connection(self, conn: socket.socket) -> bool:
        """Serve an already connected socket (a socketpair end, say) until it closes."""
        conn.setblocking(True)
        session = self.session = Session(self, conn)
        try:
            ok = session.run()
        finally:
            self.errors.extend(session.errors)
            if self.session is session:
                self.session = None
        return ok

    def serve_forever(self) -> None:
        """One client after another, until interrupted."""
        while True:
            self.serve_one()


def stderr_log(prefix: str = "dmarw serve") -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(f"{prefix}: {msg}", file=sys.stderr, flush=True)

    return log
