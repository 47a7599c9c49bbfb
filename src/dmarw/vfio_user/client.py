"""The VMM side of vfio-user: :class:`Client` drives a device server over a UNIX socket.

One socket, two directions.  The client's requests (VERSION, DMA_MAP, region I/O, ...) wait
for their reply, matched by message id, with a timeout on every wait.  The server's
requests (DMA_READ / DMA_WRITE, for memory it was offered without an fd) arrive at any
time and are served from the client's memory by whichever thread is receiving.

Receiving is leader/follower: a caller waiting for its reply takes ``_rx_lock`` and reads
the socket itself (dispatching other callers' replies and serving the server's requests on
the way), so a round trip costs one thread wake-up; while no caller waits, an idle thread
polls the socket and takes the lock only to read what has arrived, so a server's DMA is
answered whether or not a call is in flight.

Locks: ``_send_lock`` orders whole messages on the socket; ``_rx_lock`` is held by the one
thread reading it; ``_lock`` guards the pending-reply table and the DMA map table (held
briefly, never across I/O).  A failed call raises :class:`~dmarw.DmaError` with the
server's errno (or ETIMEDOUT / ECONNRESET / EPROTO) and a message naming the command and
the address range.
"""

from __future__ import annotations

import array
import bisect
import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import DmaError, fail, rng
from ..mm import AddressSpace
from . import protocol as P
from .protocol import Command, MigState

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_DATA_XFER = 1 << 20
DEFAULT_MAX_MSG_FDS = 16
DMA_RW = P.DMA_READ_FLAG | P.DMA_WRITE_FLAG
IDLE_S = 0.01  # quiet time after which the idle thread watches the socket


def _name(cmd: int) -> str:
    try:
        return Command(cmd).name
    except ValueError:
        return f"command {cmd}"


def region_flag_names(flags: int) -> str:
    """``RWMC``-style letters for a region's READ, WRITE, MMAP, CAPS flags."""
    bits = ((P.REGION_FLAG_READ, "R"), (P.REGION_FLAG_WRITE, "W"), (P.REGION_FLAG_MMAP, "M"),
            (P.REGION_FLAG_CAPS, "C"))
    return "".join(n if flags & bit else "-" for bit, n in bits)


@dataclass
class _Mapping:
    """Client memory offered to the server at ``iova`` (hva in ``space``)."""

    iova: int
    size: int
    space: AddressSpace
    hva: int
    prot: int
    with_fd: bool

    @property
    def end(self) -> int:
        return self.iova + self.size


@dataclass
class _Waiter:
    event: threading.Event = field(default_factory=threading.Event)
    msg: P.Message | None = None
    lost: str = ""


class Client:
    """A vfio-user client (the VMM side) connected to one device server.

    ``Client(path)`` connects (retrying while the server is not yet listening, up to
    ``connect_timeout``, default ``timeout``) and negotiates VERSION; every later call waits
    at most ``timeout`` s.
    Messages are built and parsed by :mod:`dmarw.vfio_user.protocol`; this class does the
    socket, the waiting and the serving of the server's DMA requests.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float | None = None,
        max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER,
        max_msg_fds: int = DEFAULT_MAX_MSG_FDS,
        migration_pgsize: int | None = 4096,
        extra_caps: dict[str, Any] | None = None,
        version: tuple[int, int] = (P.VERSION_MAJOR, P.VERSION_MINOR),
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self._sock = self._connect(self.path, timeout if connect_timeout is None else connect_timeout)
        # A send that cannot complete in ``timeout`` (a server that stopped reading: both sides
        # blocked writing) fails instead of hanging; the reader simply waits again.
        self._sock.settimeout(timeout)
        self._send_lock = threading.Lock()
        self._rx_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[int, _Waiter] = {}
        self._active = 0  # callers inside request() (under _lock)
        self._last = time.monotonic()  # when the last of them left
        self._next_id = 0
        self._closed = False
        self._dead: str | None = None
        self._maps: list[_Mapping] = []  # sorted by iova
        self._conn = P.Connection(max_msg_size=max(P.MAX_MSG_SIZE, 64 + max_data_xfer_size))
        #: iova pages the server wrote through DMA_WRITE messages (the client's to track)
        self.message_dirty: set[int] = set()
        self.dirty_pgsize = 4096
        #: server requests served, by command, and refused (with an error reply)
        self.dma_requests = {Command.DMA_READ: 0, Command.DMA_WRITE: 0}
        self.requests_refused = 0
        self.max_data_xfer_size = max_data_xfer_size
        self.max_msg_fds = max_msg_fds
        self.server_version = (0, 0)
        self.server_caps: dict[str, Any] = {}
        self._reader = threading.Thread(target=self._idle_loop, name="vfio-user-client", daemon=True)
        self._reader.start()
        try:
            self._negotiate(version, max_data_xfer_size, max_msg_fds, migration_pgsize, extra_caps)
        except BaseException:
            self.close()
            raise

    # -- connection --------------------------------------------------------------------------
    @staticmethod
    def _connect(path: str, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return s
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if time.monotonic() >= deadline:
                    raise fail(e.errno or errno.ECONNREFUSED,
                               f"vfio-user socket {path}: {e.strerror}") from None
                time.sleep(0.02)
            except OSError as e:
                s.close()
                raise fail(e.errno or errno.EINVAL, f"vfio-user socket {path}: {e.strerror}") from None

    def close(self) -> None:
        """Disconnect (the server sees EOF); pending waiters fail with ECONNRESET."""
        if self._closed:
            return
        self._closed = True
        self._shutdown()
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=self.timeout)
        self._sock.close()
        self._fail_pending("client closed")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return not self._closed and self._dead is None

    def _negotiate(
        self, version: tuple[int, int], xfer: int, fds: int, pgsize: int | None,
        extra: dict[str, Any] | None,
    ) -> None:
        caps: dict[str, Any] = {"max_msg_fds": fds, "max_data_xfer_size": xfer}
        if pgsize is not None:
            caps["migration"] = {"pgsize": pgsize, "max_bitmap_size": 256 << 20}
        caps.update(extra or {})
        reply = self.request(P.Version(version[0], version[1], caps))
        assert isinstance(reply, P.Version)
        if reply.major != version[0] or reply.minor > version[1]:
            raise fail(errno.EPROTO, f"server version {reply.major}.{reply.minor} is not "
                       f"compatible with {version[0]}.{version[1]}")
        self.server_version = (reply.major, reply.minor)
        self.server_caps = reply.capabilities
        self.max_data_xfer_size = min(xfer, reply.capabilities.get("max_data_xfer_size", P.DEFAULT_MAX_DATA_XFER_SIZE))
        self.max_msg_fds = min(fds, reply.capabilities.get("max_msg_fds", P.DEFAULT_MAX_MSG_FDS))
        mig = reply.capabilities.get("migration")
        if isinstance(mig, dict) and isinstance(mig.get("pgsize"), int):
            self.dirty_pgsize = mig["pgsize"]

    # -- messages ----------------------------------------------------------------------------
    def _alloc_id(self) -> int:
        with self._lock:
            for _ in range(1 << 16):
                mid = self._next_id
                self._next_id = (self._next_id + 1) & 0xFFFF
                if mid not in self._pending:
                    return mid
        raise fail(errno.EAGAIN, "no free vfio-user message id")

    def _send(self, data: bytes, fds: Sequence[int], cmd: int) -> None:
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        with self._send_lock:
            if self._closed or self._dead:
                raise fail(errno.ECONNRESET, f"{_name(cmd)}: not connected ({self._dead or 'closed'})")
            try:
                sent = self._sock.sendmsg([data], anc)
                if sent < len(data):  # the rest, without the fds
                    self._sock.sendall(memoryview(data)[sent:])
            except TimeoutError:
                self._dead = f"{_name(cmd)}: the server read nothing for {self.timeout:g} s"
                self._shutdown()  # part of a message may be out: the stream is lost
                raise fail(errno.ETIMEDOUT, self._dead) from None
            except OSError as e:
                raise fail(e.errno or errno.EIO, f"{_name(cmd)}: send failed: {e.strerror}") from None

    def _shutdown(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def request(self, payload: P.Payload, *, what: str = "", timeout: float | None = None) -> P.Payload:
        """Send one request; its decoded reply (``DmaError`` with the server's errno on an
        error reply, ETIMEDOUT after ``timeout``, EPROTO on a malformed reply)."""
        cmd = int(payload.CMD)
        mid = self._alloc_id()
        w = _Waiter()
        with self._lock:
            self._pending[mid] = w
            self._active += 1
        try:
            data, fds = P.encode_request(mid, payload)
            self._send(data, fds, cmd)
            wait = self.timeout if timeout is None else timeout
            if not self._wait(w, time.monotonic() + wait):
                raise fail(errno.ETIMEDOUT, f"{_name(cmd)}{what}: no reply after {wait:g} s")
        finally:
            with self._lock:
                self._pending.pop(mid, None)
                self._active -= 1
                self._last = time.monotonic()
        msg = w.msg
        if msg is None:
            raise fail(errno.ECONNRESET, f"{_name(cmd)}{what}: {w.lost}")
        h = msg.header
        if h.is_error:
            msg.close_fds()
            err = h.error or errno.EIO
            raise DmaError(err, f"{_name(cmd)}{what}: server replied {errno.errorcode.get(err, err)}")
        if h.cmd != cmd:
            msg.close_fds()
            raise fail(errno.EPROTO, f"{_name(cmd)}{what}: reply is for {_name(h.cmd)}")
        try:
            return P.decode_reply(msg)
        except P.ProtocolError as e:
            msg.close_fds()
            raise fail(errno.EPROTO, f"{_name(cmd)}{what}: malformed reply: {e.detail}") from None

    def post(self, payload: P.Payload) -> None:
        """Send a request with NO_REPLY (a posted write): nothing is waited for."""
        data, fds = P.encode_request(self._alloc_id(), payload, no_reply=True)
        self._send(data, fds, int(payload.CMD))

    # -- receiving (leader/follower) ----------------------------------------------------------
    def _fail_pending(self, why: str) -> None:
        if self._dead is None:
            self._dead = why
        with self._lock:
            waiters = list(self._pending.values())
        for w in waiters:
            if not w.event.is_set():
                w.lost = why
                w.event.set()

    def _wait(self, w: _Waiter, deadline: float) -> bool:
        """Until ``w`` has its reply (True) or ``deadline`` (False): read the socket while
        holding ``_rx_lock``, or, while another thread reads, wait for it to hand the reply
        over."""
        while not w.event.is_set():
            if self._dead is not None or self._closed:  # ended after this request went out
                w.lost = w.lost or self._dead or "client closed"
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._rx_lock.acquire(timeout=min(left, 0.005)):
                try:
                    self._pump(w.event, deadline)
                finally:
                    self._rx_lock.release()
        return True

    def _pump(self, done: threading.Event, deadline: float) -> None:
        """Receive and dispatch (``_rx_lock`` held) until ``done``, the deadline or the end."""
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        while not done.is_set() and self._dead is None and not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if poller.poll(min(left, 0.2) * 1000):
                self._receive()

    def _receive(self) -> None:
        """One recvmsg (``_rx_lock`` held), its complete messages dispatched; at the end of
        the connection (EOF, a broken frame, an error) every waiter is failed."""
        why = ""
        try:
            data, anc, _flags, _ = self._sock.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 253))
            fds: list[int] = []
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(cdata[: len(cdata) - len(cdata) % a.itemsize])
                    fds.extend(a)
            self._conn.receive_data(data, fds)
            while (msg := self._conn.next_message()) is not None:
                self._dispatch(msg)
            if not data:
                why = "server closed the connection"
        except TimeoutError:
            return
        except P.ProtocolError as e:
            why = f"server broke the framing: {e.detail}"
        except OSError as e:
            why = f"connection failed: {e.strerror}"
        if why:
            for fd in self._conn.leftover_fds():
                os.close(fd)
            self._fail_pending(why)
            self._shutdown()

    def _idle_loop(self) -> None:
        """Once no call has been in flight for ``IDLE_S``: poll, and read what arrives (the
        server's own requests).  While calls come and go, their callers do the reading and
        this thread stays off the socket (and off the GIL)."""
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        while self._dead is None and not self._closed:
            with self._lock:
                quiet = self._active == 0 and time.monotonic() - self._last >= IDLE_S
            if not quiet:
                time.sleep(IDLE_S)
                continue
            try:
                if not poller.poll(IDLE_S * 1000):
                    continue
            except OSError:
                return
            if self._rx_lock.acquire(blocking=False):
                try:
                    if self._dead is None and not self._closed and poller.poll(0):
                        self._receive()
                finally:
                    self._rx_lock.release()

    def _dispatch(self, msg: P.Message) -> None:
        if msg.header.is_reply:
            with self._lock:
                w = self._pending.get(msg.header.msg_id)
            if w is None or w.event.is_set():
                msg.close_fds()
                return
            w.msg = msg
            w.event.set()
        else:
            self._serve(msg)

    def _find(self, iova: int, n: int) -> _Mapping | None:
        with self._lock:
            maps = self._maps
        i = bisect.bisect_right([m.iova for m in maps], iova) - 1
        if i >= 0 and iova + n <= maps[i].end:
            return maps[i]
        return None

    def _serve(self, msg: P.Message) -> None:
        """Answer one server request: DMA_READ / DMA_WRITE from the client's memory."""
        h = msg.header
        err, reply = 0, b""
        try:
            req = P.decode_request(msg)
        except P.ProtocolError as e:
            err, req = e.errno or errno.EINVAL, None
        msg.close_fds()  # no server request carries fds
        if req is not None and not isinstance(req, P.DmaAccess):
            err = errno.ENOSYS
        elif isinstance(req, P.DmaAccess):
            is_read = h.cmd == Command.DMA_READ
            m = self._find(req.addr, req.count)
            if req.count > self.max_data_xfer_size:
                err = errno.E2BIG
            elif not is_read and len(req.data) != req.count:
                err = errno.EINVAL
            elif m is None:
                err = errno.EFAULT
            elif not m.prot & (P.DMA_READ_FLAG if is_read else P.DMA_WRITE_FLAG):
                err = errno.EPERM
            else:
                try:
                    hva = m.hva + (req.addr - m.iova)
                    if is_read:
                        reply = P.DmaAccess(req.addr, req.count, m.space.read(hva, req.count)).encode()[0]
                    else:
                        m.space.write(hva, req.data)
                        reply = P.DmaAccess(req.addr, req.count).encode()[0]
                        pg = self.dirty_pgsize
                        with self._lock:
                            self.message_dirty.update(range(req.addr // pg, (req.addr + req.count + pg - 1) // pg))
                    self.dma_requests[Command(h.cmd)] += 1
                except OSError as e:
                    err = e.errno or errno.EFAULT
        if err:
            self.requests_refused += 1
        if h.no_reply:
            return
        out = P.error_reply(h.msg_id, h.cmd, err) if err else P.encode_reply(h.msg_id, h.cmd, reply)[0]
        try:
            self._send(out, (), h.cmd)
        except OSError:
            pass

    # -- DMA ---------------------------------------------------------------------------------
    def dma_map(self, iova: int, size: int, space: AddressSpace, hva: int, *,
                with_fd: bool = True, prot: int = DMA_RW) -> None:
        """Offer ``size`` bytes of ``space`` at ``hva`` to the device at ``iova``.

        With ``with_fd`` the mapping's memfd/file goes along (the server maps it and reaches
        the memory directly; file offset = ``hva`` - the mapping's start); without, the
        server must ask by DMA_READ / DMA_WRITE messages, which this client serves.
        """
        if size <= 0 or iova < 0 or iova + size > 1 << 64:
            raise fail(errno.EINVAL, f"DMA_MAP iova {rng(iova, size)}: bad range")
        region, off = space.region(hva, size)
        with self._lock:
            for m in self._maps:
                if iova < m.end and m.iova < iova + size:
                    raise fail(errno.EEXIST, f"DMA_MAP iova {rng(iova, size)} overlaps {rng(m.iova, m.size)}")
        fd = space.fd(hva) if with_fd else None
        self.request(P.DmaMap(prot, off if with_fd else 0, iova, size, fd), what=f" iova {rng(iova, size)}")
        with self._lock:
            self._maps = sorted([*self._maps, _Mapping(iova, size, space, hva, prot, with_fd)],
                                key=lambda m: m.iova)

    def dma_unmap(self, iova: int, size: int) -> None:
        """Withdraw the mappings inside ``[iova, iova+size)`` (the server forgets them first)."""
        self.request(P.DmaUnmap(0, iova, size), what=f" iova {rng(iova, size)}")
        with self._lock:
            self._maps = [m for m in self._maps if not (iova <= m.iova and m.end <= iova + size)]

    def dma_unmap_all(self) -> None:
        self.request(P.DmaUnmap(P.UNMAP_ALL, 0, 0), what=" (all)")
        with self._lock:
            self._maps = []

    def mappings(self) -> list[tuple[int, int, bool]]:
        """``(iova, size, with_fd)`` of each mapping offered, by iova."""
        with self._lock:
            return [(m.iova, m.size, m.with_fd) for m in self._maps]

    def take_message_dirty(self) -> set[int]:
        """The iova page numbers written by DMA_WRITE messages since the last call."""
        with self._lock:
            pages, self.message_dirty = self.message_dirty, set()
        return pages

    # -- device queries ----------------------------------------------------------------------
    def device_info(self) -> P.DeviceInfo:
        r = self.request(P.DeviceInfo())
        assert isinstance(r, P.DeviceInfo)
        return r

    def region_info(self, index: int, *, keep_fd: bool = False) -> P.RegionInfo:
        """Region ``index``: asks with argsz 32, then again with the argsz the reply needs
        (capabilities and the region's fd come with the whole reply).  The fd is closed
        unless ``keep_fd`` (then the caller owns ``.fd``)."""
        r = self.request(P.RegionInfo(index), what=f" {index}")
        assert isinstance(r, P.RegionInfo)
        if r.argsz > 32:
            if r.fd is not None:
                os.close(r.fd)
            if r.argsz > 1 << 16:
                raise fail(errno.EPROTO, f"DEVICE_GET_REGION_INFO {index}: argsz {r.argsz} too large")
            r2 = self.request(P.RegionInfo(index, r.argsz), what=f" {index}")
            assert isinstance(r2, P.RegionInfo)
            r = r2
        if r.fd is not None and not keep_fd:
            os.close(r.fd)
            r.fd = None
        return r

    def irq_info(self, index: int) -> P.IrqInfo:
        r = self.request(P.IrqInfo(index), what=f" {index}")
        assert isinstance(r, P.IrqInfo)
        return r

    def set_irqs(self, index: int, flags: int, start: int = 0, count: int = 0,
                 fds: Sequence[int] = (), data: bytes = b"") -> None:
        """DEVICE_SET_IRQS as the kernel's VFIO_DEVICE_SET_IRQS, eventfds passed as fds."""
        self.request(P.SetIrqs(flags, index, start, count, data, list(fds)),
                     what=f" index {index} [{start}, {start + count})")

    def set_irq_eventfds(self, index: int, fds: Sequence[int], start: int = 0) -> None:
        """Trigger eventfds for vectors ``start..``; no fds disables the index."""
        if fds:
            self.set_irqs(index, P.IRQ_SET_ACTION_TRIGGER | P.IRQ_SET_DATA_EVENTFD, start, len(fds), fds)
        else:
            self.set_irqs(index, P.IRQ_SET_ACTION_TRIGGER | P.IRQ_SET_DATA_NONE, 0, 0)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        what = f" region {index} {rng(offset, count)}"
        if count > self.max_data_xfer_size:
            raise fail(errno.E2BIG, f"REGION_READ{what}: over the transfer limit {self.max_data_xfer_size:#x}")
        r = self.request(P.RegionRead(index, offset, count), what=what)
        assert isinstance(r, P.RegionAccess)
        if r.count != count or len(r.data) != count:
            raise fail(errno.EIO, f"REGION_READ{what}: {r.count} bytes back ({len(r.data)} sent)")
        return r.data

    def region_write(self, index: int, offset: int, data: bytes, *, post: bool = False) -> None:
        """REGION_WRITE; ``post`` sends it NO_REPLY (ordered before any later request)."""
        what = f" region {index} {rng(offset, len(data))}"
        if len(data) > self.max_data_xfer_size:
            raise fail(errno.E2BIG, f"REGION_WRITE{what}: over the transfer limit {self.max_data_xfer_size:#x}")
        req = P.RegionWrite(index, offset, len(data), bytes(data))
        if post:
            self.post(req)
        else:
            self.request(req, what=what)

    def reset(self) -> None:
        self.request(P.Reset())

    def config_read(self, offset: int, count: int) -> bytes:
        return self.region_read(P.CONFIG_REGION, offset, count)

    # -- DEVICE_FEATURE ------------------------------------------------------------------------
    def feature(self, req: P.Feature) -> bytes:
        """DEVICE_FEATURE: the reply's data (after argsz and flags)."""
        r = self.request(req, what=f" {req.feature} (flags {req.flags:#x})")
        assert isinstance(r, P.Feature)
        return r.data

    def probe(self, feature: int, flags: int = P.FEATURE_GET) -> bool:
        """Whether the device supports ``feature`` with ``flags`` (PROBE; False if refused)."""
        try:
            self.feature(P.Feature(P.FEATURE_PROBE | flags | feature))
        except DmaError:
            return False
        return True

    def migration_flags(self) -> int:
        """The device's migration capabilities (STOP_COPY 1, P2P 2, PRE_COPY 4)."""
        r = self.feature(P.Feature(P.FEATURE_GET | P.FEATURE_MIGRATION, b"", 16))
        if len(r) < 8:
            raise fail(errno.EPROTO, f"migration feature reply of {len(r)} data bytes")
        return int(struct.unpack_from("<Q", r)[0])

    def mig_state(self) -> MigState:
        r = self.feature(P.feature_mig_state(0, get=True))
        if len(r) < 8:
            raise fail(errno.EPROTO, f"device state reply of {len(r)} data bytes")
        return MigState(struct.unpack_from("<I", r)[0])

    def set_mig_state(self, state: int) -> None:
        """Move the device to ``state`` (a :class:`MigState`)."""
        self.feature(P.feature_mig_state(state))

    def mig_data_read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the device's state (PRE_COPY / STOP_COPY); b"" at the end."""
        if size > self.max_data_xfer_size:
            raise fail(errno.E2BIG, f"MIG_DATA_READ of {size:#x}: over the transfer limit")
        r = self.request(P.MigDataRead(size, b"", 8 + size), what=f" of {size:#x}")
        assert isinstance(r, P.MigData)
        if r.size > size:
            raise fail(errno.EPROTO, f"MIG_DATA_READ reply claims {r.size} bytes of {size} asked")
        return r.data

    def mig_data_write(self, data: bytes) -> None:
        if len(data) > self.max_data_xfer_size:
            raise fail(errno.E2BIG, f"MIG_DATA_WRITE of {len(data):#x}: over the transfer limit")
        self.request(P.MigDataWrite(len(data), bytes(data)), what=f" of {len(data):#x}")

    def mig_drain(self, chunk: int = 1024, limit: int = 1 << 30) -> bytes:
        """MIG_DATA_READ in ``chunk`` pieces until the device returns none."""
        out = bytearray()
        step = min(chunk, self.max_data_xfer_size)
        while len(out) < limit:
            data = self.mig_data_read(step)
            if not data:
                break
            out += data
        return bytes(out)

    def save_state(self, chunk: int = 1024) -> tuple[bytes, bytes]:
        """From RUNNING: PRE_COPY drained, STOP_COPY drained, STOP.

        Returns ``(pre_copy, stop_copy)``: the stream is both in order; a device whose
        STOP_COPY data is its whole state (libvfio-user's sample) needs only the second.
        """
        self.set_mig_state(MigState.PRE_COPY)
        pre = self.mig_drain(chunk)
        self.set_mig_state(MigState.STOP_COPY)
        stop = self.mig_drain(chunk)
        self.set_mig_state(MigState.STOP)
        return pre, stop

    def load_state(self, state: bytes, chunk: int = 1024, *, run: bool = True) -> None:
        """RESUMING, the state in MIG_DATA_WRITE chunks, STOP, then RUNNING if ``run``."""
        self.set_mig_state(MigState.RESUMING)
        step = min(chunk, self.max_data_xfer_size)
        for off in range(0, len(state), step):
            self.mig_data_write(state[off : off + step])
        self.set_mig_state(MigState.STOP)
        if run:
            self.set_mig_state(MigState.RUNNING)

    # -- DMA logging -------------------------------------------------------------------------
    def dma_logging_start(self, ranges: Iterable[tuple[int, int]] = (), page_size: int = 4096) -> None:
        """Start dirty logging of ``ranges`` (iova, length); none = every mapping."""
        self.feature(P.feature_logging(True, page_size, list(ranges)))

    def dma_logging_stop(self) -> None:
        self.feature(P.feature_logging(False, 0))

    def dma_logging_report(self, iova: int, length: int, page_size: int = 4096) -> set[int]:
        """The dirty iova page numbers in ``[iova, iova+length)`` (cleared on the server)."""
        npages = (length + page_size - 1) // page_size
        room = (npages + 63) // 64 * 8  # the bitmap is an array of u64, as the kernel's
        r = self.feature(P.feature_report(iova, length, page_size))
        bitmap = r[24 : 24 + room]
        if len(bitmap) < room:
            raise fail(errno.EPROTO, f"DMA logging report of iova {rng(iova, length)}: "
                       f"{len(r)} data bytes, the bitmap needs {room} after 24")
        first = iova // page_size
        return {first + i for i in range(npages) if bitmap[i // 8] >> (i % 8) & 1}
