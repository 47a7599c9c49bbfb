"""A device's way to guest memory on each of the lab's six paths, as one ``dma_rw``.

:func:`path_env` builds the lab's :class:`~dmarw.lab.paths.VmEnv` for a path (guest RAM a
memfd at iova == gpa == 0, the container on the path's lock and mm reference with dirty
tracking on, the group, the device, the external-user handle); with ``kvm=`` its VM is a
real :class:`dmarw.KvmVm` on the same memory instead of the simulated :class:`dmarw.Vm`.
:func:`dma_rw_for` turns the path's accessor into the one callable a device model uses:
``dma_rw(addr, buf, write)`` — ``KvmVm``/``Vm`` ``read_guest_into``/``write_guest`` on
``kvm``, ``vfio_dma_rw`` or the handle's ``dma_rw`` on the vfio paths.
"""

from __future__ import annotations

from typing import Any

from ..lab.paths import PATHS, VmEnv
from .gpu import DmaRw

PATH_NAMES = tuple(PATHS)


def path_env(path: str, ram_size: int, *, core: str | None = None, kvm: dict[str, Any] | None = None,
             name: str = "guest") -> VmEnv:
    """The lab's environment for ``path``; ``kvm`` (keyword arguments of ``KvmVm``, e.g.
    ``{"dirty": "ring"}``) swaps in a real KVM VM with memslot 0 logging dirty pages."""
    env = VmEnv(path, ram_size, name=name, core=core)
    if kvm is not None:
        from ..vmm import KvmVm

        try:
            vm = KvmVm(env.space, **kvm)
            vm.set_memslot(0, 0, ram_size, env.hva, dirty_log=True)
        except BaseException:
            env.close()
            raise
        env.vm.close()
        env.vm = vm  # type: ignore[assignment]  # KvmVm keeps Vm's memslot and access API
    return env


def dma_rw_for(env: VmEnv) -> DmaRw:
    """The path's accessor as one ``dma_rw(addr, buf, write)``."""
    acc = env.access()
    if acc.rw is not None:
        return acc.rw
    read, write = acc.read, acc.write
    assert read is not None and write is not None

    def kvm_rw(addr: int, buf: memoryview, is_write: bool) -> None:
        if is_write:
            write(addr, buf)
        else:
            read(addr, buf)

    return kvm_rw
