"""Core selection: the pure-Python reference core or the native one.

``DMARW_CORE=python`` selects the reference (:class:`~dmarw.type1.Container`,
:class:`~dmarw.kvm.Vm`); ``DMARW_CORE=native`` the native core
(:class:`~dmarw.native.NativeContainer`, :class:`~dmarw.native.NativeVm`) and fails loudly
(:class:`CoreUnavailable`) if the extension ``dmarw._native`` is not built; unset, native
when it is built, else Python.  Code that should follow the selection builds its objects
with :func:`container` and :func:`vm` (or takes the classes from :func:`classes`).
"""

from __future__ import annotations

import os
from typing import Any

from .kvm import Vm
from .mm import AddressSpace
from .type1 import Container

CORES = ("python", "native")
ENV = "DMARW_CORE"


class CoreUnavailable(ImportError):
    """The native core was asked for but ``dmarw._native`` is not built (or failed to load)."""


def native_available() -> bool:
    """True when the extension imports."""
    try:
        from . import native  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(core: str | None = None) -> str:
    """The core to use: ``core`` if given, else ``$DMARW_CORE``, else native when built."""
    name = core if core is not None else os.environ.get(ENV, "").strip().lower() or None
    if name is None:
        return "native" if native_available() else "python"
    if name not in CORES:
        raise ValueError(f"{ENV}={name!r}: the core is one of {CORES}")
    if name == "native" and not native_available():
        raise CoreUnavailable(
            "the native core (dmarw._native) is not built: run `pip install -e .` with a C "
            "compiler, or select DMARW_CORE=python"
        )
    return name


def classes(core: str | None = None) -> tuple[type[Container], type[Vm]]:
    """(Container class, Vm class) of the selected core."""
    if resolve(core) == "native":
        from .native import NativeContainer, NativeVm

        return NativeContainer, NativeVm
    return Container, Vm


def container(core: str | None = None, **kwargs: Any) -> Container:
    """A container of the selected core: ``container(lock="rcu", mm_ref="mmget_not_zero")``."""
    return classes(core)[0](**kwargs)


def vm(space: AddressSpace, core: str | None = None) -> Vm:
    """A VM of the selected core over ``space``."""
    return classes(core)[1](space)


def cycles_source(core: str | None = None) -> tuple[str, float]:
    """(counter name, ticks per second) for the lab: the native counter when native."""
    if resolve(core) == "native":
        from . import native

        return native.counter_kind(), native.tsc_hz()
    return "perf_counter_ns", 1e9
