"""Named locks with statistics, and the three iommu lock strategies.

Every lock here belongs to a lock class (see :mod:`dmarw.lockstat`) so the lab can say what
each one costs.  Acquire time is measured only while a :func:`dmarw.lockstat.collect` block
is open (:data:`dmarw.lockstat.TIMING`); otherwise an acquisition costs the raw lock, one
atomic counter increment and one attribute test.

Strategies for the container's iommu lock (``Container(lock=...)``):

* ``mutex``: readers and writers exclusive (the kernel's ``iommu->lock``).
* ``rwsem``: readers (``dma_rw``, bitmap gets) share; map/unmap/pin exclusive.
* ``rcu``: readers take no lock; they read an immutable snapshot.  Writers serialise on a
  mutex, publish a new snapshot, and wait for a grace period (:meth:`Rcu.synchronize`)
  before returning, so nothing unpublished is reached afterwards.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any

from .backend import IommuLock
from .lockstat import TIMING, lock_class

_clock = time.perf_counter_ns


class Mutex:
    """A sleeping lock of class ``name``; ``raw`` may be a process-shared lock."""

    __slots__ = ("name", "_cls", "_lock", "_count")

    def __init__(self, name: str, raw: Any = None) -> None:
        self.name = name
        self._cls = lock_class(name)
        self._count = self._cls._count
        self._lock = raw if raw is not None else threading.Lock()

    def acquire(self) -> None:
        if TIMING.on:
            return self._acquire_timed()
        self._lock.acquire()
        next(self._count)
        return None

    def _acquire_timed(self) -> None:
        t0 = _clock()
        self._lock.acquire()
        self._cls.timed(_clock() - t0)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> Mutex:
        if TIMING.on:
            self._acquire_timed()
            return self
        self._lock.acquire()
        next(self._count)
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class RwSem:
    """A reader/writer semaphore of class ``name``; waiting writers block new readers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cls = lock_class(name)
        self._count = self._cls._count
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def _down_read(self) -> None:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def _down_write(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True

    def down_read(self) -> None:
        if TIMING.on:
            t0 = _clock()
            self._down_read()
            self._cls.timed(_clock() - t0)
            return
        self._down_read()
        next(self._count)

    def up_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def down_write(self) -> None:
        if TIMING.on:
            t0 = _clock()
            self._down_write()
            self._cls.timed(_clock() - t0)
            return
        self._down_write()
        next(self._count)

    def up_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class _Reader:
    __slots__ = ("ctr", "__weakref__")

    def __init__(self) -> None:
        self.ctr = 0


class Rcu:
    """Read-copy-update: readers publish the grace-period counter they started in.

    Reader: ``read_lock()`` stores the current counter in its per-thread record, then loads
    the protected pointer; ``read_unlock()`` stores 0.  Readers do not nest.  Writer:
    publishes the new pointer, then :meth:`synchronize` advances the counter and waits until
    no record holds a counter from before the advance.  Loads and stores of Python
    attributes are sequentially consistent under the GIL, so a reader that loaded the old
    pointer had stored its counter first and is waited for.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._cls = lock_class(name)
        self._count = self._cls._count
        self._gp = 1
        self._local = threading.local()
        # weak: a record lives as long as its thread's local, so exited threads drop out and
        # synchronize() scans only live readers (a list grew by one per thread ever seen)
        self._readers: weakref.WeakSet[_Reader] = weakref.WeakSet()
        self._registry_lock = threading.Lock()
        self._gp_lock = threading.Lock()

    def _record(self) -> _Reader:
        rec = _Reader()
        with self._registry_lock:
            self._readers.add(rec)
        self._local.rec = rec
        return rec

    def read_lock(self) -> _Reader:
        try:
            rec: _Reader = self._local.rec
        except AttributeError:
            rec = self._record()
        if TIMING.on:
            t0 = _clock()
            rec.ctr = self._gp
            self._cls.timed(_clock() - t0)
            return rec
        rec.ctr = self._gp
        next(self._count)
        return rec

    @staticmethod
    def read_unlock(rec: _Reader) -> None:
        rec.ctr = 0

    def synchronize(self) -> None:
        """Return only when every reader that started before the call has finished."""
        with self._gp_lock:
            old = self._gp
            self._gp = old + 1
            with self._registry_lock:
                readers = list(self._readers)
            for rec in readers:
                while 0 < rec.ctr <= old:
                    os.sched_yield()  # let the reader run; it is inside a short section


class MutexStrategy:
    name = "mutex"

    def __init__(self) -> None:
        self._m = Mutex("iommu.lock")

    def read_acquire(self) -> None:
        self._m.acquire()

    def read_release(self, token: Any) -> None:
        self._m.release()

    def write_acquire(self) -> None:
        self._m.acquire()

    def write_release(self) -> None:
        self._m.release()

    def synchronize(self) -> None:
        """Writers hold the lock exclusively: no reader can hold an old snapshot."""


class RwsemStrategy:
    name = "rwsem"

    def __init__(self) -> None:
        self._s = RwSem("iommu.lock")

    def read_acquire(self) -> None:
        self._s.down_read()

    def read_release(self, token: Any) -> None:
        self._s.up_read()

    def write_acquire(self) -> None:
        self._s.down_write()

    def write_release(self) -> None:
        self._s.up_write()

    def synchronize(self) -> None:
        """Writers exclude readers: nothing to wait for."""


class RcuStrategy:
    name = "rcu"

    def __init__(self) -> None:
        self._rcu = Rcu("iommu.rcu")
        self._m = Mutex("iommu.lock")

    def read_acquire(self) -> _Reader:
        return self._rcu.read_lock()

    def read_release(self, token: _Reader) -> None:
        token.ctr = 0

    def write_acquire(self) -> None:
        self._m.acquire()

    def write_release(self) -> None:
        self._m.release()

    def synchronize(self) -> None:
        self._rcu.synchronize()


class SrcuStrategy:
    """``kvm.srcu``: lock-free readers over an immutable snapshot; the writers serialise on
    ``kvm.slots_lock`` (held by the VM itself) and wait for a grace period."""

    name = "srcu"

    def __init__(self) -> None:
        self._rcu = Rcu("kvm.srcu")

    def read_acquire(self) -> _Reader:
        return self._rcu.read_lock()

    def read_release(self, token: _Reader) -> None:
        token.ctr = 0

    def write_acquire(self) -> None:
        """The writers' lock is ``kvm.slots_lock``."""

    def write_release(self) -> None:
        """See :meth:`write_acquire`."""

    def synchronize(self) -> None:
        self._rcu.synchronize()


__all__ = ["STRATEGIES", "IommuLock", "Mutex", "Rcu", "RwSem", "SrcuStrategy"]

STRATEGIES: dict[str, type[MutexStrategy] | type[RwsemStrategy] | type[RcuStrategy]] = {
    "mutex": MutexStrategy,
    "rwsem": RwsemStrategy,
    "rcu": RcuStrategy,
}
