"""A GPU-like device in the GVT-g style: a register file, a command ring in guest memory,
and an engine that reads and writes guest memory by address, then writes a fence.

Three layers, each with one job:

* :class:`GpuRegs` — the register file (plain values, packable for save/restore);
* :class:`GpuDevice` — the device: register semantics (:meth:`GpuDevice.reg_read` /
  :meth:`GpuDevice.reg_write`), the engine, save/restore; it reaches guest memory only
  through one callable ``dma_rw(addr, buf, write)`` (a :data:`DmaRw`);
* the transports: ``mmio_read``/``mmio_write`` (what ``KvmVm.add_mmio`` calls), and any
  other (vfio-user's region access) calling ``reg_read``/``reg_write``.

Register map (32-bit registers at these offsets of the MMIO window)::

    0x00 ID (ro, "DGPU")     0x04 VERSION (ro)      0x08/0x0c RING_BASE lo/hi
    0x10 RING_SIZE (entries) 0x14 RING_HEAD (ro)    0x18 RING_TAIL (the doorbell)
    0x1c STATUS (ro: 1 busy, 2 error)               0x20 FENCE (ro: last seqno done)
    0x24/0x28 HWSP lo/hi (where FENCE commands write) 0x2c WAIT (write: hold until FENCE
    >= value, the device pauses or the waiters are released)  0x30 CTRL (1 enable,
    2 reset)  0x34 ERROR (ro: first error's code)   0x38 COMMANDS (ro: commands done)

A ring entry is 32 bytes: ``op u32, size u32, addr u64, seqno u32, kind u32, 8 reserved``;
``op`` 1 read ``size`` bytes at ``addr`` (folded into the engine's state), 2 write
``size`` bytes derived from that state, 3 fence (write ``seqno`` as 4 bytes at ``addr``,
then FENCE = seqno).  ``kind`` names the access class for statistics (:data:`KINDS`).
The engine fetches ring entries through ``dma_rw`` too (one read per doorbell span).

Locking: ``_cond`` (one condition) guards the registers, the engine's position and the
pause/stop flags; the engine runs commands with it released, taking it between commands to
publish the head and the fence.  Threaded mode: a doorbell wakes the engine thread, so the
device's DMA overlaps the vCPU; inline mode runs the ring in the doorbell's caller.
"""

from __future__ import annotations

import errno
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from ..errors import DmaError, fail

DmaRw = Callable[[int, memoryview, bool], None]

DEVICE_ID = 0x55504744  # "DGPU"
DEVICE_VERSION = 1
PAGE = 4096
CMD = struct.Struct("<IIQIIQ")
RING_MAX = 4096  # entries

REG_ID, REG_VERSION, REG_RING_BASE_LO, REG_RING_BASE_HI = 0x00, 0x04, 0x08, 0x0C
REG_RING_SIZE, REG_RING_HEAD, REG_RING_TAIL, REG_STATUS = 0x10, 0x14, 0x18, 0x1C
REG_FENCE, REG_HWSP_LO, REG_HWSP_HI, REG_WAIT = 0x20, 0x24, 0x28, 0x2C
REG_CTRL, REG_ERROR, REG_COMMANDS = 0x30, 0x34, 0x38
MMIO_SIZE = 0x1000

STATUS_BUSY, STATUS_ERROR = 1, 2
CTRL_ENABLE, CTRL_RESET = 1, 2
OP_READ, OP_WRITE, OP_FENCE = 1, 2, 3
ERR_NONE, ERR_OP, ERR_SIZE, ERR_DMA, ERR_RING = 0, 1, 2, 3, 4

KINDS = ("page-read", "gtt-pte-read", "ring-cmd-read", "batch-read",
         "status-dword", "gtt-pte-write", "descriptor", "context-state")
WAIT_SLICE_S = 0.05  # a held WAIT store re-checks its release conditions this often

SAVE_MAGIC = 0x53475044  # "DPGS"
SAVE_VERSION = 1


@dataclass
class GpuRegs:
    """The register file: every value the device's behaviour depends on, besides
    :attr:`GpuDevice.state` (the engine's running CRC)."""

    ring_base: int = 0
    ring_size: int = 0
    head: int = 0
    tail: int = 0
    status: int = 0
    fence: int = 0
    hwsp: int = 0
    ctrl: int = 0
    error: int = 0
    commands: int = 0

    _FMT = struct.Struct("<QIIIIIQIIQ")

    def pack(self) -> bytes:
        return self._FMT.pack(*(getattr(self, f.name) for f in fields(self)))

    @classmethod
    def unpack(cls, data: bytes) -> GpuRegs:
        return cls(*cls._FMT.unpack(data))


@dataclass
class GpuStats:
    """What the engine did and what it cost (``time.perf_counter_ns``, host side)."""

    commands: int = 0
    fences: int = 0
    doorbells: int = 0
    fetches: int = 0
    fetch_ns: int = 0
    command_ns: int = 0  # sum over read/write commands: decode + dma_rw + state update
    reads: int = 0
    read_ns: int = 0  # the dma_rw calls alone
    writes: int = 0
    write_ns: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    by_kind: dict[str, list[int]] = field(default_factory=dict)  # kind -> [count, ns]

    def per_command_ns(self) -> float:
        return self.command_ns / self.commands if self.commands else float("nan")

    def as_dict(self) -> dict[str, object]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "by_kind"}
        d["by_kind"] = {k: {"count": c, "ns": n} for k, (c, n) in self.by_kind.items()}
        d["per_command_ns"] = self.per_command_ns()
        return d


class GpuDevice:
    """The device; ``dma_rw`` is its only way to guest memory.

    ``threaded``: run the engine in its own thread (:meth:`start`), woken by the doorbell.
    ``record``: keep every access's ``(write, addr, size)`` in :attr:`accesses`, in order.
    ``drop_write``: fault injection for tests — the n-th write command (0-based) is not
    performed; ``bypass``: a ``write(addr, data)`` callable the engine uses instead of
    ``dma_rw`` for writes (a device that bypasses the tracked path).
    """

    def __init__(
        self,
        dma_rw: DmaRw,
        *,
        threaded: bool = False,
        record: bool = False,
        drop_write: int | None = None,
        bypass: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self.dma_rw = dma_rw
        self.regs = GpuRegs()
        self.state = 0  # the engine's running CRC32 over everything it read and wrote
        self.stats = GpuStats()
        self.threaded = threaded
        self.record = record
        self.accesses: list[tuple[bool, int, int]] = []
        self.last_error = ""
        self._drop_write = drop_write
        self._bypass = bypass
        self._nwrites = 0
        self._stop_at: int | None = None
        self._on_stop: Callable[[], None] | None = None
        self._cond = threading.Condition()
        self._busy = False
        self._paused = False
        self._stopping = False
        self._release = 0  # bumped to release held WAIT stores
        self._thread: threading.Thread | None = None
        self._buf = bytearray(PAGE)
        self._mv = memoryview(self._buf)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (threaded mode; idempotent)."""
        if not self.threaded or self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._engine, name="dgpu-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the engine thread after the command it is running; release WAIT holders."""
        with self._cond:
            self._stopping = True
            self._release += 1
            self._cond.notify_all()
        t, self._thread = self._thread, None
        if t is not None:
            t.join()

    def pause(self) -> None:
        """Stop at the next command boundary and wait until the engine is idle; held WAIT
        stores return.  The device state is then stable for :meth:`save`."""
        with self._cond:
            self._paused = True
            self._release += 1
            self._cond.notify_all()
            while self._busy:
                self._cond.wait()

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()
        if not self.threaded:
            self._drain()

    def stop_at(self, commands: int, on_stop: Callable[[], None] | None = None) -> None:
        """Pause at the boundary after the ``commands``-th command (counted by the COMMANDS
        register) and then call ``on_stop()`` from the engine, outside the device lock
        (e.g. a vCPU kick: a run stopped mid-way for save/restore or migration)."""
        with self._cond:
            self._stop_at = commands
            self._on_stop = on_stop

    def release_waiters(self) -> None:
        """Make held WAIT stores return now (before a vCPU kick: the guest re-polls)."""
        with self._cond:
            self._release += 1
            self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            r = self.regs
            return not self._busy and (r.head == r.tail or bool(r.status & STATUS_ERROR))

    # -- save / restore ------------------------------------------------------------------
    _HDR = struct.Struct("<IIII")

    def save(self) -> bytes:
        """The device state: registers and the engine's CRC (pending commands are the ring
        span head..tail, in guest memory).  Pause first when threaded (``EBUSY`` if busy)."""
        with self._cond:
            if self._busy:
                raise fail(errno.EBUSY, "gpu save: the engine is running a command; pause() first")
            body = self.regs.pack()
            return self._HDR.pack(SAVE_MAGIC, SAVE_VERSION, len(body), self.state) + body

    def restore(self, data: bytes) -> None:
        """Load :meth:`save`'s bytes (``EINVAL`` naming what is wrong; nothing changes then).
        Pending commands run when the device resumes (or at once, inline and unpaused)."""
        n = self._HDR.size + GpuRegs._FMT.size
        if len(data) != n:
            raise fail(errno.EINVAL, f"gpu restore: {len(data):#x} bytes, want {n:#x}")
        magic, version, blen, st = self._HDR.unpack_from(data)
        if magic != SAVE_MAGIC or version != SAVE_VERSION or blen != GpuRegs._FMT.size:
            raise fail(errno.EINVAL, f"gpu restore: magic {magic:#x} version {version} "
                       f"length {blen:#x}, want {SAVE_MAGIC:#x} {SAVE_VERSION} {GpuRegs._FMT.size:#x}")
        regs = GpuRegs.unpack(data[self._HDR.size:])
        if regs.ring_size > RING_MAX or (regs.ring_size and (regs.head >= regs.ring_size
                                                             or regs.tail >= regs.ring_size)):
            raise fail(errno.EINVAL, f"gpu restore: ring size {regs.ring_size} head {regs.head} "
                       f"tail {regs.tail} out of range")
        with self._cond:
            if self._busy:
                raise fail(errno.EBUSY, "gpu restore: the engine is running a command; pause() first")
            regs.status &= ~STATUS_BUSY
            self.regs = regs
            self.state = st
            self._cond.notify_all()
        if not self.threaded and not self._paused:
            self._drain()

    # -- transports ----------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        v = self.reg_read(offset & ~3)
        return (v >> ((offset & 3) * 8)) & ((1 << (8 * size)) - 1) if size < 4 else v

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if size != 4 or offset & 3:
            return  # the registers are 32-bit: narrower stores are ignored, as on hardware
        self.reg_write(offset, value)

    # -- register semantics --------------------------------------------------------------
    def reg_read(self, offset: int) -> int:
        with self._cond:
            r = self.regs
            return {
                REG_ID: DEVICE_ID, REG_VERSION: DEVICE_VERSION,
                REG_RING_BASE_LO: r.ring_base & 0xFFFFFFFF, REG_RING_BASE_HI: r.ring_base >> 32,
                REG_RING_SIZE: r.ring_size, REG_RING_HEAD: r.head, REG_RING_TAIL: r.tail,
                REG_STATUS: r.status | (STATUS_BUSY if self._busy else 0), REG_FENCE: r.fence,
                REG_HWSP_LO: r.hwsp & 0xFFFFFFFF, REG_HWSP_HI: r.hwsp >> 32,
                REG_CTRL: r.ctrl, REG_ERROR: r.error, REG_COMMANDS: r.commands & 0xFFFFFFFF,
            }.get(offset, 0)

    def reg_write(self, offset: int, value: int) -> None:
        value &= 0xFFFFFFFF
        if offset == REG_WAIT:
            self._wait(value)
            return
        run = False
        with self._cond:
            r = self.regs
            if offset == REG_RING_BASE_LO:
                r.ring_base = (r.ring_base & ~0xFFFFFFFF) | value
            elif offset == REG_RING_BASE_HI:
                r.ring_base = (r.ring_base & 0xFFFFFFFF) | value << 32
            elif offset == REG_RING_SIZE:
                if not 1 <= value <= RING_MAX:
                    self._error(ERR_RING, f"ring size {value} not in 1..{RING_MAX}")
                else:
                    r.ring_size, r.head, r.tail = value, 0, 0
            elif offset == REG_HWSP_LO:
                r.hwsp = (r.hwsp & ~0xFFFFFFFF) | value
            elif offset == REG_HWSP_HI:
                r.hwsp = (r.hwsp & 0xFFFFFFFF) | value << 32
            elif offset == REG_CTRL:
                if value & CTRL_RESET:
                    self.regs = GpuRegs()
                    self.state = 0
                    self.last_error = ""
                else:
                    r.ctrl = value & CTRL_ENABLE
                    run = True
            elif offset == REG_RING_TAIL:
                if value >= r.ring_size:
                    self._error(ERR_RING, f"tail {value} past ring size {r.ring_size}")
                else:
                    r.tail = value
                    self.stats.doorbells += 1
                    run = True
            else:
                return  # read-only or unknown: ignored
            if run and self.threaded:
                self._cond.notify_all()
        if run and not self.threaded:
            self._drain()

    def _wait(self, seqno: int) -> None:
        """Hold the caller until FENCE >= seqno, an error, a pause/stop, or a release."""
        with self._cond:
            gen = self._release
            while (self.regs.fence < seqno and not self.regs.status & STATUS_ERROR
                   and not self._paused and not self._stopping and gen == self._release
                   and self.threaded and self._thread is not None):
                self._cond.wait(WAIT_SLICE_S)

    def _error(self, code: int, msg: str) -> None:
        """Record the first error (caller holds ``_cond``); the engine stops."""
        r = self.regs
        if not r.status & STATUS_ERROR:
            r.status |= STATUS_ERROR
            r.error = code
            self.last_error = msg
        self._cond.notify_all()

    # -- the engine ----------------------------------------------------------------------
    def _runnable(self) -> bool:
        r = self.regs
        return (bool(r.ctrl & CTRL_ENABLE) and r.head != r.tail and not self._paused
                and not r.status & STATUS_ERROR and r.ring_size > 0)

    def _engine(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._runnable():
                    self._cond.wait()
                if self._stopping:
                    return
            self._drain()

    def _drain(self) -> None:
        """Run the ring from head to tail (one caller at a time: the engine thread, or the
        doorbell's caller when inline)."""
        with self._cond:
            if self._busy or not self._runnable():
                return
            self._busy = True
            r = self.regs
            base, size, head, tail = r.ring_base, r.ring_size, r.head, r.tail
        stopped: Callable[[], None] | None = None
        try:
            entries = self._fetch(base, size, head, tail)
            for i, (op, nbytes, addr, seqno, kind, _rsvd) in enumerate(entries):
                err = self._execute(op, nbytes, addr, seqno, kind)
                with self._cond:
                    if err:
                        self._error(*err)
                        return
                    r = self.regs
                    r.head = (head + i + 1) % size
                    if op == OP_FENCE:
                        r.fence = seqno
                        self.stats.fences += 1
                        self._cond.notify_all()
                    else:
                        r.commands += 1
                        if r.commands == self._stop_at:
                            self._stop_at = None
                            self._paused = True
                            self._release += 1
                            self._cond.notify_all()
                            stopped = self._on_stop
                    if self._paused or self._stopping:
                        return
        except DmaError as e:
            with self._cond:
                self._error(ERR_DMA, f"ring fetch: {e}")
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
            if stopped is not None:
                stopped()

    def _fetch(self, base: int, size: int, head: int, tail: int) -> list[tuple[int, ...]]:
        """Read the ring entries ``head..tail`` (one ``dma_rw`` per contiguous span)."""
        spans = [(head, tail)] if head < tail else [(head, size), (0, tail)]
        out: list[tuple[int, ...]] = []
        t0 = time.perf_counter_ns()
        for lo, hi in spans:
            if hi <= lo:
                continue
            buf = bytearray((hi - lo) * CMD.size)
            addr = base + lo * CMD.size
            self.dma_rw(addr, memoryview(buf), False)
            if self.record:
                self.accesses.append((False, addr, len(buf)))
            out += CMD.iter_unpack(buf)
        self.stats.fetches += 1
        self.stats.fetch_ns += time.perf_counter_ns() - t0
        return out

    def _execute(self, op: int, size: int, addr: int, seqno: int, kind: int) -> tuple[int, str] | None:
        """One command; an error is returned as (code, message), never raised."""
        st = self.stats
        if op == OP_FENCE:
            if size != 4:
                return ERR_SIZE, f"fence at {addr:#x}: size {size}, want 4"
            try:
                self.dma_rw(addr, memoryview(seqno.to_bytes(4, "little")), True)
            except DmaError as e:
                return ERR_DMA, f"fence {seqno} at {addr:#x}: {e}"
            if self.record:
                self.accesses.append((True, addr, 4))
            return None
        if op not in (OP_READ, OP_WRITE):
            return ERR_OP, f"command op {op} at ring entry for {addr:#x}: unknown"
        if not 1 <= size <= PAGE:
            return ERR_SIZE, f"command at {addr:#x}: size {size:#x} not in 1..{PAGE:#x}"
        t0 = time.perf_counter_ns()
        mv = self._mv[:size]
        try:
            if op == OP_READ:
                t1 = time.perf_counter_ns()
                self.dma_rw(addr, mv, False)
                t2 = time.perf_counter_ns()
                self.state = zlib.crc32(mv, self.state)
                st.reads += 1
                st.read_ns += t2 - t1
                st.read_bytes += size
            else:
                word = struct.pack("<II", self.state ^ seqno, addr & 0xFFFFFFFF)
                mv[:] = (word * ((size + 7) >> 3))[:size]
                self.state = zlib.crc32(mv, self.state)
                n = self._nwrites
                self._nwrites = n + 1
                t1 = time.perf_counter_ns()
                if n == self._drop_write:
                    pass  # fault injection: this write never reaches guest memory
                elif self._bypass is not None:
                    self._bypass(addr, bytes(mv))
                else:
                    self.dma_rw(addr, mv, True)
                t2 = time.perf_counter_ns()
                st.writes += 1
                st.write_ns += t2 - t1
                st.write_bytes += size
        except DmaError as e:
            return ERR_DMA, f"command {KINDS[kind] if kind < len(KINDS) else kind} {addr:#x}+{size:#x}: {e}"
        if self.record:
            self.accesses.append((op == OP_WRITE, addr, size))
        t3 = time.perf_counter_ns()
        st.commands += 1
        st.command_ns += t3 - t0
        name = KINDS[kind] if kind < len(KINDS) else f"kind-{kind}"
        k = st.by_kind.get(name)
        if k is None:
            st.by_kind[name] = [1, t3 - t0]
        else:
            k[0] += 1
            k[1] += t3 - t0
        return None
