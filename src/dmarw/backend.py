"""The backend interface: the narrow hooks a core implements under the shared rules.

As ``vfio_iommu_type1`` plugs into VFIO through ``vfio_iommu_driver_ops``, a core plugs
into :class:`~dmarw.type1.Container` and :class:`~dmarw.kvm.Vm` through the hooks below.
The rules — argument checks, map/unmap/pin/dirty bookkeeping, errno and message — are
written once, in those classes and :mod:`dmarw.errors`; a backend only provides:

* the lock (``_new_lock``): read side, write side, grace period (:class:`IommuLock`);
* a dirty log for a mapping or memslot (``_new_dirty``);
* installing a new snapshot as the one readers see (``_install``), called under the
  write side before the grace period;
* the reader path itself: ``dma_rw`` (type1), ``read_guest``/``read_guest_into``/
  ``write_guest`` (KVM) — translate, check, copy, dirty-mark under the read side.

The Python core's hooks are the methods of :class:`~dmarw.type1.Container` and
:class:`~dmarw.kvm.Vm` themselves.  The native core (:mod:`dmarw.native`) is a subclass
whose first base is a C type (``dmarw._native.Type1``, ``dmarw._native.Kvm``): its reader
methods resolve to the C functions through the method resolution order, so
``container.dma_rw`` is one C call with no Python frame; its ``_install`` builds a native
:class:`dmarw._native.Table` from the snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol


class IommuLock(Protocol):
    """How a core serialises: ``read_*`` around lookups, ``write_*`` around changes,
    ``synchronize`` after a publish (a grace period for rcu/srcu, nothing otherwise)."""

    def read_acquire(self) -> Any: ...
    def read_release(self, token: Any) -> None: ...
    def write_acquire(self) -> None: ...
    def write_release(self) -> None: ...
    def synchronize(self) -> None: ...


class DirtyLog(Protocol):
    """A dirty bitmap of one mapping or memslot (page indices relative to its start)."""

    tracking: bool

    def mark(self, first: int, last: int) -> None: ...
    def take(self, keep: Iterable[int] = ()) -> set[int]: ...
    def take_bytes(self, npages: int, keep: Iterable[int] = ()) -> bytes: ...
    def peek(self) -> set[int]: ...


class Type1Backend(Protocol):
    """What :class:`~dmarw.type1.Container` asks of its core."""

    core: str

    def _new_lock(self, strategy: str, mm_ref: str) -> IommuLock: ...
    def _new_dirty(self, npages: int, pages: Iterable[int]) -> DirtyLog: ...
    def _install(self, table: Any) -> None: ...
    def dma_rw(self, iova: int, buf: Any, write: bool) -> None: ...


class KvmBackend(Protocol):
    """What :class:`~dmarw.kvm.Vm` asks of its core."""

    core: str

    def _new_lock(self) -> IommuLock: ...
    def _new_dirty(self, npages: int, pages: Iterable[int]) -> DirtyLog: ...
    def _install(self, table: Any) -> None: ...
    def read_guest(self, gpa: int, n: int) -> bytes: ...
    def read_guest_into(self, gpa: int, buf: Any) -> None: ...
    def write_guest(self, gpa: int, data: Any) -> None: ...
