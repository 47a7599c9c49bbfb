"""Core selection: the native core (default when built) or the pure-Python reference.

Every public object — :class:`dmarw.Container`, :class:`dmarw.Vm`, :class:`dmarw.Group`,
:class:`dmarw.ExternalUser` — is built on one core, which it reports as ``obj.core``
(``"native"`` or ``"python"``).  The core is, in order: the ``core=`` keyword; else
``$DMARW_CORE``; else native when ``dmarw._native`` is built, python otherwise.  An unknown
name, or ``native`` when it is not built, is :class:`~dmarw.errors.CoreUnavailable` (a
:class:`~dmarw.DmaError`) when an object is built — never at import.

Both cores implement the same backend interface (:mod:`dmarw.backend`) under one set of
rules; :func:`container` and :func:`vm` are the same constructors spelled as functions.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

from .errors import CoreUnavailable

if TYPE_CHECKING:
    from .kvm import Vm
    from .mm import AddressSpace
    from .type1 import Container

CORES = ("python", "native")
ENV = "DMARW_CORE"


def native_available() -> bool:
    """True when the extension ``dmarw._native`` imports."""
    try:
        from . import _native
    except ImportError:
        return False
    # without the built .so, the C sources' folder src/dmarw/_native/ imports as an empty
    # namespace package: that is no native core
    return getattr(_native, "__file__", None) is not None


def resolve(core: str | None = None) -> str:
    """The core to use: ``core`` if given, else ``$DMARW_CORE``, else native when built."""
    if core is None:
        env = os.environ.get(ENV, "").strip().lower()
        name, source = (env or None), f"{ENV}={env!r}"
    else:
        name, source = core, f"core={core!r}"
    if name is None:
        return "native" if native_available() else "python"
    if name not in CORES:
        raise CoreUnavailable(errno.EINVAL, f"{source}: the core is 'native' or 'python'")
    if name == "native" and not native_available():
        raise CoreUnavailable(
            errno.ENOSYS,
            f"{source}: the native core (dmarw._native) is not built; reinstall with a C "
            "compiler (pip install -e .) or use DMARW_CORE=python",
        )
    return name


def classes(core: str | None = None) -> tuple[type[Container], type[Vm]]:
    """(Container class, Vm class) whose instances the selected core builds (for
    ``isinstance``/``type`` checks; build objects with :func:`container`/:func:`vm` or
    ``Container(core=...)``: the public classes build the selected core by default)."""
    if resolve(core) == "native":
        from .native import NativeContainer, NativeVm

        return NativeContainer, NativeVm
    from .kvm import Vm
    from .type1 import Container

    return Container, Vm


def container(core: str | None = None, **kwargs: Any) -> Container:
    """A container of the selected core: ``container(lock="rcu", mm_ref="mmget_not_zero")``."""
    from .type1 import Container

    return Container(core=core, **kwargs)


def vm(space: AddressSpace, core: str | None = None) -> Vm:
    """A VM of the selected core over ``space``."""
    from .kvm import Vm

    return Vm(space, core=core)


def cycles_source(core: str | None = None) -> tuple[str, float]:
    """(counter name, ticks per second) for the lab: the native counter when native."""
    if resolve(core) == "native":
        from . import native

        return native.counter_kind(), native.tsc_hz()
    return "perf_counter_ns", 1e9
