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
call costs only step 4 — the fix the 2020 thread arrived at.

The global ``vfio.group_lock`` can be replaced by a process-shared lock
(:func:`set_group_lock`, :func:`new_group_lock`), so that VMs in separate processes contend
on one host-wide lock.

Cores: a group is built on a core (``Group(name, core=...)``, default the selection of
:mod:`dmarw.core`) and says which (``group.core``); only a container of the same core can be
attached (``EINVAL`` otherwise), and an :class:`ExternalUser` takes its core from its
container.  On the native core a group's locks are native named locks
(``dmarw._native.Lock``: pthread mutexes counted and timed in the same lockstat classes),
its counters native atomics, and it owns a native ``GroupState`` that its methods update
under those same locks; :func:`vfio_dma_rw` on its devices is then one C call doing steps
1-5 with the same rules, errnos and lock counts.  The registry lock is made on first use:
native when the selected core is (process-shared from :func:`new_group_lock`).
"""

from __future__ import annotations

import errno
import itertools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import core as _core
from .errors import DmaError, addr, error, fail, rng
from .locks import Mutex
from .lockstat import count_value
from .type1 import Buffer, Container, Prot


def _native() -> Any:
    """The native side (:mod:`dmarw.native`), imported on first use; None if not built."""
    if not _core.native_available():
        return None
    from . import native

    return native


def _named_lock(name: str, native: bool) -> Any:
    """A lock of class ``name``: a native Lock or a Python Mutex."""
    if not native:
        return Mutex(name)
    n = _native()
    return n._native.Lock(*n.lock_class(name))


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
    """``vfio.group_list`` and the host-global ``vfio.group_lock`` guarding it (made on
    first use, :meth:`get_lock`)."""

    def __init__(self) -> None:
        self.lock: Any = None
        self.groups: dict[str, Group] = {}
        self._init = threading.Lock()
        self._native_ready = False

    def get_lock(self) -> Any:
        lock = self.lock
        if lock is None:
            try:
                native = _core.resolve() == "native"
            except DmaError:  # an unusable $DMARW_CORE: the reference lock
                native = False
            set_group_lock(_named_lock("vfio.group_lock", native))
            lock = self.lock
        return lock

    def native_setup(self) -> Any:
        """The native side, told once where the registry and the Python path are."""
        n = _native()
        with self._init:
            if not self._native_ready:
                n._native.vfio_setup(self.groups, vfio_dma_rw_py)
                self._native_ready = True
        return n


_registry = _Registry()


def set_group_lock(raw: Any) -> None:
    """Use ``raw`` as the host-global ``vfio.group_lock``: a lock from :func:`new_group_lock`
    (a native process-shared lock on the native core), a dmarw ``Mutex`` or native lock as
    is, or any raw lock (e.g. a ``multiprocessing.Lock``) behind a ``Mutex``.  The native
    per-call path runs only while the registry lock is native."""
    n = _native()
    is_native = n is not None and isinstance(raw, n._native.Lock)
    lock = raw if is_native or isinstance(raw, Mutex) else Mutex("vfio.group_lock", raw)
    _registry.lock = lock
    if n is not None:
        _registry.native_setup()
        n._native.vfio_set_group_lock(lock if is_native else None)


def new_group_lock(core: str | None = None) -> Any:
    """A host-global ``vfio.group_lock`` for VMs in forked processes (make it before the
    fork, :func:`set_group_lock` it in each process): on the native core a pthread mutex
    with ``PTHREAD_PROCESS_SHARED`` in a ``MAP_SHARED`` anonymous mapping, else a
    ``multiprocessing.Lock``."""
    if _core.resolve(core) != "native":
        import multiprocessing

        return multiprocessing.get_context("fork").Lock()
    n = _native()
    return n._native.Lock(*n.lock_class("vfio.group_lock"), shared=True)


class Device:
    """A device in a group; an unbound device makes the group not viable."""

    def __init__(self, group: Group, name: str) -> None:
        self.group = group
        self.name = name
        self.bound = True
        self.native_state: Any = group._state  # what the native per-call path looks up

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
        self.core = _core.resolve(core)
        native = self.core == "native"
        if native:
            _registry.native_setup()
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
            N = _native()._native
            self.container_users = N.Atomic(0)
            self.refs = N.Atomic(1)
            self._state = N.GroupState(
                name, self.unbound_lock, self.device_lock, self.mutex, self.refs, self.container_users
            )
        self.devices: dict[str, Device] = {}
        self.unbound: set[str] = set()
        self.container: Container | None = None
        with _registry.get_lock():
            if name in _registry.groups:
                raise fail(errno.EEXIST, f"group {name!r} is already registered")
            _registry.groups[name] = self

    def remove(self) -> None:
        """Unregister the group (``EBUSY`` while users or external references remain)."""
        with _registry.get_lock():
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
        if not isinstance(container, Container):
            raise fail(errno.EINVAL, f"group {self.name!r}: {type(container).__name__} is not a Container")
        if container.core != self.core:
            raise fail(
                errno.EINVAL,
                f"group {self.name!r} is on the {self.core} core, the container on the {container.core} core",
            )
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
        with _registry.get_lock():
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
        return f"{op} iova {addr(iova)} npage {addr(arg)}"
    try:
        return f"{op} {rng(iova, memoryview(arg).nbytes)}"
    except (TypeError, ValueError):
        return f"{op} iova {addr(iova)}"


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


PerCall = Callable[[Device, int, Buffer, bool], None]


def percall_entry() -> PerCall:
    """The per-call path of the selected core: the native one-call ``vfio_dma_rw`` (which
    runs a device of a Python group through :func:`vfio_dma_rw_py`), or the Python path."""
    try:
        native = _core.resolve() == "native"
    except DmaError:
        native = False
    if not native:
        return vfio_dma_rw_py
    fn: PerCall = _registry.native_setup()._native.vfio_dma_rw
    return fn


if TYPE_CHECKING:
    vfio_dma_rw: PerCall
    """The per-call path (steps 1-5 of the module docstring) around one ``dma_rw``."""


def __getattr__(name: str) -> Any:
    """``vfio_dma_rw`` is chosen on first use (:func:`percall_entry`), not at import."""
    if name == "vfio_dma_rw":
        fn = globals()["vfio_dma_rw"] = percall_entry()
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    (``EBUSY``) until :meth:`close`.  Use after close is ``EINVAL``.  The handle is on its
    container's core (``user.core``); on the native core ``dma_rw`` is the C handle's own
    method (one C call, checking the handle is open).
    """

    core = "python"

    def __new__(cls, group: Group, container: Container) -> ExternalUser:
        if cls is ExternalUser and getattr(container, "core", None) == "native":
            from .native import NativeExternalUser

            return NativeExternalUser.__new__(NativeExternalUser)  # type: ignore[call-arg]
        return super().__new__(cls)

    def __init__(self, group: Group, container: Container) -> None:
        if not isinstance(container, Container) or container.core != self.core:
            raise fail(errno.EINVAL, f"external user: {container!r} is not a {self.core}-core container")
        if getattr(group, "core", self.core) != self.core:
            raise fail(errno.EINVAL, f"external user: group {group.name!r} is on the {group.core} core")
        self.group = group
        self.container: Container | None = container
        self._lock = threading.Lock()
        self._attach(container, group.name)

    # -- the backend hooks: the Python core holds the container in ``self.container`` -----
    def _attach(self, container: Container, group_name: str) -> None:
        """Hold ``container`` for the reader path (the native core's C handle keeps its own)."""

    def _detach(self) -> None:
        """Drop the reader path's hold (under the handle's lock, at close)."""

    @classmethod
    def from_device(cls, device: Device) -> ExternalUser:
        """Steps 1-3 once (``vfio.group_lock``, viability, ``group.mutex``)."""
        g, c = _enter(device, "external user")
        try:
            return cls(g, c)
        except BaseException:
            _leave(g)
            raise

    def _closed(self, what: str) -> OSError:
        return error("closed_handle", what, self.group.name)

    def dma_rw(self, iova: int, buf: Buffer, write: bool) -> None:
        """The container's ``dma_rw``: iommu lock (read side) and the mm reference only."""
        c = self.container
        if c is None:
            raise self._closed("dma_rw")
        c.dma_rw(iova, buf, write)

    def dma_read(self, iova: int, n: int) -> bytes:
        """Read ``n`` bytes at ``iova`` (see :meth:`dma_rw`)."""
        c = self.container
        if c is None:
            raise self._closed("dma_read")
        return c.dma_read(iova, n)

    def dma_write(self, iova: int, data: Buffer) -> None:
        """Write ``data`` at ``iova`` (see :meth:`dma_rw`)."""
        c = self.container
        if c is None:
            raise self._closed("dma_write")
        c.dma_rw(iova, data, True)

    def pin_pages(self, iova: int, npage: int, prot: Prot) -> list[int]:
        """The container's pin: iommu lock (write side) and the mm reference only."""
        c = self.container
        if c is None:
            raise self._closed("pin_pages")
        return c.pin_pages(iova, npage, prot)

    def unpin_pages(self, iova: int, npage: int) -> None:
        """The container's unpin: iommu lock (write side) only."""
        c = self.container
        if c is None:
            raise self._closed("unpin_pages")
        c.unpin_pages(iova, npage)

    def close(self) -> None:
        """Drop the references (idempotent)."""
        with self._lock:
            if self.container is None:
                return
            self.container = None
            self._detach()
        _leave(self.group)

    def __enter__(self) -> ExternalUser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
