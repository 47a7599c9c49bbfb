"""The throughput baseline: a plain copy of the same guest RAM over the same kind of socket.

A plain copy is what a migration would cost with nothing but the bytes: no framing, no
check, no dirty log.  The sender writes straight from the RAM mapping, either the plain way
(``write``: ``sendmsg`` of the mapping, 1 MiB a call, the kernel copies) or the way the
migration sends its pages (``sendfile`` from the RAM's memfd: the socket takes references,
no copy); the receiver reads straight into RAM of its own (a memfd, prefaulted as the
destination's is), and both sockets get the same buffer sizes as the migration's
(:func:`.channel.tune`).

:class:`PlainCopier` forks its receiver once, before the caller starts any thread, and
then times as many copies as asked (before the guest starts, while it runs, either API),
so the migration is compared with each in one run.  One thread drives a copier; no locks.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from dataclasses import dataclass

from ..errors import DmaError
from ..mm import AddressSpace
from . import dest
from .channel import fork_peer


@dataclass
class PlainCopy:
    bytes: int
    seconds: float
    api: str = "write"  # how the sender wrote: "write" (sendmsg of the mapping) or "sendfile"
    when: str = "before the guest started"
    sender_cpu: float = 0.0  # CPU seconds of the sending thread during the copy
    receiver_cpu: float = 0.0  # CPU seconds of the receiving process during the copy
    runs: int = 1  # copies timed; this is the median one (by time)
    fastest: float = 0.0  # seconds of the fastest and the slowest of them
    slowest: float = 0.0

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds else 0.0


def _receiver(sock: socket.socket, size: int) -> None:
    """The receiving process: for each ``C`` read ``size`` bytes into RAM, answer ``K``
    and the CPU seconds the copy took."""
    space = AddressSpace()
    hva = space.mmap(size, backing="memfd")
    dest.prefault(space, hva, size)  # prepared like the destination's RAM, before timing
    region, off = space.region(hva, size)
    try:
        sock.sendall(b"R")
        with memoryview(region.map) as mv:
            while sock.recv(1) == b"C":
                c0 = time.process_time()
                got = 0
                while got < size:
                    n = sock.recv_into(mv[off + got : off + min(size, got + dest.RECV_CHUNK)], 0, socket.MSG_WAITALL)
                    if n == 0:
                        break
                    got += n
                sock.sendall((b"K" if got == size else b"E") + struct.pack("<d", time.process_time() - c0))
                if got != size:
                    break
    except OSError:  # the sender went away (interrupted): nothing to report to
        raise SystemExit(1) from None
    sock.close()
    raise SystemExit(0)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair over TCP on 127.0.0.1 (the kind of socket a remote migration uses)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname()[:2])
        b, _ = srv.accept()
    return a, b


class PlainCopier:
    """A forked receiver of ``size`` bytes at a time (fork before any thread starts)."""

    def __init__(self, size: int, tcp: bool = False) -> None:
        self.size = size
        self.proc, ours = fork_peer(_receiver, size, name="dmarw-plain-copy", pair=_tcp_pair() if tcp else None)
        self.sock = ours
        try:
            if ours.recv(1) != b"R":
                raise DmaError(errno.EPIPE, f"plain copy of {size:#x} bytes: receiver did not start")
        except BaseException:
            self.close()
            raise

    def copy(
        self, space: AddressSpace, hva: int, when: str, api: str = "write", chunk: int = 1 << 20, runs: int = 1
    ) -> PlainCopy:
        """Time ``runs`` copies of ``[hva, hva+size)`` by ``api``: ``"write"`` (``sendmsg`` of
        the mapping, ``chunk`` bytes a call) or ``"sendfile"`` (the RAM must be a memfd); the
        median one (by time), with the fastest and slowest times (a shared machine moves
        any one copy's time)."""
        region, _off = space.region(hva, self.size)
        if api not in ("write", "sendfile") or (api == "sendfile" and region.fd is None):
            raise DmaError(errno.EINVAL, f"plain copy by {api!r}: 'write', or 'sendfile' from a memfd")
        if not 1 <= runs <= 15:
            raise DmaError(errno.EINVAL, f"plain copy runs {runs}: 1..15")
        done = sorted((self._copy_once(space, hva, when, api, chunk) for _ in range(runs)), key=lambda p: p.seconds)
        mid = done[len(done) // 2]
        mid.runs, mid.fastest, mid.slowest = runs, done[0].seconds, done[-1].seconds
        return mid

    def _copy_once(self, space: AddressSpace, hva: int, when: str, api: str, chunk: int) -> PlainCopy:
        from .source import send_file

        size = self.size
        region, off = space.region(hva, size)
        sock = self.sock
        sock.sendall(b"C")
        t0 = time.perf_counter()
        c0 = time.thread_time()
        if api == "sendfile":
            assert region.fd is not None
            send_file(sock, region.fd, off, size)
        else:
            with memoryview(region.map) as mv:
                for at in range(off, off + size, chunk):
                    sock.sendall(mv[at : min(off + size, at + chunk)])
        ack = sock.recv(9, socket.MSG_WAITALL)
        t1 = time.perf_counter()
        c1 = time.thread_time()
        if ack[:1] != b"K" or len(ack) != 9:
            raise DmaError(errno.EPIPE, f"plain copy of {size:#x} bytes: receiver failed")
        return PlainCopy(size, t1 - t0, api, when, c1 - c0, struct.unpack("<d", ack[1:])[0])

    def close(self) -> None:
        try:
            self.sock.sendall(b"Q")
        except OSError:
            pass
        self.sock.close()
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def plain_copy(space: AddressSpace, hva: int, size: int, tcp: bool = False) -> PlainCopy:
    """One plain copy (``write``) of ``size`` bytes of RAM to a forked receiver's RAM."""
    c = PlainCopier(size, tcp)
    try:
        return c.copy(space, hva, "before the writers started")
    finally:
        c.close()
