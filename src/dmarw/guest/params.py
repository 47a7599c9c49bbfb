"""The guest's memory layout and its parameter block (``struct params`` in ``guest.c``).

Guest-physical layout (paging off, gpa == iova on the device side)::

    0x00000            page 0, unused
    0x01000-0x0f000    the guest image (code, then .data/.bss on their own pages)
    0x0f000            the parameter block (written by the loader, read by the guest)
    0x10000-0x20000    the guest's stack (64 KiB, grows down from 0x20000)
    0x20000            the command ring (RING_ENTRIES x 32-byte entries)
    0x22000            the status page (the device's fence dword at +0)
    0x24000            vrec: one bit per page the vCPU stored to       (32 KiB: 1 GiB)
    0x2c000            drec: one bit per page the device was told to write
    0x40000-ram_size   the data areas, in order: page tables 25%, rings 5%, contexts 15%,
                       batches 55% (the lab's glmark2 proportions), each split in two
                       halves used by alternate batches
    0xd0000000         the device's MMIO window (outside every memslot)
    port 0x500         the result port (32-bit ``out``)
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field

from ..errors import fail

PAGE = 4096
LOAD_GPA = 0x1000
PARAMS_GPA = 0xF000
STACK_BOTTOM = 0x10000
STACK_TOP = 0x20000
RING_GPA = 0x20000
RING_ENTRIES = 256
CMD_SIZE = 32
HWSP_GPA = 0x22000
VREC_GPA = 0x24000
DREC_GPA = 0x2C000
DATA_GPA = 0x40000
MMIO_GPA = 0xD000_0000
MMIO_SIZE = 0x1000
RESULT_PORT = 0x500

RAM_MIN = 2 << 20
RAM_MAX = 1 << 30  # the records hold one bit per page of at most 1 GiB
MAX_BATCH = 64
COMMANDS_MAX = 10_000_000

PARAMS_MAGIC = 0x50474D44  # "DMGP"
PARAMS_VERSION = 1
# same order as struct params in guest.c (all u32), then the four areas (base, size)
PARAMS_FIELDS = (
    "magic", "version", "stack_top", "stack_bottom", "seed_lo", "seed_hi",
    "commands", "ram_size", "batch", "writer_heavy",
    "mmio_base", "ring_gpa", "ring_entries", "hwsp_gpa", "vrec_gpa", "drec_gpa",
    "spin", "result_port", "hot_pages", "probes",
)
AREAS = ("page-tables", "rings", "contexts", "batches")
AREA_SHARES = (25, 5, 15, 55)  # percent of the data region
PARAMS_STRUCT = struct.Struct("<" + "I" * (len(PARAMS_FIELDS) + 2 * len(AREAS)))
HOT_PAGES = 512
SWEEP_PAGES = 4096  # as guest.c: pages per batch a writer-heavy guest rewrites, per unit


@dataclass(frozen=True)
class Area:
    name: str
    base: int
    size: int

    @property
    def end(self) -> int:
        return self.base + self.size


@dataclass(frozen=True)
class Params:
    """What one guest run does; :meth:`pack` is the parameter block's bytes."""

    seed: int = 0
    commands: int = 2000
    ram_size: int = 16 << 20
    batch: int = 16
    writer_heavy: int = 0  # n: the guest rewrites n * SWEEP_PAGES pages per batch (0: none)
    spin: int = 16  # fence polls (with ``pause``) before the guest blocks in WAIT
    hot_pages: int = HOT_PAGES
    probes: int = 64  # ID-register reads the guest times with rdtsc (the MMIO round trip)
    areas: tuple[Area, ...] = field(init=False)

    def __post_init__(self) -> None:
        for name in ("seed", "commands", "ram_size", "batch", "writer_heavy", "spin", "hot_pages", "probes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise fail(errno.EINVAL, f"guest params: {name} {v!r} must be a non-negative int")
        if self.seed >= 1 << 64:
            raise fail(errno.EINVAL, f"guest params: seed {self.seed:#x} does not fit 64 bits")
        if not RAM_MIN <= self.ram_size <= RAM_MAX or self.ram_size % (1 << 20):
            raise fail(errno.EINVAL, f"guest params: ram size {self.ram_size:#x} must be a whole "
                       f"number of MiB in [{RAM_MIN:#x}, {RAM_MAX:#x}]")
        if not 1 <= self.commands <= COMMANDS_MAX:
            raise fail(errno.EINVAL, f"guest params: commands {self.commands} must be in 1..{COMMANDS_MAX}")
        if not 1 <= self.batch <= MAX_BATCH:
            raise fail(errno.EINVAL, f"guest params: batch {self.batch} must be in 1..{MAX_BATCH}")
        if self.writer_heavy > 64:
            raise fail(errno.EINVAL, f"guest params: writer_heavy {self.writer_heavy} must be in 0..64")
        if self.probes > 1 << 20 or self.spin > 1 << 24:
            raise fail(errno.EINVAL, f"guest params: probes {self.probes} / spin {self.spin} too large")
        if self.hot_pages < 1:
            raise fail(errno.EINVAL, "guest params: hot_pages must be at least 1")
        object.__setattr__(self, "areas", layout_areas(self.ram_size))

    def area(self, name: str) -> Area:
        return self.areas[AREAS.index(name)]

    def pack(self) -> bytes:
        values = {
            "magic": PARAMS_MAGIC, "version": PARAMS_VERSION,
            "stack_top": STACK_TOP, "stack_bottom": STACK_BOTTOM,
            "seed_lo": self.seed & 0xFFFFFFFF, "seed_hi": self.seed >> 32,
            "commands": self.commands, "ram_size": self.ram_size, "batch": self.batch,
            "writer_heavy": int(self.writer_heavy), "mmio_base": MMIO_GPA,
            "ring_gpa": RING_GPA, "ring_entries": RING_ENTRIES, "hwsp_gpa": HWSP_GPA,
            "vrec_gpa": VREC_GPA, "drec_gpa": DREC_GPA, "spin": self.spin,
            "result_port": RESULT_PORT, "hot_pages": self.hot_pages, "probes": self.probes,
        }
        flat = [values[f] for f in PARAMS_FIELDS]
        for a in self.areas:
            flat += [a.base, a.size]
        return PARAMS_STRUCT.pack(*flat)

    @property
    def record_bytes(self) -> int:
        return (self.ram_size // PAGE + 7) // 8


def layout_areas(ram_size: int) -> tuple[Area, ...]:
    """The four data areas over ``[DATA_GPA, ram_size)``: each a whole, even number of pages
    (two halves), in the lab's proportions."""
    pages = (ram_size - DATA_GPA) // PAGE
    out = []
    base = DATA_GPA
    for i, (name, share) in enumerate(zip(AREAS, AREA_SHARES, strict=True)):
        n = pages * share // 100 if i < len(AREAS) - 1 else (ram_size - base) // PAGE
        n -= n % 2
        out.append(Area(name, base, n * PAGE))
        base += n * PAGE
    return tuple(out)
