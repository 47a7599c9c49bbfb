"""One client's session: every vfio-user command, decoded, applied to the device, answered.

:class:`Session` owns the client's socket for as long as it is connected.  It is a
poll-based loop in one thread: read what the socket has, frame it
(:class:`~.protocol.Connection`), handle each command in order, reply.  Server-to-client
DMA messages are sent from inside a command or a device timer; while their reply is
awaited, commands that arrive are queued and handled afterwards, in order.

Errors: a :class:`~dmarw.DmaError` from decoding or from the device becomes an error reply
with its errno and the session goes on; a fatal :class:`~.protocol.ProtocolError` (broken
framing), EOF, or a client that stops reading or answering for ``io_timeout`` seconds ends
the session.  On the way out every DMA mapping is unmapped and every eventfd closed; the
device's own state is kept for the next client (the spec's disconnect rule).
"""

from __future__ import annotations

import array
import errno
import itertools
import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import DmaError, fail
from . import protocol as p
from .device import Device, DmaPort
from .dma import ClientMemory

if TYPE_CHECKING:
    from .server import Server

RECV_SIZE = 1 << 18
# plain ints: the socket module's flags are IntFlag members, whose operators run Python code
_CTRUNC = int(socket.MSG_CTRUNC)
_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_DONTWAIT = int(socket.MSG_DONTWAIT)
_ACCESS = p.ACCESS
_REPLY = p.F_TYPE_REPLY
_HDR = p.HEADER
_REGION_WRITE = int(p.Command.REGION_WRITE)
_REGION_READ = int(p.Command.REGION_READ)


class _Handled:
    """What :meth:`Session._next` returns for a message served on the fast path."""


_HANDLED = _Handled()


class Disconnect(Exception):
    """The session is over (``clean``: the client closed the socket between messages)."""

    def __init__(self, clean: bool, why: str) -> None:
        super().__init__(why)
        self.clean = clean


class Session:
    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.device: Device = server.device
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = p.Connection(max_msg_size=server.max_msg_size)
        self.pending: deque[p.Message] = deque()
        self.negotiated = False
        self.client_caps: dict[str, Any] = {}
        self.mem: ClientMemory | None = None
        self._ids = itertools.count(1)
        self._rbuf = bytearray(RECV_SIZE)
        self._rbufs = [self._rbuf]
        self._rview = memoryview(self._rbuf)
        self._anc = socket.CMSG_SPACE(p.MAX_MSG_FDS * 4)
        self.errors: list[str] = []
        self.handled = 0
        self._handlers: dict[int, Callable[[p.Message], tuple[bytes, list[int]]]] = {
            p.Command.VERSION: self._version,
            p.Command.DMA_MAP: self._dma_map,
            p.Command.DMA_UNMAP: self._dma_unmap,
            p.Command.DEVICE_GET_INFO: self._get_info,
            p.Command.DEVICE_GET_REGION_INFO: self._region_info,
            p.Command.DEVICE_GET_REGION_IO_FDS: self._io_fds,
            p.Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            p.Command.DEVICE_SET_IRQS: self._set_irqs,
            p.Command.REGION_READ: self._region_read,
            p.Command.REGION_WRITE: self._region_write,
            p.Command.DEVICE_RESET: self._reset,
            p.Command.REGION_WRITE_MULTI: self._write_multi,
            p.Command.DEVICE_FEATURE: self._feature,
            p.Command.MIG_DATA_READ: self._mig_read,
            p.Command.MIG_DATA_WRITE: self._mig_write,
        }

    def log(self, msg: str) -> None:
        self.server.log(msg)

    # -- socket I/O -------------------------------------------------------------------------
    def _recv(self, timeout: float | None, *, fast: bool = False) -> bool:
        """Wait up to ``timeout`` (None: forever) for data and feed what arrives; False if
        nothing came.  ``fast`` (the serve loop, nothing buffered): a lone REGION_WRITE or
        REGION_READ is served straight from the receive buffer."""
        if timeout is not None and not _poll_in(self.fd, timeout):
            return False
        try:
            n, anc, flags, _ = self.sock.recvmsg_into(self._rbufs, self._anc, _CLOEXEC)
        except ConnectionResetError:
            n, anc, flags = 0, [], 0
        if not anc and not flags:  # the common case: bytes only
            if fast and n >= 32 and self._fast(n):
                return True
            self.conn.receive_data(self._rview[:n].tobytes())
            return True
        fds: list[int] = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(data[: len(data) - len(data) % a.itemsize])
                fds.extend(a)
        if flags & _CTRUNC:
            for fd in fds:
                os.close(fd)
            raise Disconnect(False, "more fds than one message may carry")
        self.conn.receive_data(self._rview[:n].tobytes(), fds)
        return True

    def _fast(self, n: int) -> bool:
        """Serve the receive buffer's ``n`` bytes if they are exactly one well-formed
        REGION_WRITE/REGION_READ (True); anything else takes the general path (False)."""
        buf = self._rbuf
        msg_id, cmd, size, flags, _err = _HDR.unpack_from(buf)
        if size != n or flags & ~p.F_NO_REPLY or (cmd != _REGION_WRITE and cmd != _REGION_READ):
            return False
        offset, index, count = _ACCESS.unpack_from(buf, 16)
        if count > self.server.max_xfer or n != (32 + count if cmd == _REGION_WRITE else 32):
            return False
        region = self.device.region(index)
        if region is None:
            return False
        self.handled += 1
        try:
            if cmd == _REGION_WRITE:
                region.write(offset, self._rview[32:n].tobytes())
                reply = _HDR.pack(msg_id, cmd, 32, _REPLY, 0) + buf[16:32]
            else:
                data = region.read(offset, count)
                reply = _HDR.pack(msg_id, cmd, 32 + count, _REPLY, 0) + buf[16:32] + data
        except DmaError as e:
            self._error(p.Header(msg_id, cmd, size, flags), e)
            return True
        except Disconnect:
            raise
        except Exception as e:  # a bug in the model: EIO, as in the general dispatch
            self._error(p.Header(msg_id, cmd, size, flags), fail(errno.EIO, f"{_cmd_name(cmd)}: the device model raised {e!r}"))
            return True
        if not flags & p.F_NO_REPLY:
            self.send(reply)
        return True

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        """Send one message; a client that has not read it after ``io_timeout`` is dropped."""
        view = memoryview(data)
        try:
            if fds:
                sent = self.sock.sendmsg([view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            else:
                sent = self.sock.send(view, _DONTWAIT)
        except BlockingIOError:
            sent = 0
        except (BrokenPipeError, ConnectionResetError) as e:
            raise Disconnect(False, f"send: {e.strerror}") from e
        deadline = None
        while sent < len(view):
            if deadline is None:
                deadline = time.monotonic() + self.server.io_timeout
            left = deadline - time.monotonic()
            if left <= 0 or not _poll_out(self.fd, left):
                raise Disconnect(False, f"the client has not read a reply for {self.server.io_timeout:g} s")
            try:
                sent += self.sock.send(view[sent:], _DONTWAIT)
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError) as e:
                raise Disconnect(False, f"send: {e.strerror}") from e

    def _next(self, timeout: float | None) -> p.Message | _Handled | None:
        """The next message from the queue or the socket (None: the timeout passed;
        ``_HANDLED``: a message was served on the fast path)."""
        if self.pending:
            return self.pending.popleft()
        try:
            while True:
                msg = self.conn.next_message()
                if msg is not None:
                    return msg
                if self.conn.eof:
                    raise Disconnect(self.conn.buffered == 0, "the client closed the connection")
                idle = self.conn.buffered == 0 and self.negotiated
                before = self.conn.buffered
                if not self._recv(timeout, fast=idle):
                    return None  # the timeout passed
                if idle and self.conn.buffered == before and not self.conn.eof:
                    return _HANDLED  # served on the fast path
        except p.ProtocolError as e:
            self._fatal(e)
            raise AssertionError("unreachable") from e

    def _fatal(self, e: p.ProtocolError) -> None:
        """A broken frame: answer it if its header could be read (a command), then hang up."""
        self.errors.append(str(e))
        self.log(f"fatal: {e}")
        h = e.header
        if h is not None and not h.flags & p.F_TYPE_REPLY:
            try:
                self.send(p.error_reply(h.msg_id, h.cmd, e.errno or errno.EINVAL))
            except Disconnect:
                pass
        raise Disconnect(False, str(e))

    # -- server-to-client calls ---------------------------------------------------------------
    def call(self, cmd: int, body: bytes) -> bytes:
        """Send a command to the client and return its reply's body; commands that arrive in
        the meantime are queued.  ``ENOTCONN`` if the client goes, ``ETIMEDOUT`` if it does
        not answer within ``io_timeout``."""
        msg_id = next(self._ids) & 0xFFFF
        try:
            self.send(p.frame(msg_id, cmd, body))
            deadline = time.monotonic() + self.server.io_timeout
            while True:
                msg = self.conn.next_message()
                if msg is None:
                    if self.conn.eof:
                        raise Disconnect(False, f"the client closed the connection during {p.Command(cmd).name}")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Disconnect(False, f"no reply to {p.Command(cmd).name} in {self.server.io_timeout:g} s")
                    self._recv(left)
                    continue
                if not msg.header.is_reply:
                    self.pending.append(msg)
                    continue
                msg.close_fds()
                if msg.header.msg_id != msg_id or msg.header.cmd != cmd:
                    self.log(f"dropping an unexpected reply (msg {msg.header.msg_id:#x}, cmd {msg.header.cmd})")
                    continue
                if msg.header.is_error:
                    raise fail(msg.header.error or errno.EIO, f"{p.Command(cmd).name}: the client answered with an error")
                return msg.body
        except Disconnect as d:
            self._dead = d
            if self.mem is not None:
                self.mem.gone = True
            raise fail(errno.ENOTCONN, str(d)) from None
        except p.ProtocolError as e:
            self._dead = Disconnect(False, str(e))
            if self.mem is not None:
                self.mem.gone = True
            raise fail(errno.ENOTCONN, str(e)) from None

    # -- the loop -------------------------------------------------------------------------------
    _dead: Disconnect | None = None

    def run(self) -> bool:
        """Serve until the client goes; True if it left cleanly (no fatal error)."""
        dev = self.device
        ticked = False
        try:
            while True:
                if self._dead is not None:
                    raise self._dead
                deadline = dev.deadline() if self.negotiated else None
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                if timeout == 0.0 and not ticked:  # a due timer goes first...
                    ticked = True
                    self._tick()
                    continue
                ticked = False  # ...but one message is served between two ticks
                msg = self._next(timeout)
                if msg is None:
                    ticked = True
                    self._tick()
                    continue
                if isinstance(msg, p.Message):
                    self.handle(msg)
        except Disconnect as d:
            self.log(f"client gone: {d}")
            return d.clean and not self.errors
        finally:
            self.close()

    def _tick(self) -> None:
        """The device's timer; what it raises is logged (the session goes on unless the
        client is gone, which ``run`` sees next)."""
        try:
            self.device.tick()
        except Disconnect:
            raise
        except DmaError as e:
            self.log(f"device timer: {e}")
        except Exception as e:  # a bug in the model must not take the server down
            self.errors.append(f"device timer: {e!r}")
            self.log(f"device timer: {e!r}")

    def handle(self, msg: p.Message) -> None:
        """Handle one message and send its reply (unless no-reply was asked)."""
        h = msg.header
        self.handled += 1
        if h.is_reply:
            msg.close_fds()
            self.log(f"dropping a stray reply (msg {h.msg_id:#x}, cmd {h.cmd})")
            return
        if h.cmd == _REGION_WRITE and not msg.fds and self.negotiated:  # the hot path, buffered
            body = msg.body
            if len(body) >= 16:
                offset, index, count = _ACCESS.unpack_from(body)
                region = self.device.region(index)
                if region is not None and len(body) == 16 + count and count <= self.server.max_xfer:
                    try:
                        region.write(offset, body[16:])
                    except DmaError as e:
                        self._error(h, e)
                        return
                    except Disconnect:
                        raise
                    except Exception as e:  # a bug in the model: EIO, as below
                        self._error(h, fail(errno.EIO, f"REGION_WRITE: the device model raised {e!r}"))
                        return
                    if not h.no_reply:
                        self.send(_HDR.pack(h.msg_id, h.cmd, 32, _REPLY, 0) + body[:16])
                    return
        if not self.negotiated and h.cmd != p.Command.VERSION:
            msg.close_fds()
            self._error(h, fail(errno.EINVAL, f"{_cmd_name(h.cmd)} before VERSION"))
            raise Disconnect(False, "the first message was not VERSION")
        handler = self._handlers.get(h.cmd)
        try:
            if handler is None:
                err = errno.EINVAL if h.cmd in p.COMMANDS else errno.ENOSYS
                raise p.perr(err, f"msg {h.msg_id:#x}: {_cmd_name(h.cmd)} is not a client command")
            body, fds = handler(msg)
        except p.ProtocolError as e:
            msg.close_fds()
            self._error(h, e)
            if e.fatal:
                raise Disconnect(False, str(e)) from None
            return
        except DmaError as e:
            msg.close_fds()
            self._error(h, e)
            return
        except Disconnect:
            msg.close_fds()
            raise
        except Exception as e:  # a bug in the device model: the client gets EIO, we go on
            msg.close_fds()
            self._error(h, fail(errno.EIO, f"{_cmd_name(h.cmd)}: the device model raised {e!r}"))
            return
        if not h.no_reply:
            self.send(p.frame(h.msg_id, h.cmd, body, flags=_REPLY), fds)

    def _error(self, h: p.Header, e: DmaError) -> None:
        if isinstance(e, p.ProtocolError) and e.fatal:
            self.errors.append(str(e))
        self.log(f"{_cmd_name(h.cmd)} (msg {h.msg_id:#x}): {e}")
        if not h.no_reply:
            self.send(p.error_reply(h.msg_id, h.cmd, e.errno or errno.EINVAL))

    def close(self) -> None:
        while self.pending:
            self.pending.popleft().close_fds()
        for fd in self.conn.leftover_fds():
            os.close(fd)
        if self.mem is not None:
            self.mem.close()
        self.device.irqs.close()
        was_connected = self.negotiated
        self.device.dma = DmaPort()
        if was_connected:
            try:
                self.device.disconnected()
            except Exception as e:  # noqa: BLE001 - the next client must still be served
                self.log(f"device disconnected hook: {e!r}")
        try:
            self.sock.close()
        except OSError:
            pass

    # -- handlers: each returns (reply body, fds) or raises -------------------------------------
    def _version(self, msg: p.Message) -> tuple[bytes, list[int]]:
        if self.negotiated:
            raise fail(errno.EINVAL, "VERSION: already negotiated")
        client = p.Version.decode(msg.body, msg.fds)
        reply, session = p.negotiate(client, self.server.capabilities())
        self.client_caps = session
        max_xfer = min(session["client_max_data_xfer_size"], p.DEFAULT_MAX_DATA_XFER_SIZE)
        self.mem = ClientMemory(self.call, max_xfer=max_xfer, max_maps=self.server.max_dma_maps, core_name=self.server.core)
        self.device.dma = self.mem
        self.negotiated = True
        self.device.connected()
        return reply.encode()

    def _dma_map(self, msg: p.Message) -> tuple[bytes, list[int]]:
        req = p.DmaMap.decode(msg.body, msg.fds)
        assert self.mem is not None
        try:
            self.mem.map(req)
        finally:
            msg.close_fds()  # mapped (or refused): the fd itself is not needed any more
        return b"", []

    def _dma_unmap(self, msg: p.Message) -> tuple[bytes, list[int]]:
        req = p.DmaUnmap.decode(msg.body, msg.fds)
        assert self.mem is not None
        if req.flags & p.UNMAP_ALL:
            self.mem.unmap_all()
            return p.DmaUnmap(req.flags, 0, 0, req.argsz).encode()[0], []
        want = bool(req.flags & p.UNMAP_GET_DIRTY_BITMAP)
        if want:
            need = bitmap_size(req.size, req.pgsize)
            if req.bitmap_size < need:
                raise fail(errno.EINVAL, f"DMA_UNMAP {req.addr:#x}+{req.size:#x}: bitmap of {req.bitmap_size} bytes, {need} needed")
        bm = self.mem.unmap(req.addr, req.size, want_bitmap=want, pgsize=req.pgsize or 4096)
        out = p.DmaUnmap(req.flags, req.addr, req.size, req.argsz, req.pgsize, req.bitmap_size, bm.ljust(req.bitmap_size, b"\0") if want else b"")
        return out.encode()[0], []

    def _get_info(self, msg: p.Message) -> tuple[bytes, list[int]]:
        req = p.DeviceInfo.decode(msg.body, msg.fds)
        if req.argsz < 16:
            raise fail(errno.EINVAL, f"DEVICE_GET_INFO: argsz {req.argsz} is smaller than 16")
        dev = self.device
        return p.DeviceInfo(16, p.DEVICE_FLAGS_PCI | p.DEVICE_FLAGS_RESET, dev.num_regions, p.PCI_NUM_IRQS).encode()

    def _region_info(self, msg: p.Message) -> tuple[bytes, list[int]]:
        req = p.RegionInfo.decode(msg.body, msg.fds)
        dev = self.device
        if req.index >= dev.num_regions:
            raise fail(errno.EINVAL, f"GET_REGION_INFO: region {req.index} of {dev.num_regions}")
        r = dev.region(req.index)
        if r is None:
            return p.RegionInfo(req.index).encode_reply(req.argsz)
        info = p.RegionInfo(req.index, flags=r.flags, size=r.size, offset=0)
        if r.areas:
            info.sparse = [p.SparseArea(a.offset, a.size) for a in r.areas]
            info.fd = r.fd
        return info.encode_reply(req.argsz)

    def _io_fds(self, msg: p.Message) -> tuple[bytes, list[int]]:
        req = p.IoFdsRequest.decode(msg.body, msg.fds)
        if req.index >= self.device.num_regions or self.device.region(req.index) is None:
            raise fail(errno.EINVAL, f"GET_REGION_IO_FDS: no region {req.index}")
        return p.IoFdsReply(req.index).encode_reply(req.argsz)

    def _irq_info(self, msg: p.Message) -> tuple[bytes, list[int]]:
        req = p.IrqInfo.decode(msg.body, msg.fds)
        if req.index >= p.PCI_NUM_IRQS:
            raise fail(errno.EINVAL, f"GET_IRQ_INFO: irq index {req.index} of {p.PCI_NUM_IRQS}")
        irqs = self.device.irqs
        return p.IrqInfo(req.index, 16, irqs.info_flags(req.index), irqs.counts[req.index]).encode()

    def _set_irqs(self, msg: p.Message) -> tuple[bytes, list[int]]:
        req = p.SetIrqs.decode(msg.body, msg.fds)
        irqs = self.device.irqs
        what = f"SET_IRQS {req.index}[{req.start}:+{req.count}]"
        if req.index >= p.PCI_NUM_IRQS:
            raise fail(errno.EINVAL, f"{what}: no such irq index")
        n = irqs.counts[req.index]
        kind, action = req.data_kind, req.action
        if req.count == 0:
            if kind == p.IRQ_SET_DATA_NONE and action == p.IRQ_SET_ACTION_TRIGGER and req.start == 0:
                for sub in range(n):  # disable the whole index
                    irqs.set_fd(req.index, sub, None)
                return b"", []
            raise fail(errno.EINVAL, f"{what}: count 0 only disables an index (DATA_NONE|TRIGGER)")
        if req.start + req.count > n:
            raise fail(errno.EINVAL, f"{what}: the index has {n} interrupts")
        subs = range(req.start, req.start + req.count)
        if kind == p.IRQ_SET_DATA_EVENTFD:
            if action != p.IRQ_SET_ACTION_TRIGGER:
                raise fail(errno.EINVAL, f"{what}: eventfds are taken for TRIGGER only")
            fds = list(req.fds)
            msg.fds = []  # the eventfds are the device's now
            for i, sub in enumerate(subs):
                irqs.set_fd(req.index, sub, fds[i] if fds else None)
            return b"", []
        chosen = [sub for i, sub in enumerate(subs) if kind == p.IRQ_SET_DATA_NONE or req.data[i]]
        if action == p.IRQ_SET_ACTION_TRIGGER:
            for sub in chosen:
                irqs.trigger(req.index, sub)
        else:
            if req.index != p.INTX:
                raise fail(errno.EINVAL, f"{what}: only INTx is maskable")
            for sub in chosen:
                irqs.set_mask(req.index, sub, action == p.IRQ_SET_ACTION_MASK)
        return b"", []

    def _region_read(self, msg: p.Message) -> tuple[bytes, list[int]]:
        req = p.RegionRead.decode(msg.body, msg.fds)
        r = self._region(req.region, req.offset, req.count)
        return msg.body[:16] + r.read(req.offset, req.count), []

    def _region_write(self, msg: p.Message) -> tuple[bytes, list[int]]:
        req = p.RegionWrite.decode(msg.body, msg.fds)
        r = self._region(req.region, req.offset, req.count)
        r.write(req.offset, req.data)
        return msg.body[:16], []

    def _region(self, index: int, offset: int, count: int) -> Any:
        r = self.device.region(index)
        if r is None:
            raise fail(errno.EINVAL, f"region {index:#x} does not exist")
        if count > self.server.max_xfer:
            raise fail(errno.EINVAL, f"region {index} access of {count:#x} bytes exceeds max_data_xfer_size {self.server.max_xfer:#x}")
        return r

    def _reset(self, msg: p.Message) -> tuple[bytes, list[int]]:
        p.Reset.decode(msg.body, msg.fds)
        self.device.reset()
        self.device.migration.reset()
        return b"", []

    def _write_multi(self, msg: p.Message) -> tuple[bytes, list[int]]:
        req = p.WriteMulti.decode(msg.body, msg.fds)
        for index, offset, data in req.writes:
            self._region(index, offset, len(data)).write(offset, data)
        return p.WriteMultiDone(len(req.writes)).encode()

    def _feature(self, msg: p.Message) -> tuple[bytes, list[int]]:
        from .features import handle_feature

        return handle_feature(self, p.Feature.decode(msg.body, msg.fds), msg.body)

    def _mig_read(self, msg: p.Message) -> tuple[bytes, list[int]]:
        req = p.MigDataRead.decode(msg.body, msg.fds)
        state = self.device.migration.state
        if state not in (p.MigState.PRE_COPY, p.MigState.STOP_COPY, p.MigState.PRE_COPY_P2P):
            raise fail(errno.EINVAL, f"MIG_DATA_READ in state {state.name}")
        if req.size > self.server.max_xfer:
            raise fail(errno.EINVAL, f"MIG_DATA_READ of {req.size:#x} bytes exceeds max_data_xfer_size {self.server.max_xfer:#x}")
        data = self.device.migration_read(req.size)
        if len(data) > req.size:
            raise fail(errno.EIO, f"MIG_DATA_READ: the device returned {len(data)} of {req.size} bytes")
        # the reply is padded to the size asked: ``size`` says how much is data (libvfio-user's
        # sample client reads exactly argsz bytes and gives up on a shorter reply)
        return struct.pack("<II", 8 + req.size, len(data)) + data + bytes(req.size - len(data)), []

    def _mig_write(self, msg: p.Message) -> tuple[bytes, list[int]]:
        req = p.MigDataWrite.decode(msg.body, msg.fds)
        state = self.device.migration.state
        if state != p.MigState.RESUMING:
            raise fail(errno.EINVAL, f"MIG_DATA_WRITE in state {state.name}")
        if req.size > self.server.max_xfer:
            raise fail(errno.EINVAL, f"MIG_DATA_WRITE of {req.size:#x} bytes exceeds max_data_xfer_size {self.server.max_xfer:#x}")
        self.device.migration_write(req.data)
        return b"", []


def bitmap_size(size: int, pgsize: int) -> int:
    if pgsize <= 0:
        return 0
    return (-(-size // pgsize) + 63) // 64 * 8


def _cmd_name(cmd: int) -> str:
    try:
        return p.Command(cmd).name
    except ValueError:
        return f"command {cmd}"


def _poll_in(fd: int, timeout: float) -> bool:
    po = select.poll()
    po.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(po.poll(max(0, int(timeout * 1000 + 0.999))))


def _poll_out(fd: int, timeout: float) -> bool:
    po = select.poll()
    po.register(fd, select.POLLOUT | select.POLLHUP | select.POLLERR)
    return bool(po.poll(max(0, int(timeout * 1000 + 0.999))))
