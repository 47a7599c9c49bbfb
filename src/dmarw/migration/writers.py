"""Guest writers that keep running while the migration copies: vCPUs, a device, pinned pages.

Threads in the source process, not another process.  The dirty logs are state of the
source's :class:`~dmarw.kvm.Vm` and :class:`~dmarw.type1.Container` (in the kernel they
live beside the VMM's process); a writer in another process sharing the memfd would change
guest RAM without being able to mark either log — that is the ``--device-bypass`` loss,
not a faithful writer.  Python threads interleave at bytecode boundaries and while the
sender is in a system call, so every write can race the copy of the page it hits.

Pace: each writer's rate is in writes per MiB the migration streams.  The sender grants
tokens after each frame (:meth:`Writers.grant`); a writer blocks on a condition variable
until it has one.  So how fast memory is dirtied, relative to how fast it is copied, is the
same on a fast or a slow machine, and no writer ever waits on a clock.

Each write stores a 4-byte stamp ``0x80000000 | seq`` in every word it covers, ``seq``
unique in the run (a shared counter), so a page's last write always leaves bytes the page
never held before it.  Initial RAM (:func:`fill`) has the top bit of every word clear.

Lock: one :class:`threading.Condition` guards tokens, counters and the pause state; it is
never held across a guest write.
"""

from __future__ import annotations

import itertools
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..mm import PAGE_SIZE, AddressSpace

MIB = 1 << 20
BATCH = 64  # writes taken per wake-up, at most
STAMP_TOP = 0x80000000

WriteFn = Callable[[int, bytes], None]


def fill(space: AddressSpace, hva: int, size: int, seed: int, base_gpa: int = 0) -> None:
    """Initial guest RAM: each page starts with its gfn and the random seed (top bits clear)."""
    from .dest import prefault

    prefault(space, hva, size)
    chunk = 256 * PAGE_SIZE
    buf = bytearray(chunk)
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        for p in range(0, n, PAGE_SIZE):
            struct.pack_into("<II", buf, p, ((base_gpa + off + p) >> 12) & 0x7FFFFFFF, seed & 0x7FFFFFFF)
        space.write(hva + off, memoryview(buf)[:n])


def place(records: Sequence[tuple[int, int]], base: int, span: int) -> list[tuple[int, int]]:
    """Map workload (addr, size) records into ``[base, base+span)``: 4-byte aligned words,
    at least one word, never crossing a page or the area's end."""
    out = []
    for addr, size in records:
        a = (addr % span) & ~3
        n = max(4, (size + 3) & ~3)
        page_end = (a // PAGE_SIZE + 1) * PAGE_SIZE
        n = min(n, page_end - a, span - a)
        out.append((base + a, n))
    return out


@dataclass
class Writer:
    """One writer thread's program: ``ops`` cycled, each ``(fn, address, size)``."""

    name: str
    rate: float  # writes per MiB streamed
    ops: list[tuple[WriteFn, int, int]]
    tokens: float = 0.0
    done: int = 0
    parked: bool = True
    finished: bool = False
    error: BaseException | None = None
    cursor: int = 0


class Writers:
    """Start, pace, force, pause and stop a set of :class:`Writer` threads."""

    def __init__(self, writers: list[Writer]) -> None:
        self.writers = [w for w in writers if w.ops and w.rate > 0]
        self._cond = threading.Condition(threading.Lock())
        self._paused = False
        self._stopped = False
        self._threads: list[threading.Thread] = []
        self._seq = itertools.count(1)
        self.paused_once = False

    def start(self) -> None:
        for w in self.writers:
            t = threading.Thread(target=self._loop, args=(w,), name=f"dmarw-writer-{w.name}", daemon=True)
            self._threads.append(t)
            t.start()

    def stamp(self, size: int) -> bytes:
        """``size`` bytes of the next stamp (``size`` a multiple of 4)."""
        return struct.pack("<I", STAMP_TOP | (next(self._seq) & 0x7FFFFFFF)) * (size >> 2)

    def _loop(self, w: Writer) -> None:
        cond = self._cond
        ops = w.ops
        nops = len(ops)
        i = w.cursor
        while True:
            with cond:
                while not self._stopped and (self._paused or w.tokens < 1):
                    if not w.parked:
                        w.parked = True
                        cond.notify_all()
                    cond.wait()
                if self._stopped:
                    w.parked = True
                    w.finished = True
                    cond.notify_all()
                    return
                w.parked = False
                n = min(int(w.tokens), BATCH)
                w.tokens -= n
            did = 0
            try:
                while did < n and not self._paused and not self._stopped:
                    fn, addr, size = ops[i]
                    i = i + 1 if i + 1 < nops else 0
                    fn(addr, self.stamp(size))
                    did += 1
            except BaseException as e:  # reported by raise_error(); the thread ends
                with cond:
                    w.error = e
                    w.finished = w.parked = True
                    w.done += did
                    cond.notify_all()
                return
            with cond:
                w.tokens += n - did
                w.done += did
                w.cursor = i
                cond.notify_all()

    def grant(self, nbytes: int) -> None:
        """The sender streamed ``nbytes``: each writer may do ``rate * nbytes / MiB`` writes."""
        with self._cond:
            for w in self.writers:
                w.tokens += w.rate * nbytes / MIB
            self._cond.notify_all()

    def force(self, writes: int) -> None:
        """Each writer completes ``writes`` more writes before this returns (not paused)."""
        with self._cond:
            targets = {id(w): w.done + writes for w in self.writers}
            for w in self.writers:
                w.tokens += writes
            self._cond.notify_all()
            while any(w.done < targets[id(w)] and not w.finished for w in self.writers):
                self._cond.wait()

    def pause(self) -> None:
        """Stop every writer between two writes; returns when all are quiescent."""
        with self._cond:
            self._paused = True
            self.paused_once = True
            self._cond.notify_all()
            while not all(w.parked for w in self.writers):
                self._cond.wait()

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def stop(self) -> None:
        """End every thread (idempotent)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def raise_error(self) -> None:
        for w in self.writers:
            if w.error is not None:
                raise w.error

    def done(self) -> dict[str, int]:
        return {w.name: w.done for w in self.writers}
