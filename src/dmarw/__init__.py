"""dmarw: device models that read and write guest memory by DMA address.

Layers, each one module: :mod:`~dmarw.mm` (host memory and its lifetime) →
:mod:`~dmarw.kvm` (memslots, the KVM path) and :mod:`~dmarw.type1` (the IOMMU container) →
:mod:`~dmarw.vfio` (groups, devices, per-call path, external users); :mod:`~dmarw.bitmap`
and :mod:`~dmarw.locks`/:mod:`~dmarw.lockstat` serve them all.

Cores: :class:`Container`, :class:`Vm`, :class:`Group` and :class:`ExternalUser` are built on
the native core when ``dmarw._native`` is built and on the pure-Python reference under
``DMARW_CORE=python``; ``core="native"|"python"`` overrides, ``obj.core`` says which
(:mod:`~dmarw.core`, :mod:`~dmarw.backend`).  Importing dmarw only defines things.
"""

from typing import TYPE_CHECKING, Any

from . import lockstat
from .bitmap import from_bytes as bitmap_pages
from .errors import CoreUnavailable, DmaError
from .kvm import Vm
from .mm import PAGE_SIZE, AddressSpace
from .type1 import Container, Prot
from .vfio import (
    Device,
    ExternalUser,
    Group,
    new_group_lock,
    set_group_lock,
    vfio_pin_pages,
    vfio_unpin_pages,
)
from .vmm import KvmVm

if TYPE_CHECKING:
    from .vfio import vfio_dma_rw


def __getattr__(name: str) -> Any:
    """``vfio_dma_rw`` is chosen on first use (the selected core's per-call path)."""
    if name == "vfio_dma_rw":
        from . import vfio

        return vfio.vfio_dma_rw
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "PAGE_SIZE",
    "AddressSpace",
    "Container",
    "CoreUnavailable",
    "Device",
    "DmaError",
    "ExternalUser",
    "Group",
    "KvmVm",
    "Prot",
    "Vm",
    "bitmap_pages",
    "lockstat",
    "new_group_lock",
    "set_group_lock",
    "vfio_dma_rw",
    "vfio_pin_pages",
    "vfio_unpin_pages",
]
__version__ = "0.1.0"
