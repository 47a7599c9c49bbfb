"""The VFIO layer: groups, devices, the per-call path and external-user handles.

Per-call path (the 2020 kernel's ``vfio_dma_rw(dev, ...)``), on every call:

1. look the group up in the global registry under ``vfio.group_lock`` and take a group
   reference;
2. check viability: the unbound list under ``group.unbound_lock``, every device bound under
   ``group.device_lock``;
3. add a container user under ``group.mutex`` (no container → ``EINVAL``);
4. the container's own path: its iommu lock and a reference on the owner's address space;
5. drop the container user and the group reference (atomics, no lock).

:class:`ExternalUser` does steps 1–3 once and keeps the references until closed, so each
call costs only step 4 — the fix the seed thread arrived at.

The global ``vfio.group_lock`` can be replaced by a process-shared lock
(:func:`set_group_lock`, :func:`new_group_lock`), so that VMs in separate processes contend
on one host-wide lock.

Native core: when the native core is selected (:mod:`dmarw.core`), a group's locks are
native named locks (``dmarw._native.Lock``: pthread mutexes counted and timed in the same
lockstat classes), its counters native atomics, and it owns a native ``GroupState`` that its
methods update under those same locks; the registry lock is a native lock too (process-shared
from :func:`new_group_lock`).  :func:`vfio_dma_rw` is then one C call doing steps 1-5 with
the same rules, errnos and lock counts, and the container's native ``dma_rw`` in between
(a Python container's ``dma_rw`` is called from C).  Anything else (a Python group, a
non-native registry lock, an unusual argument) takes the Python path below, which is also
the reference (``DMARW_CORE=python``).
"""

from __future__ import annotations

import errno
import itertools
import threading
from collections.abc import Callable
from typing import Any

from .errors import DmaError, fail, rng
from .locks import Mutex
from .lockstat import count_value
from .type1 import Buffer, Container, Prot


def _load_native() -> Any:
    """``dmarw._native`` when it is built, else None."""
    try:
        from . import native
    except ImportError:
        return None
    return native._native


def _native_selected(core_name: str | None = None) -> bool:
    """True when ``core_name`` (default: the selection, :func:`dmarw.core.resolve`) is native."""
    if _N is None:
        return False
    from . import core

    try:
        return core.resolve(core_name) == "native"
    except core.CoreUnavailable:
        return False


_N: Any = _load_native()
_default_native = _native_selected()  # the registry lock and vfio_dma_rw, chosen at import


def _named_lock(name: str, native: bool) -> Any:
    """A lock of class ``name``: a native Lock or a Python Mutex."""
    if not native:
        return Mutex(name)
    from . import lockstat

    return _N.Lock(lockstat.lock_class(name))


class _Atomic:
    """A counter standing in for the kernel's ``atomic_t``/``kref`` (not a named lock).

    Two ``itertools.count`` objects, one bumped per increment and one per decrement: each
    bump is one C-level ``next()``, atomic under the GIL, with no lock and no Python frame
    (``inc``/``dec`` are the counters' own ``__next__``).  :attr:`value` reads the decrements
    first, so a decrement racing the read can only make it over-report, never under-report:
    an ``EBUSY`` check never misses a user.
    """

    __slots__ = ("_incs", "_decs", "inc", "dec")

    def __init__(self, value: int = 0) -> None:
        self._incs = itertools.count(value)
        self._decs = itertools.count()
        self.inc: Callable[[], int] = self._incs.__next__
        self.dec: Callable[[], int] = self._decs.__next__

    @property
    def value(self) -> int:
        decs = count_value(self._decs)
        return count_value(self._incs) - decs


class _Registry:
    """``vfio.group_list`` and the host-global ``vfio.group_lock`` guarding it."""

    def __init__(self) -> None:
        self.lock: Any = _named_lock("vfio.group_lock", _default_native)
        self.groups: dict[str, Group] = {}


_registry = _Registry()


def set_group_lock(raw: Any) -> None:
    """Use ``raw`` as the host-global ``vfio.group_lock``: a lock from :func:`new_group_lock`
    (a native process-shared lock on the native core), a dmarw ``Mutex`` or native lock as
    is, or any raw lock (e.g. a ``multiprocessing.Lock``) behind a ``Mutex``.  The native
    per-call path runs only while the registry lock is native."""
    is_native = _N is not None and isinstance(raw, _N.Lock)
    lock = raw if is_native or isinstance(raw, Mutex) else Mutex("vfio.group_lock", raw)
    _registry.lock = lock
    if _N is not None:
        _N.vfio_set_group_lock(lock if is_native else None)


def new_group_lock(core: str | None = None) -> Any:
    """A host-global ``vfio.group_lock`` for VMs in forked processes (make it before the
    fork, :func:`set_group_lock` it in each process): on the native core a pthread mutex
    with ``PTHREAD_PROCESS_SHARED`` in a ``MAP_SHARED`` anonymous mapping, else a
    ``multiprocessing.Lock``."""
    if not _native_selected(core):
        import multiprocessing

        return multiprocessing.get_context("fork").Lock()
    from . import lockstat

    return _N.Lock(lockstat.lock_class("vfio.group_lock"), shared=True)


class Device:
    """A device in a group; an unbound device makes the group not viable."""

    def __init__(self, group: Group, name: str) -> None:
        self.group = group
        self.name = name
        self.bound = True
        if group._state is not None:
            self._vstate = group._state  # what the native per-call path looks up

    def unbind(self) -> None:
        """Unbind from the vfio driver: the device joins the group's unbound list."""
        g = self.group
        st = g._state
        with g.device_lock:
            if not self.bound:
                return
            self.bound = False
            if st is not None:
                st.devices_unbound += 1
        with g.unbound_lock:
            g.unbound.add(self.name)
            if st is not None:
                st.unbound = len(g.unbound)

    def bind(self) -> None:
        """Bind back to the vfio driver: leave the unbound list (idempotent)."""
        g = self.group
        st = g._state
        with g.unbound_lock:
            g.unbound.discard(self.name)
            if st is not None:
                st.unbound = len(g.unbound)
        with g.device_lock:
            if st is not None and not self.bound:
                st.devices_unbound -= 1
            self.bound = True

    def __repr__(self) -> str:
        return f"Device({self.group.name}/{self.name})"


class Group:
    """An IOMMU group: its devices, its container and the references held on it."""

    def __init__(self, name: str, *, core: str | None = None) -> None:
        """``core``: ``python`` or ``native`` locks and state (default: the selection)."""
        native = _native_selected(core)
        self.name = name
        self._state: Any = None
        self.unbound_lock: Any = _named_lock("group.unbound_lock", native)
        self.device_lock: Any = _named_lock("group.device_lock", native)
        self.mutex: Any = _named_lock("group.mutex", native)
        self.container_users: Any
        self.refs: Any
        if not native:
            self.container_users = _Atomic()
            self.refs = _Atomic(1)  # the registry's own reference
        else:
            self.container_users = _N.Atomic(0)
            self.refs = _N.Atomic(1)
            self._state = _N.GroupState(
                name, self.unbound_lock, self.device_lock, self.mutex, self.refs, self.container_users
            )
        self.devices: dict[str, Device] = {}
        self.unbound: set[str] = set()
        self.container: Container | None = None
        with _registry.lock:
            if name in _registry.groups:
                raise fail(errno.EEXIST, f"group {name!r} is already registered")
            _registry.groups[name] = self

    def remove(self) -> None:
        """Unregister the group (``EBUSY`` while users or external references remain)."""
        with _registry.lock:
            if self.container_users.value or self.refs.value > 1:
                raise fail(errno.EBUSY, f"group {self.name!r} still has users")
            _registry.groups.pop(self.name, None)

    def add_device(self, name: str) -> Device:
        """Add a bound device under ``group.device_lock`` (``EEXIST`` for a name in use)."""
        with self.device_lock:
            if name in self.devices:
                raise fail(errno.EEXIST, f"device {name!r} already in group {self.name!r}")
            dev = Device(self, name)
            self.devices[name] = dev
            return dev

    def viable(self) -> bool:
        """No device on the unbound list and every device bound."""
        with self.unbound_lock:
            if self.unbound:
                return False
        with self.device_lock:
            for d in self.devices.values():
                if not d.bound:
                    return False
            return True

    def set_container(self, container: Container) -> None:
        """Attach ``container`` under ``group.mutex`` (``EBUSY`` if one is attached)."""
        with self.mutex:
            if self.container is not None:
                raise fail(errno.EBUSY, f"group {self.name!r} already has a container")
            self.container = container
            if self._state is not None:
                self._state.set_container(container)

    def unset_container(self) -> None:
        """Detach the container (``EBUSY`` while any user holds it, ``EINVAL`` if none)."""
        with self.mutex:
            if self.container is None:
                raise fail(errno.EINVAL, f"group {self.name!r} has no container")
            if self.container_users.value:
                raise fail(errno.EBUSY, f"group {self.name!r}: container has {self.container_users.value} user(s)")
            self.container = None
            if self._state is not None:
                self._state.set_container(None)

    # -- references (steps 1-3 and 5 of the module docstring) ---------------------------------
    @staticmethod
    def get_from_device(device: Device) -> Group:
        """Step 1: find the device's group under ``vfio.group_lock`` and take a reference."""
        if not isinstance(device, Device):
            raise fail(errno.EINVAL, f"{device!r} is not a Device")
        with _registry.lock:
            g = _registry.groups.get(device.group.name)
            if g is not device.group:
                raise fail(errno.ENODEV, f"{device!r}: group is not registered")
            g.refs.inc()
        return g

    def add_container_user(self) -> Container:
        """Steps 2-3: check viability, then count a container user under ``group.mutex``."""
        if not self.viable():
            raise fail(errno.EINVAL, f"group {self.name!r} is not viable (unbound device)")
        with self.mutex:
            c = self.container
            if c is None:
                raise fail(errno.EINVAL, f"group {self.name!r} is not attached to a container")
            self.container_users.inc()
        return c

    def put(self) -> None:
        """Drop a group reference (an atomic, no lock)."""
        self.refs.dec()


def _enter(
    device: Device, op: str, iova: int | None = None, arg: Buffer | int | None = None
) -> tuple[Group, Container]:
    """Steps 1-3; on failure every reference taken so far is dropped again.

    The error message (naming ``op`` and its address: ``arg`` is the buffer or the page
    count) is built only on failure, so the success path formats nothing.
    """
    try:
        g = Group.get_from_device(device)
    except DmaError as e:
        raise fail(e.errno or errno.EINVAL, f"{_where(op, iova, arg)}: {e.detail}") from None
    try:
        return g, g.add_container_user()
    except DmaError as e:
        g.put()
        raise fail(e.errno or errno.EINVAL, f"{_where(op, iova, arg)}: {e.detail}") from None
    except BaseException:
        g.put()
        raise


def _where(op: str, iova: int | None, arg: Buffer | int | None) -> str:
    """``op iova+len`` (or ``op iova npage N``) for error messages."""
    if iova is None or arg is None:
        return op
    if isinstance(arg, int):
        return f"{op} iova {iova!r} npage {arg!r}"
    try:
        return f"{op} {rng(iova, memoryview(arg).nbytes)}"
    except (TypeError, ValueError):
        return f"{op} iova {iova!r}"


def _leave(g: Group) -> None:
    g.container_users.dec()
    g.put()


def vfio_dma_rw_py(device: Device, iova: int, buf: Buffer, write: bool) -> None:
    """The per-call path in Python: every reference and lock taken and dropped around one
    access (the reference; :func:`vfio_dma_rw` is this, or its one-call native version)."""
    g, c = _enter(device, "vfio_dma_rw", iova, buf)
    try:
        c.dma_rw(iova, buf, write)
    finally:
        _leave(g)


vfio_dma_rw: Callable[[Device, int, Buffer, bool], None] = vfio_dma_rw_py
"""The per-call path (steps 1-5 of the module docstring) around one ``dma_rw``."""
if _N is not None:
    _N.vfio_setup(_registry.groups, vfio_dma_rw_py)
    set_group_lock(_registry.lock)
if _default_native:
    vfio_dma_rw = _N.vfio_dma_rw


def vfio_pin_pages(device: Device, iova: int, npage: int, prot: Prot) -> list[int]:
    """Per-call pin: steps 1-3, then the container's pin (iommu lock, write side)."""
    g, c = _enter(device, "vfio_pin_pages", iova, npage)
    try:
        return c.pin_pages(iova, npage, prot)
    finally:
        _leave(g)


def vfio_unpin_pages(device: Device, iova: int, npage: int) -> None:
    """Per-call unpin: steps 1-3, then the container's unpin (iommu lock, write side)."""
    g, c = _enter(device, "vfio_unpin_pages", iova, npage)
    try:
        c.unpin_pages(iova, npage)
    finally:
        _leave(g)


class ExternalUser:
    """Group and container-user references held across calls (``vfio_group_get_external_user``).

    Each call then takes only the container's iommu lock and the address-space reference.
    Viability is checked once, when the handle is taken; the container cannot be detached
    (``EBUSY``) until :meth:`close`.  Use after close is ``EINVAL``.
    """

    def __init__(self, group: Group, container: Container) -> None:
        self.group = group
        self.container: Container | None = container
        self._lock = threading.Lock()
        native_rw = getattr(container, "native_dma_rw", None)
        if native_rw is not None:  # native core: call its C entry directly until close()
            self.dma_rw = native_rw  # type: ignore[method-assign]

    @classmethod
    def from_device(cls, device: Device) -> ExternalUser:
        """Steps 1-3 once (``vfio.group_lock``, viability, ``group.mutex``)."""
        g, c = _enter(device, "external user")
        return cls(g, c)

    def _closed(self, what: str) -> OSError:
        return fail(errno.EINVAL, f"{what}: external user of group {self.group.name!r} is closed")

    def dma_rw(self, iova: int, buf: Buffer, write: bool) -> None:
        """The container's ``dma_rw``: iommu lock (read side) and the mm reference only."""
        c = self.container
        if c is None:
            raise self._closed(_where("dma_rw", iova, buf))
        c.dma_rw(iova, buf, write)

    def dma_read(self, iova: int, n: int) -> bytes:
        """Read ``n`` bytes at ``iova`` (see :meth:`dma_rw`)."""
        c = self.container
        if c is None:
            raise self._closed(f"dma_read iova {iova!r} len {n!r}")
        return c.dma_read(iova, n)

    def dma_write(self, iova: int, data: Buffer) -> None:
        """Write ``data`` at ``iova`` (see :meth:`dma_rw`)."""
        c = self.container
        if c is None:
            raise self._closed(_where("dma_write", iova, data))
        c.dma_rw(iova, data, True)

    def pin_pages(self, iova: int, npage: int, prot: Prot) -> list[int]:
        """The container's pin: iommu lock (write side) and the mm reference only."""
        c = self.container
        if c is None:
            raise self._closed(_where("pin_pages", iova, npage))
        return c.pin_pages(iova, npage, prot)

    def unpin_pages(self, iova: int, npage: int) -> None:
        """The container's unpin: iommu lock (write side) only."""
        c = self.container
        if c is None:
            raise self._closed(_where("unpin_pages", iova, npage))
        c.unpin_pages(iova, npage)

    def close(self) -> None:
        """Drop the references (idempotent)."""
        with self._lock:
            if self.container is None:
                return
            self.container = None
            self.__dict__.pop("dma_rw", None)
        _leave(self.group)

    def __enter__(self) -> ExternalUser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
