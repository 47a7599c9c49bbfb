"""One VM's guest RAM, Vm and container, and each access path the lab measures.

Every path is dmarw's real code, set up as in the 2020 thread (dirty logging on everywhere):

==========================  ==============================================================
``kvm``                     ``Vm.read_guest_into`` / ``Vm.write_guest`` (memslot 0 with
                            ``dirty_log=True``)
``vfio-mutex``              per-call ``vfio_dma_rw`` on ``Container(lock="mutex",
                            mm_ref="get_task_mm")`` (2020)
``vfio-rwsem``              per-call ``vfio_dma_rw``, ``lock="rwsem"`` (the Jan 2020 RFC)
``vfio-external-user``      ``ExternalUser.dma_rw``, mutex, ``get_task_mm`` (merged for 5.7)
``vfio-external-user-mmget``  ``ExternalUser.dma_rw``, mutex, ``mmget_not_zero`` (the thread's proposal)
``vfio-rcu``                ``ExternalUser.dma_rw`` on ``lock="rcu"``, ``mmget_not_zero``
                            (beyond the thread: lock-free readers)
==========================  ==============================================================

``core`` picks the Python reference or the native core (:mod:`dmarw.core`; default: native
when built, ``$DMARW_CORE`` overrides).  Every path is reached the same way: one positional
call ``rw(addr, buf, write)`` (no ``functools.partial`` keywords): ``kvm`` through
:meth:`VmEnv.access`'s pair, the VFIO paths through ``vfio_dma_rw`` with the device bound
positionally or the handle's bound ``dma_rw``.  On the native core :meth:`VmEnv.replayer`
gives the path's C replay entry (each call timed in C with the native counter).  The container always tracks dirty pages (``dirty_pages_start``).  Guest RAM is a memfd,
mapped at iova == gpa == 0.  Locks: none here; each VM lives in its own process.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import bitmap
from ..core import resolve as resolve_core  # python / native: the lab's name for it
from ..kvm import Vm
from ..mm import PAGE_SIZE, AddressSpace
from ..type1 import Container, Prot
from ..vfio import ExternalUser, Group, vfio_dma_rw_py

Access = Callable[[int, memoryview], None]
RwAccess = Callable[[int, memoryview, bool], None]
RwAccess4 = Callable[[Any, int, memoryview, bool], None]
# replay(writes u8, addrs u64, sizes u32, buf, deltas u64 | None) -> (rc, rn, wc, wn)
Replayer = Callable[..., tuple[int, int, int, int]]


@dataclass(frozen=True)
class Accessor:
    """How the lab calls a path from Python: ``read(addr, buf)``/``write(addr, buf)`` (kvm's
    two entry points) or ``rw(addr, buf, write)`` (dma_rw's one), always positionally."""

    read: Access | None = None
    write: Access | None = None
    rw: RwAccess | None = None

    def pair(self) -> tuple[Access, Access]:
        """(read, write) for code that wants two callables (warm-up, tests); the VFIO pair
        adds a frame, so timed loops use :attr:`rw` instead."""
        if self.rw is None:
            assert self.read is not None and self.write is not None
            return self.read, self.write
        rw = self.rw
        return (lambda a, m: rw(a, m, False)), (lambda a, m: rw(a, m, True))


@dataclass(frozen=True)
class PathSpec:
    """How one path reaches guest memory: ``kind`` kvm / percall / external."""

    name: str
    kind: str
    lock: str
    mm_ref: str
    label: str
    description: str


PATHS: dict[str, PathSpec] = {
    p.name: p
    for p in (
        PathSpec("kvm", "kvm", "mutex", "get_task_mm", "kvm_read/write_guest",
                 "Vm.read_guest_into / Vm.write_guest, memslot dirty log on"),
        PathSpec("vfio-mutex", "percall", "mutex", "get_task_mm", "vfio_dma_rw(mutex)",
                 "per-call vfio_dma_rw: group lookup, viability, container user, iommu mutex, get_task_mm"),
        PathSpec("vfio-rwsem", "percall", "rwsem", "get_task_mm", "vfio_dma_rw(rwsem r)",
                 "per-call vfio_dma_rw with the iommu lock as an rwsem taken for read"),
        PathSpec("vfio-external-user", "external", "mutex", "get_task_mm", "external user",
                 "ExternalUser handle held across calls: only the iommu mutex and get_task_mm per call"),
        PathSpec("vfio-external-user-mmget", "external", "mutex", "mmget_not_zero",
                 "external user + mmget_not_zero",
                 "ExternalUser handle, iommu mutex, mmget_not_zero instead of get_task_mm"),
        PathSpec("vfio-rcu", "external", "rcu", "mmget_not_zero", "external user + rcu",
                 "ExternalUser handle on an RCU container: lock-free readers, mmget_not_zero"),
    )
}
SEED_PATHS = ("kvm", "vfio-mutex", "vfio-rwsem", "vfio-external-user", "vfio-external-user-mmget")


class VmEnv:
    """A guest of ``ram_size`` bytes with both the KVM and the VFIO view of it."""

    def __init__(self, path: str, ram_size: int, name: str = "lab", core: str | None = None) -> None:
        spec = PATHS[path]
        self.spec = spec
        self.core = resolve_core(core)
        self.ram_size = ram_size
        self.space = AddressSpace()
        self.hva = self.space.mmap(ram_size, backing="memfd")
        self.vm: Vm = Vm(self.space, core=self.core)
        self.vm.set_memslot(0, 0, ram_size, self.hva, dirty_log=True)
        self.container: Container = Container(lock=spec.lock, mm_ref=spec.mm_ref, core=self.core)
        self.container.map_dma(0, ram_size, self.hva, self.space, Prot.READ | Prot.WRITE)
        self.container.dirty_pages_start()
        self.group = Group(f"{name}-{os.getpid()}", core=self.core)
        self.device = self.group.add_device("0000:00:02.0")
        self.group.set_container(self.container)
        self.user: ExternalUser | None = None
        if spec.kind == "external":
            self.user = ExternalUser.from_device(self.device)

    def prefault(self) -> None:
        """Touch every guest page once (not through any path), so timing sees no page fault."""
        region, off = self.space.region(self.hva, self.ram_size)
        zero = bytes(PAGE_SIZE)
        m = region.map
        for o in range(off, off + self.ram_size, PAGE_SIZE):
            m[o : o + PAGE_SIZE] = zero

    def access(self, path: str | None = None) -> Accessor:
        """How to call ``path`` (default: this env's) from Python, positionally: kvm's
        ``read_guest_into``/``write_guest``; per-call ``vfio_dma_rw`` with the device bound
        (``functools.partial`` with one positional argument: no keyword binding); the
        handle's own bound ``dma_rw``."""
        spec = PATHS[path or self.spec.name]
        if spec.kind == "kvm":
            return Accessor(read=self.vm.read_guest_into, write=self.vm.write_guest)
        if spec.kind == "percall":
            fn: RwAccess4 = vfio_dma_rw_py
            if self.core == "native":
                from .. import _native

                fn = _native.vfio_dma_rw  # the one-call path (whatever $DMARW_CORE said at import)
            return Accessor(rw=functools.partial(fn, self.device))
        return Accessor(rw=self._user().dma_rw)

    def _user(self) -> ExternalUser:
        user = self.user if self.user is not None else ExternalUser.from_device(self.device)
        self.user = user
        return user

    def replayer(self, path: str | None = None) -> Replayer:
        """The native core's C replay of ``path``: ``replay(writes, addrs, sizes, buf,
        deltas)`` runs the records through the path, each call timed with the native
        counter (kvm: the VM core's ``replay``; per-call: ``_native.vfio_replay`` on the
        device, all five steps per record; external user: the container core's ``replay``,
        the very entry the open handle calls)."""
        if self.core != "native":
            raise TypeError("replayer: the Python core is timed from Python")
        from .. import _native

        spec = PATHS[path or self.spec.name]
        if spec.kind == "kvm":
            core: Any = self.vm  # a native VM: its C replay
            return core.replay
        if spec.kind == "percall":
            return functools.partial(_native.vfio_replay, self.device)
        self._user()
        core = self.container
        return core.replay

    def dirty_pages(self) -> int:
        """Pages the path's dirty log holds now (get-and-clear): proof tracking was on."""
        if self.spec.kind == "kvm":
            return len(bitmap.from_bytes(self.vm.get_dirty_log(0)))
        return len(bitmap.from_bytes(self.container.get_dirty_bitmap(0, self.ram_size)))

    def close(self) -> None:
        if self.user is not None:
            self.user.close()
            self.user = None
        self.group.unset_container()
        self.group.remove()
        self.container.unmap_dma(0, self.ram_size)
        self.vm.close()
        self.space.close()
