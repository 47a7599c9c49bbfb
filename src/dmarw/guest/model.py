"""The guest program's reference model in Python: the same choices, stores, ring commands,
fences and checksum as ``guest.c``, step for step, driving the device through plain calls.

Two uses: a differential test (the real guest under KVM and this model give the same
checksum for a seed), and a guest for the device where no vCPU runs (the simulated
:class:`dmarw.Vm`, a vfio-user peer).  It writes guest memory through ``write(gpa, data)``
and reads through ``read(gpa, n)``; the device is reached through ``reg_read``/``reg_write``
callables.  Runs single-threaded: with an inline device the doorbell runs the batch.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ..devices import gpu
from .params import (
    AREAS,
    CMD_SIZE,
    DREC_GPA,
    HWSP_GPA,
    PAGE,
    RING_ENTRIES,
    RING_GPA,
    STACK_BOTTOM,
    STACK_TOP,
    SWEEP_PAGES,
    VREC_GPA,
    Params,
)

M32 = 0xFFFFFFFF
A_GTT, A_RING, A_CTX, A_BATCH = range(len(AREAS))


@dataclass
class ModelResult:
    checksum: int
    commands: int
    vcpu_pages: set[int] = field(default_factory=set)  # what the guest recorded (vrec)
    device_pages: set[int] = field(default_factory=set)  # drec


class ModelGuest:
    def __init__(
        self,
        params: Params,
        read: Callable[[int, int], bytes],
        write: Callable[[int, bytes], None],
        reg_read: Callable[[int], int],
        reg_write: Callable[[int, int], None],
    ) -> None:
        self.p = params
        self.read, self.write = read, write
        self.reg_read, self.reg_write = reg_read, reg_write
        lo, hi = params.seed & M32, params.seed >> 32
        x = (((lo ^ 0x6A09E667) * 0x9E3779B1) & M32) ^ ((hi * 0x85EBCA6B) & M32)
        self.rng = x or 1
        self.ck_lo, self.ck_hi = 0x811C9DC5, 0x6A09E667
        self.tail = 0
        self.vrec: set[int] = set()
        self.drec: set[int] = set()
        self.writes: list[list[tuple[int, int]]] = [[], []]
        self.sweep_pos = [0, 0]

    # -- the guest's primitives, as in guest.c -------------------------------------------
    def rnd(self) -> int:
        x = self.rng
        x ^= (x << 13) & M32
        x ^= x >> 17
        x ^= (x << 5) & M32
        self.rng = x
        return x

    def below(self, n: int) -> int:
        return (self.rnd() * n) >> 32

    def fold(self, w: int) -> None:
        self.fold_data(w.to_bytes(4, "little"))

    def fold_words(self, addr: int, size: int) -> None:
        self.fold_data(self.read(addr, size))

    def fold_data(self, data: bytes) -> None:
        a, b = self.ck_lo, self.ck_hi
        for (w,) in struct.iter_unpack("<I", data):
            a = ((a ^ w) * 0x01000193) & M32
            b ^= w
            b = ((((b << 7) | (b >> 25)) & M32) * 0x9E3779B1) & M32
        self.ck_lo, self.ck_hi = a, b

    @staticmethod
    def _mark(rec: set[int], addr: int, size: int) -> None:
        rec.update(range(addr // PAGE, (addr + size - 1) // PAGE + 1))

    def claim(self, lo: int, hi: int) -> None:
        """Store to every page of ``[lo, hi)`` without changing it (as guest.c's claim)."""
        for a in range(lo & ~(PAGE - 1), hi, PAGE):
            a = max(a, lo)
            self.write(a, self.read(a, 4))
        self._mark(self.vrec, lo, hi - lo)

    def pick(self, a: int, half: int, size: int, align: int) -> int:
        area = self.p.areas[a]
        half_pages = area.size // PAGE // 2
        hot = min(self.p.hot_pages, half_pages)
        page = self.below(hot) if self.below(100) < 80 else self.below(half_pages)
        slots = (PAGE - size) // align + 1
        return area.base + (half * half_pages + page) * PAGE + self.below(slots) * align

    def guest_store(self, addr: int, size: int, stride: int) -> None:
        for i in range(0, size, stride):
            self.write(addr + i, self.rnd().to_bytes(4, "little"))
        self._mark(self.vrec, addr, size)

    def ring_put(self, op: int, kind: int, addr: int, size: int, seqno: int) -> None:
        entry = gpu.CMD.pack(op, size, addr, seqno, kind, 0)
        self.write(RING_GPA + self.tail * CMD_SIZE, entry)
        self.tail = (self.tail + 1) % RING_ENTRIES

    def make_command(self, half: int, slot: int) -> None:
        below = self.below
        write = below(100) >= 63
        if not write:
            if below(100) < 48:
                kind, a, size, align = 0, (A_GTT if below(100) < 60 else A_BATCH), PAGE, PAGE
            else:
                w = below(100)
                if w < 40:
                    kind, a, size, align = 1, A_GTT, 8, 8
                elif w < 75:
                    kind, a, size, align = 2, A_RING, 4 * (1 + below(16)), 4
                else:
                    kind, a, size, align = 3, A_BATCH, 64 + 4 * below((2048 - 64) // 4 + 1), 4
        else:
            w = below(100)
            if w < 35:
                kind, a, size, align = 4, A_RING, 4, 4
            elif w < 60:
                kind, a, size, align = 5, A_GTT, 8, 8
            elif w < 90:
                kind, a, size, align = 6, A_CTX, 16 * (1 + below(16)), 16
            else:
                kind, a, size, align = 7, A_CTX, 256 + 64 * below((2048 - 256) // 64 + 1), 64
        addr = self.pick(a, half, size, align)
        if write:
            self._mark(self.drec, addr, size)
            self.writes[half].append((addr, size))
        else:
            n = size if size < 64 else 8 + 4 * below(15)
            self.guest_store(addr + below((size - n) // 4 + 1) * 4, n, 4)
        self.ring_put(gpu.OP_WRITE if write else gpu.OP_READ, kind, addr, size, slot)

    def sweep_run(self, addr: int, pages: int, stamp: int) -> None:
        word = stamp.to_bytes(4, "little")
        for i in range(pages):
            self.write(addr + i * PAGE, word)
        if pages:
            self._mark(self.vrec, addr, pages * PAGE)

    def sweep(self, half: int) -> None:
        """As guest.c's sweep(): the writer-heavy guest's rolling window of page stores."""
        area = self.p.areas[A_BATCH]
        half_pages = area.size // PAGE // 2
        n = min(self.p.writer_heavy * SWEEP_PAGES, half_pages)
        if n == 0:
            return
        base = area.base + half * half_pages * PAGE
        pos, stamp = self.sweep_pos[half], self.rnd()
        first = min(n, half_pages - pos)
        self.sweep_run(base + pos * PAGE, first, stamp)
        self.sweep_run(base, n - first, stamp)
        self.sweep_pos[half] = (pos + n) % half_pages

    def sweep_fold(self) -> None:
        if self.p.writer_heavy:
            area = self.p.areas[A_BATCH]
            self.fold_data(b"".join(self.read(a, 4) for a in range(area.base, area.end, PAGE)))

    def wait_fence(self, seqno: int) -> None:
        while int.from_bytes(self.read(HWSP_GPA, 4), "little") < seqno:
            if self.reg_read(gpu.REG_STATUS) & gpu.STATUS_ERROR:
                raise RuntimeError(f"model guest: device error while waiting for fence {seqno}")
            self.reg_write(gpu.REG_WAIT, seqno)

    def harvest(self, j: int) -> None:
        half = j & 1
        self.fold(j)
        for addr, size in self.writes[half]:
            self.fold_words(addr, size)
        self.writes[half] = []

    # -- the program -------------------------------------------------------------------
    def run(self) -> ModelResult:
        p = self.p
        rec_bytes = p.record_bytes
        for lo, hi in ((VREC_GPA, VREC_GPA + rec_bytes), (DREC_GPA, DREC_GPA + rec_bytes),
                       (STACK_BOTTOM, STACK_TOP), (RING_GPA, RING_GPA + RING_ENTRIES * CMD_SIZE)):
            self.claim(lo, hi)
        self._mark(self.drec, HWSP_GPA, 4)
        rw = self.reg_write
        rw(gpu.REG_RING_BASE_LO, RING_GPA)
        rw(gpu.REG_RING_BASE_HI, 0)
        rw(gpu.REG_RING_SIZE, RING_ENTRIES)
        rw(gpu.REG_HWSP_LO, HWSP_GPA)
        rw(gpu.REG_HWSP_HI, 0)
        rw(gpu.REG_CTRL, gpu.CTRL_ENABLE)
        batches = (p.commands + p.batch - 1) // p.batch
        issued = 0
        for k in range(batches):
            half = k & 1
            if k >= 2:
                self.wait_fence(k - 1)
                self.harvest(k - 2)
            n = min(p.commands - issued, p.batch)
            for i in range(n):
                self.make_command(half, issued + i)
            issued += n
            self.sweep(half)
            self.ring_put(gpu.OP_FENCE, 0, HWSP_GPA, 4, k + 1)
            rw(gpu.REG_RING_TAIL, self.tail)
        for j in range(max(batches - 2, 0), batches):
            self.wait_fence(j + 1)
            self.harvest(j)
        if self.reg_read(gpu.REG_STATUS) & gpu.STATUS_ERROR:
            raise RuntimeError("model guest: device error at the end")
        self.sweep_fold()
        drec = bytearray(rec_bytes)
        for page in self.drec:
            drec[page >> 3] |= 1 << (page & 7)
        self.fold_data(bytes(drec[: rec_bytes & ~3]))
        return ModelResult(self.ck_lo | self.ck_hi << 32, issued, set(self.vrec), set(self.drec))


def model_run(params: Params) -> ModelResult:
    """The model against an inline device over a plain bytearray as guest RAM."""
    ram = bytearray(params.ram_size)

    def read(gpa: int, n: int) -> bytes:
        return bytes(ram[gpa : gpa + n])

    def write(gpa: int, data: bytes) -> None:
        ram[gpa : gpa + len(data)] = data

    def dma_rw(gpa: int, buf: memoryview, is_write: bool) -> None:
        if is_write:
            ram[gpa : gpa + len(buf)] = buf
        else:
            buf[:] = ram[gpa : gpa + len(buf)]

    dev = gpu.GpuDevice(dma_rw)
    return ModelGuest(params, read, write, dev.reg_read, dev.reg_write).run()
