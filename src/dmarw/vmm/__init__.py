"""A small VMM on real KVM: the VM and its memslots, the dirty-log modes, vCPUs, exits and
the device buses, one module each (:mod:`.vm`, :mod:`.dirty`, :mod:`.vcpu` with
:mod:`.state`, :mod:`.exits`, :mod:`.bus`; :mod:`.uapi` is the kernel ABI and
:mod:`.system` ``/dev/kvm`` itself).  The exit loop is the C extension ``dmarw._vmm``
(``src/dmarw/_vmm/``: ``bus.c``, ``loop.c``, ``dirty.c``, ``module.c``).
"""

from .exits import REASONS, Exit
from .system import info
from .vcpu import Vcpu
from .vm import DEFAULT_DIRTY, KvmVm, native_available

__all__ = ["DEFAULT_DIRTY", "REASONS", "Exit", "KvmVm", "Vcpu", "info", "native_available"]
