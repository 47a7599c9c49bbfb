"""The native core: the backend hooks of :mod:`dmarw.backend` implemented in C.

:class:`NativeContainer` is ``(dmarw._native.Type1, Container)`` and :class:`NativeVm`
``(dmarw._native.Kvm, Vm)``: every rule of the slow paths (map, unmap, pin, dirty
start/stop/get, memslots) is the Python classes' own code, and the hooks come from C:

* the reader path — ``dma_rw`` and ``read_guest`` / ``read_guest_into`` / ``write_guest`` —
  resolves through the method resolution order to the C type's method: one C call, no
  Python frame (translate + check the whole range + count the address-space user + copy +
  dirty-mark);
* the lock (``_new_lock``) is the C object itself (futex mutex, writer-preferring pthread
  rwlock, process-wide RCU, or an epoch-counted SRCU), so native readers and the Python
  writers share one lock;
* ``_install`` builds a native ``Table`` from the snapshot the rules publish and installs
  it under the writer's lock, before the grace period;
* dirty logs (``_new_dirty``) are :class:`NativeDirtyBitmap` (u64 words marked with
  atomic ``fetch_or``);
* the address-space user count is a real atomic (:class:`dmarw._native.MmRef`, one per
  :class:`~dmarw.mm.AddressSpace`, told of the owner's exit through the space's exit hook),
  and each region's release sets a native flag; a native table holds a buffer export on
  each mapping's mmap, so its memory stays mapped while any reader may use it.

Importing this module imports the extension and defines the classes; nothing else.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Iterable
from typing import Any

from . import _native, lockstat
from .backend import DirtyLog, IommuLock
from .bitmap import bitmap_bytes, from_bytes
from .kvm import Snapshot, Vm
from .mm import AddressSpace, Region
from .type1 import Container, _Table
from .vfio import ExternalUser

if getattr(_native, "__file__", None) is None:  # only the C sources' folder: not built
    raise ImportError("the native core dmarw._native is not built (pip install -e . with a C compiler)")

cycles = _native.cycles
tsc_hz = _native.tsc_hz
counter_kind = _native.counter_kind
set_gil_threshold = _native.set_gil_threshold

_setup_lock = threading.Lock()
_timing_registered = False
_mm_refs: weakref.WeakKeyDictionary[AddressSpace, Any] = weakref.WeakKeyDictionary()
_gone_flags: weakref.WeakKeyDictionary[Region, Any] = weakref.WeakKeyDictionary()


@functools.cache
def lock_class(name: str) -> tuple[lockstat.LockClass, Any]:
    """Lock class ``name`` and its native counter (made and attached on first use); the
    native core's switch of timing is registered with :mod:`dmarw.lockstat` then too."""
    global _timing_registered
    with _setup_lock:
        if not _timing_registered:
            lockstat.on_timing_switch(_native.set_timing)
            _timing_registered = True
    cls = lockstat.lock_class(name)
    counter = _native.Atomic(0)
    cls.attach(counter)
    return cls, counter


def mm_ref(space: AddressSpace) -> Any:
    """The native user count of ``space`` (made on first use, told of the owner's exit)."""
    with _setup_lock:
        ref = _mm_refs.get(space)
        if ref is not None:
            return ref
        ref = _mm_refs[space] = _native.MmRef(kthread=space.kthread)
    space.on_exit(ref.exit)
    return ref


def _gone_flag(region: Region) -> Any:
    """A native flag set when ``region`` is released (made on first use)."""
    with _setup_lock:
        flag = _gone_flags.get(region)
        if flag is not None:
            return flag
        flag = _gone_flags[region] = _native.Atomic(0)
    region.on_release(flag.inc)
    return flag


class NativeDirtyBitmap:
    """A dirty bitmap of ``npages`` pages as little-endian u64 words, marked atomically.

    The interface of :class:`~dmarw.backend.DirtyLog`.  ``mark`` is one ``fetch_or`` per
    word of the range; ``take`` one ``exchange`` per non-zero word, so a bit set by a write
    that completed is either reported or still set, never lost.  No lock.
    """

    __slots__ = ("npages", "words")
    tracking = True

    def __init__(self, npages: int, pages: Iterable[int] = (), words: Any = None) -> None:
        """``words``: a writable buffer of ``bitmap_bytes(npages)`` bytes to keep the bits in
        (e.g. a slice of a shared ``mmap``, so another process can harvest); default a new
        ``bytearray``."""
        self.npages = npages
        self.words = bytearray(bitmap_bytes(npages)) if words is None else words
        if len(memoryview(self.words).cast("B")) != bitmap_bytes(npages):
            raise ValueError(f"bitmap of {npages} pages needs {bitmap_bytes(npages)} bytes")
        for p in pages:
            _native.bitmap_mark(self.words, p, p)

    def mark(self, first: int, last: int) -> None:
        """Mark pages ``first`` through ``last`` inclusive."""
        _native.bitmap_mark(self.words, first, last)

    def take_bytes(self, npages: int | None = None, keep: Iterable[int] = ()) -> bytes:
        """Get and clear in the kernel layout; pages in ``keep`` are set again (and reported)."""
        return bytes(_native.bitmap_take(self.words, list(keep)))

    def take(self, keep: Iterable[int] = ()) -> set[int]:
        """Get and clear; pages in ``keep`` (the pinned ones) are set again afterwards."""
        return set(from_bytes(self.take_bytes(None, keep)))

    def peek(self) -> set[int]:
        return set(from_bytes(_native.bitmap_peek(self.words)))


def _words(dirty: object) -> Any:
    return dirty.words if isinstance(dirty, NativeDirtyBitmap) else None


class NativeContainer(_native.Type1, Container):
    """:class:`~dmarw.type1.Container` on the native core (see the module docstring)."""

    core = "native"

    def _new_lock(self, strategy: str, mm_ref: str) -> IommuLock:
        read = "iommu.rcu" if strategy == "rcu" else "iommu.lock"
        self._setup(
            lock=strategy,
            mm_ref=mm_ref,
            shift=self.shift,
            read=lock_class(read),
            write=lock_class("iommu.lock"),
            task=lock_class("task_lock"),
        )
        return self

    def _new_dirty(self, npages: int, pages: Iterable[int]) -> DirtyLog:
        return NativeDirtyBitmap(npages, pages)

    def _install(self, table: _Table) -> None:
        entries = [
            (d.iova, d.size, d.region.map, d.roff, int(d.prot), _words(d.dirty), _gone_flag(d.region), mm_ref(d.space), 0)
            for d in table.dmas
        ]
        self.set_table(_native.Table(entries))
        self._table = table


class NativeVm(_native.Kvm, Vm):
    """:class:`~dmarw.kvm.Vm` on the native core (see the module docstring)."""

    core = "native"

    def _new_lock(self) -> IommuLock:
        self._setup(lock="srcu", read=lock_class("kvm.srcu"))
        return self

    def _new_dirty(self, npages: int, pages: Iterable[int]) -> DirtyLog:
        return NativeDirtyBitmap(npages, pages)

    def _install(self, table: Snapshot) -> None:
        entries = [
            (s.gpa, s.size, s.region.map, s.offset, 1 if s.readonly else 3, _words(s.dirty), _gone_flag(s.region), None, s.slot)
            for s in table[0]
        ]
        self.set_table(_native.Table(entries))
        self._table = table


def replay(target: Any, writes: Any, addrs: Any, sizes: Any, buf: Any = None) -> dict[str, float]:
    """Run recorded accesses through ``target``'s native path, each call timed in C.

    ``target``: a :class:`NativeVm` (``read_guest_into``/``write_guest`` rules), a
    :class:`NativeContainer` or an open ``ExternalUser`` on one (``dma_rw`` rules).
    ``writes``/``addrs``/``sizes``: u8/u64/u32 arrays (the lab's ``Records`` fields); ``buf``
    the data buffer (default: the largest size).  Returns the cycle totals and counts
    (``read_cycles``, ``reads``, ``write_cycles``, ``writes``), the per-call averages
    (``read_avg``, ``write_avg``, ``avg``) and the counter's ``timer_overhead`` (cycles of
    one counter pair, included in every call's figure).  The first failing access raises.
    """
    c = getattr(target, "container", target)
    if not isinstance(c, NativeContainer | NativeVm):
        raise TypeError(f"replay: {type(target).__name__} is not on the native core")
    if buf is None:
        buf = bytearray(max(sizes, default=1))
    rc, rn, wc, wn = c.replay(writes, addrs, sizes, buf)
    return {
        "read_cycles": rc,
        "reads": rn,
        "write_cycles": wc,
        "writes": wn,
        "read_avg": rc / rn if rn else 0.0,
        "write_avg": wc / wn if wn else 0.0,
        "avg": (rc + wc) / (rn + wn) if rn + wn else 0.0,
        "timer_overhead": _native.timer_overhead(10001),
    }


__all__ = [
    "NativeContainer",
    "NativeDirtyBitmap",
    "NativeExternalUser",
    "NativeVm",
    "counter_kind",
    "cycles",
    "lock_class",
    "mm_ref",
    "replay",
    "set_gil_threshold",
    "tsc_hz",
]


class NativeExternalUser(_native.Handle, ExternalUser):
    """:class:`~dmarw.vfio.ExternalUser` on a native container: ``dma_rw`` is the C
    handle's (the container's C path after one check that the handle is open)."""

    core = "native"
