"""Workloads: streams of ``(op, addr, size)`` guest accesses, generated or replayed.

A record is ``op`` (``"r"`` or ``"w"``), ``addr`` (a guest address: gpa == iova, the device
sees guest RAM 1:1 as a vIOMMU-less guest does) and ``size`` in bytes, with
``0 <= addr`` and ``addr + size <= ram_size``.

Built-in profile ``glmark2`` (the 2020 thread's measured mix; it gives only the first three
facts, the rest is our documented assumption, :data:`GLMARK2_ASSUMPTION`):

* a share :data:`READ_FRACTION` of records are reads (the count is
  ``round(READ_FRACTION * ops)``, exact at any size);
* a share :data:`PAGE_READ_FRACTION` of reads are exactly one page, page-aligned;
* every other read and every write is under one page.

Generation is seeded (:class:`random.Random`), so ``generate(profile, ops, seed)`` gives the
same records on every machine.  The trace file format (``dmarw-trace 1``) is described in
:meth:`Workload.save` and in ``docs/lab.md``; it round-trips exactly.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

from ..errors import DmaError, fail
from . import reference as REF

PAGE = 4096
TRACE_MAGIC = "dmarw-trace"
TRACE_VERSION = 1
MAX_LINE = 1 << 16  # bytes: a trace line is a record or a header, far shorter
READ_FRACTION = float(REF.GLMARK2["read_fraction"])  # both from the 2020 thread's glmark2 runs
PAGE_READ_FRACTION = float(REF.GLMARK2["page_read_fraction"])
DEFAULT_OPS = 200_000
DEFAULT_RAM = 64 << 20

Record = tuple[str, int, int]

# Sub-page size mix and address pattern: GVT-g-like (a mediated Intel GPU device model).
# (weight, kind, min size, max size, alignment) for each sub-page read / write kind.
_SUBPAGE_READS: tuple[tuple[int, str, int, int, int], ...] = (
    (40, "gtt-pte", 8, 8, 8),  # one PPGTT/GGTT entry while shadowing page tables
    (35, "ring-cmd", 4, 64, 4),  # command-parser reads of ring dwords
    (25, "batch", 64, 2048, 4),  # batch-buffer / descriptor chunks
)
_WRITES: tuple[tuple[int, str, int, int, int], ...] = (
    (35, "status-dword", 4, 4, 4),  # ring head/tail, seqno, execlist status
    (25, "gtt-pte", 8, 8, 8),  # PTE write-back
    (30, "descriptor", 16, 256, 16),  # context descriptors, CSB entries
    (10, "context-state", 256, 2048, 64),  # ring-context register state write-back
)
# Guest-RAM areas, as fractions of RAM (start, end): where each kind of access lands.
_AREAS: dict[str, tuple[float, float]] = {
    "page-tables": (0.00, 0.25),  # PPGTT page-table pages: full-page reads, PTE reads/writes
    "rings": (0.25, 0.30),  # ring buffers: cmd reads, status dwords
    "contexts": (0.30, 0.45),  # context images: descriptors and state write-back
    "batches": (0.45, 1.00),  # batch buffers: full-page and chunk reads
}
_KIND_AREA = {
    "page-read": "page-tables",  # 60% of page reads; 40% go to "batches" (see _page_read)
    "gtt-pte": "page-tables",
    "ring-cmd": "rings",
    "status-dword": "rings",
    "batch": "batches",
    "descriptor": "contexts",
    "context-state": "contexts",
}
HOT_PAGES = 512  # each area has a hot set of this many pages taking 80% of its accesses

GLMARK2_ASSUMPTION = (
    f"glmark2 (2020 thread): {READ_FRACTION:.0%} reads; {PAGE_READ_FRACTION:.0%} of reads one 4096 B page-aligned "
    "page; other reads and all "
    "writes < 4096 B. Assumed (GVT-g-like, not in the 2020 thread): sub-page reads 40% 8 B GTT PTEs, "
    "35% 4-64 B ring command dwords, 25% 64-2048 B batch/descriptor chunks; writes 35% 4 B "
    "status dwords, 25% 8 B PTEs, 30% 16-256 B descriptors, 10% 256-2048 B context state; "
    "sizes naturally aligned, no sub-page access crosses a page; addresses: page-table area "
    "(first 25% of RAM), rings (25-30%), contexts (30-45%), batches (45-100%); page reads 60% "
    "page tables / 40% batches; 80% of each area's accesses hit a hot set of 512 pages."
)

PROFILES = ("glmark2",)


class Records(Sequence[Record]):
    """Array-backed ``(op, addr, size)`` records: ``ops`` (1 = write), ``addrs``, ``sizes``."""

    __slots__ = ("writes", "addrs", "sizes")

    def __init__(self, writes: array, addrs: array, sizes: array) -> None:
        self.writes = writes
        self.addrs = addrs
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.addrs)

    @overload
    def __getitem__(self, i: int) -> Record: ...
    @overload
    def __getitem__(self, i: slice) -> Records: ...
    def __getitem__(self, i: int | slice) -> Record | Records:
        if isinstance(i, slice):
            return Records(self.writes[i], self.addrs[i], self.sizes[i])
        return ("w" if self.writes[i] else "r", self.addrs[i], self.sizes[i])

    def __iter__(self) -> Iterator[Record]:
        for w, a, s in zip(self.writes, self.addrs, self.sizes, strict=True):
            yield ("w" if w else "r", a, s)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Records):
            return (
                self.writes == other.writes
                and self.addrs == other.addrs
                and self.sizes == other.sizes
            )
        if isinstance(other, Sequence):
            return len(self) == len(other) and all(a == tuple(b) for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def _new_arrays() -> tuple[array, array, array]:
    return array("B"), array("Q"), array("I")


@dataclass(eq=False)
class Workload:
    """A named stream of records over ``ram_size`` bytes of guest RAM."""

    profile: str
    seed: int
    ram_size: int
    records: Records
    assumption: str = ""
    meta: dict[str, str] = field(default_factory=dict)

    # -- summary -----------------------------------------------------------------------
    @property
    def ops(self) -> int:
        return len(self.records)

    def counts(self) -> dict[str, int]:
        """reads, writes, page-sized page-aligned reads, and sub-page writes."""
        r = self.records
        writes = sum(r.writes)
        page_reads = sum(
            1 for w, a, s in zip(r.writes, r.addrs, r.sizes, strict=True)
            if not w and s == PAGE and a % PAGE == 0
        )
        return {"ops": len(r), "reads": len(r) - writes, "writes": writes, "page_reads": page_reads}

    def writes(self) -> list[tuple[int, int]]:
        """``(addr, size)`` of every write record, in order (e.g. a migration's writer)."""
        r = self.records
        return [(a, s) for w, a, s in zip(r.writes, r.addrs, r.sizes, strict=True) if w]

    def reads(self) -> list[tuple[int, int]]:
        """``(addr, size)`` of every read record, in order."""
        r = self.records
        return [(a, s) for w, a, s in zip(r.writes, r.addrs, r.sizes, strict=True) if not w]

    def params(self) -> dict[str, object]:
        """The workload's parameters, for reports and the JSON output."""
        return {
            "profile": self.profile,
            "seed": self.seed,
            "ram_size": self.ram_size,
            "ops": self.ops,
            "assumption": self.assumption,
            **self.counts(),
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Workload):
            return NotImplemented
        return (
            self.profile == other.profile
            and self.seed == other.seed
            and self.ram_size == other.ram_size
            and self.records == other.records
        )

    __hash__ = None  # type: ignore[assignment]

    # -- trace files -------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the trace file (text, ``dmarw-trace 1``).

        Format: line 1 ``dmarw-trace 1``; then header lines ``key value`` (``profile``,
        ``seed``, ``ram_size`` in hex, ``ops``, ``assumption``); then one record per line,
        ``r|w <addr hex> <size decimal>``.  Lines starting with ``#`` are comments.
        """
        r = self.records
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"{TRACE_MAGIC} {TRACE_VERSION}\n")
            f.write(f"profile {self.profile}\n")
            f.write(f"seed {self.seed}\n")
            f.write(f"ram_size {self.ram_size:#x}\n")
            f.write(f"ops {len(r)}\n")
            if self.assumption:
                f.write(f"assumption {' '.join(self.assumption.split())}\n")
            f.write("# op addr size\n")
            chunk: list[str] = []
            for w, a, s in zip(r.writes, r.addrs, r.sizes, strict=True):
                chunk.append(f"{'w' if w else 'r'} {a:#x} {s}\n")
                if len(chunk) >= 65536:
                    f.write("".join(chunk))
                    chunk.clear()
            f.write("".join(chunk))

    @classmethod
    def load(cls, path: str, max_size: int | None = None) -> Workload:
        """Read a trace file written by :meth:`save` or by hand; the whole file is checked
        before anything is returned, and any problem is ``DmaError(EINVAL)`` naming
        ``file:line`` (see :func:`check_ram` for the RAM bounds).

        Only the first line and one record are required; ``ram_size`` defaults to the
        highest record end rounded up to a page, ``profile`` to ``trace``, ``seed`` to 0.
        Refused: binary (non-UTF-8 or NUL) content, a header key other than
        :data:`HEADER_KEYS`, a header line after the first record, a record that is not
        ``r|w ADDR SIZE``, a size of 0 or above ``max_size``, a record ending past
        ``ram_size``, an ``ops`` header that disagrees with the record count, and a file
        without records.
        """
        import errno

        def bad(lineno: int, what: str) -> DmaError:
            return fail(errno.EINVAL, f"{path}:{lineno}: {what}")

        writes, addrs, sizes = _new_arrays()
        head: dict[str, str] = {}
        ram: int | None = None
        with open(path, "rb") as f:
            lineno = 0
            # bounded reads: a file without newlines (/dev/zero) must not be read whole
            for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), start=1):  # noqa: B007
                if b"\0" in raw:
                    raise bad(lineno, "binary content (a NUL byte), not a trace file")
                if len(raw) > MAX_LINE:
                    raise bad(lineno, f"a line longer than {MAX_LINE:,} bytes, not a trace file")
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    raise bad(lineno, "binary content (not UTF-8 text), not a trace file") from None
                if lineno == 1:
                    first = line.split()
                    if len(first) != 2 or first[0] != TRACE_MAGIC:
                        raise bad(1, f"not a {TRACE_MAGIC} file (the first line must be '{TRACE_MAGIC} {TRACE_VERSION}')")
                    if first[1] != str(TRACE_VERSION):
                        raise bad(1, f"trace version {first[1]!r} (this dmarw reads {TRACE_VERSION})")
                    continue
                if not line or line.startswith("#"):
                    continue
                op, _, rest = line.partition(" ")
                if op in ("r", "w"):
                    if ram is None:
                        ram = _header_ram(head, path)
                    parts = rest.split()
                    try:
                        if len(parts) != 2:
                            raise ValueError
                        a, s = int(parts[0], 0), int(parts[1], 0)
                    except ValueError:
                        raise bad(lineno, f"bad record {line!r} (want: r|w ADDR SIZE)") from None
                    if a < 0 or s <= 0 or s > 0xFFFFFFFF or a >= 1 << 64:
                        raise bad(lineno, f"record {a:#x}+{s:#x} out of range")
                    if max_size is not None and s > max_size:
                        raise bad(lineno, f"record {a:#x}+{s:#x} is larger than {max_size:#x} bytes")
                    if ram and a + s > ram:
                        raise bad(lineno, f"record {a:#x}+{s:#x} ends past ram_size {ram:#x}")
                    writes.append(op == "w")
                    addrs.append(a)
                    sizes.append(s)
                elif addrs:
                    raise bad(lineno, f"unknown line {line!r} after the records (want: r|w ADDR SIZE)")
                elif op not in HEADER_KEYS:
                    raise bad(lineno, f"unknown line {line!r} (header keys: {', '.join(HEADER_KEYS)}; "
                              "records: r|w ADDR SIZE)")
                elif op in head:
                    raise bad(lineno, f"header key {op!r} given twice")
                else:
                    head[op] = rest.strip()
        if lineno == 0:
            raise fail(errno.EINVAL, f"{path}: empty file, not a {TRACE_MAGIC} file")
        if not addrs:
            raise fail(errno.EINVAL, f"{path}: no records (a trace needs at least one 'r|w ADDR SIZE' line)")
        if not ram:
            top = max(a + s for a, s in zip(addrs, sizes, strict=True))
            ram = -(-top // PAGE) * PAGE
            check_ram(ram, f"{path}: the records' extent")
        try:
            seed = int(head.get("seed", "0"), 0)
            ops = int(head["ops"], 0) if "ops" in head else len(addrs)
        except ValueError:
            raise fail(errno.EINVAL, f"{path}: bad header value (seed {head.get('seed')!r}, ops {head.get('ops')!r})") from None
        if ops != len(addrs):
            raise fail(errno.EINVAL, f"{path}: header says {ops} ops, file has {len(addrs)} (truncated?)")
        return cls(
            profile=head.get("profile", "trace"),
            seed=seed,
            ram_size=ram,
            records=Records(writes, addrs, sizes),
            assumption=head.get("assumption", ""),
            meta={"source": path},
        )


HEADER_KEYS = ("profile", "seed", "ram_size", "ops", "assumption")
MAX_RAM = 4 << 30  # guest RAM of one lab VM: never more than this (each VM process maps it)


def check_ram(ram: int, what: str = "ram_size") -> None:
    """A guest RAM size the lab can map: a positive multiple of 4096, at most :data:`MAX_RAM`
    and at most half the memory this machine has available (``DmaError(EINVAL)``)."""
    import errno

    if ram <= 0 or ram % PAGE:
        raise fail(errno.EINVAL, f"{what} {ram:#x} must be a positive multiple of 4096")
    avail = _mem_available()
    limit = min(MAX_RAM, avail // 2) if avail else MAX_RAM
    if ram > limit:
        raise fail(errno.EINVAL, f"{what} {ram:#x} is more than this machine can give a lab VM ({limit:#x}: at "
                   f"most {MAX_RAM >> 30} GiB and half the available memory)")


def _mem_available() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _header_ram(head: dict[str, str], path: str) -> int:
    """The header's ``ram_size`` checked (0: not given, taken from the records)."""
    import errno

    if "ram_size" not in head:
        return 0
    try:
        ram = int(head["ram_size"], 0)
    except ValueError:
        raise fail(errno.EINVAL, f"{path}: bad ram_size {head['ram_size']!r}") from None
    check_ram(ram, f"{path}: ram_size")
    return ram


def _pick(rng: random.Random, kinds: Sequence[tuple[int, str, int, int, int]]) -> tuple[str, int, int, int]:
    total = sum(k[0] for k in kinds)
    x = rng.randrange(total)
    for weight, name, lo, hi, align in kinds:
        if x < weight:
            return name, lo, hi, align
        x -= weight
    raise AssertionError("unreachable")


class _Areas:
    """Page picking inside each area: 80% from a hot set, 20% uniform."""

    def __init__(self, rng: random.Random, ram_size: int) -> None:
        npages = ram_size // PAGE
        self.rng = rng
        self.bounds: dict[str, tuple[int, int]] = {}
        self.hot: dict[str, list[int]] = {}
        for name, (lo, hi) in _AREAS.items():
            first = int(npages * lo)
            last = max(int(npages * hi), first + 1)
            self.bounds[name] = (first, last)
            span = range(first, last)
            self.hot[name] = rng.sample(span, min(HOT_PAGES, len(span)))

    def page(self, area: str) -> int:
        rng = self.rng
        if rng.random() < 0.8:
            return rng.choice(self.hot[area])
        first, last = self.bounds[area]
        return rng.randrange(first, last)


def generate(
    profile: str = "glmark2", ops: int = DEFAULT_OPS, seed: int = 0, ram_size: int = DEFAULT_RAM
) -> Workload:
    """Seeded records of ``profile``; see the module docstring for the proportions."""
    import errno

    if profile not in PROFILES:
        raise fail(errno.EINVAL, f"unknown workload profile {profile!r} (have {', '.join(PROFILES)})")
    if not isinstance(ops, int) or ops < 0:
        raise fail(errno.EINVAL, f"ops {ops!r} must be a non-negative int")
    if not isinstance(ram_size, int) or ram_size < 16 * PAGE or ram_size % PAGE:
        raise fail(errno.EINVAL, f"ram_size {ram_size!r} must be a multiple of 4096, >= 64 KiB")
    check_ram(ram_size)
    rng = random.Random(seed)
    areas = _Areas(rng, ram_size)
    n_reads = round(READ_FRACTION * ops)
    n_page_reads = round(PAGE_READ_FRACTION * n_reads)
    kinds = [2] * n_page_reads + [0] * (n_reads - n_page_reads) + [1] * (ops - n_reads)
    rng.shuffle(kinds)  # 2: page read, 0: sub-page read, 1: write
    writes, addrs, sizes = _new_arrays()
    for k in kinds:
        if k == 2:
            area = "page-tables" if rng.random() < 0.6 else "batches"
            addr, size = areas.page(area) * PAGE, PAGE
        else:
            name, lo, hi, align = _pick(rng, _SUBPAGE_READS if k == 0 else _WRITES)
            size = rng.randrange(lo, hi + 1, align) if hi > lo else lo
            slots = (PAGE - size) // align + 1  # aligned offsets where it fits in the page
            addr = areas.page(_KIND_AREA[name]) * PAGE + rng.randrange(slots) * align
        writes.append(k == 1)
        addrs.append(addr)
        sizes.append(size)
    return Workload(
        profile=profile,
        seed=seed,
        ram_size=ram_size,
        records=Records(writes, addrs, sizes),
        assumption=GLMARK2_ASSUMPTION,
    )
