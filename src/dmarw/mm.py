"""The VMM process's memory (the "mm"): real shared mappings with a real lifetime.

An :class:`AddressSpace` owns :class:`Region` objects, each one ``mmap`` of anonymous
shared memory, a memfd or a file.  Host virtual addresses (hva) are the real addresses of
those mappings in this process.

Lifetime: the owner holds one user reference.  :meth:`AddressSpace.close` is the owner's
exit: the owner's reference is dropped and no new user is admitted (``mmget_not_zero`` and
``get_task_mm`` both refuse).  The mappings are released only when the last user drops
its reference, so an access that holds a reference never touches freed memory.

Locks: ``task_lock`` (lock class ``task_lock``) guards the task → mm link for
``get_task_mm``; the user count is guarded by an internal lock standing in for the
kernel's atomic (the native core keeps a real atomic of its own, told of the owner's exit
through :meth:`AddressSpace.on_exit`, and of a region's release through
:meth:`Region.on_release`).

Sizes: a mapping is a positive multiple of 4096 bytes and at most :data:`MMAP_MAX`
(128 TiB, the x86-64 user address space); ``backing`` is ``"anon"``, ``"memfd"`` or a file
path given as a :class:`pathlib.Path` (any other string is refused, so a typo never
creates a file).
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import mmap as _mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import addr, check_access, check_rw, error, fail, rng
from .locks import Mutex

PAGE_SIZE = 4096
PAGE_SHIFT = 12
MMAP_MAX = 1 << 47  # the x86-64 user address space: no single mapping can be larger
_LAZY_ZERO = 1 << 20  # buffers from this size are anonymous mappings (untouched until used)


def zeroed(op: str, a: int, n: int) -> bytearray | _mmap.mmap:
    """A zeroed buffer of ``n`` bytes to read ``n`` bytes at ``a`` into: a ``bytearray``, or
    from 1 MiB an anonymous private mapping whose pages stay untouched until the copy (an
    access that then fails costs no memory).  ``ENOMEM`` when it cannot be had."""
    try:
        if n < _LAZY_ZERO:
            return bytearray(n)
        return _mmap.mmap(-1, n, flags=_mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS)
    except (MemoryError, OverflowError, OSError):
        raise error("no_memory", op, a, n) from None


def _address_of(m: _mmap.mmap) -> int:
    probe = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe


@dataclass(eq=False)
class Region:
    """One mapping: ``size`` bytes at ``hva`` backed by ``mm`` (and ``fd`` when shareable)."""

    hva: int
    size: int
    map: _mmap.mmap
    backing: str
    fd: int | None = None
    released: bool = field(default=False)
    _release_hooks: list[Callable[[], object]] = field(default_factory=list, repr=False)

    @property
    def end(self) -> int:
        return self.hva + self.size

    def on_release(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` when the region is released (at once if it already is)."""
        self._release_hooks.append(fn)
        if self.released:
            fn()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        for fn in self._release_hooks:
            fn()
        try:
            self.map.close()
        except BufferError:  # a live memoryview somewhere: leave it to the GC, never reuse
            pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class AddressSpace:
    """Guest RAM's host side: ``mmap``/``munmap``, byte access, and the user count."""

    def __init__(self, *, kthread: bool = False) -> None:
        self.task_lock = Mutex("task_lock")
        self.kthread = kthread
        # one snapshot published whole, so a lock-free lookup never pairs a new start list
        # with an old region tuple: (regions sorted by hva, their start hvas)
        self._snap: tuple[tuple[Region, ...], list[int]] = ((), [])
        self._map_lock = threading.Lock()
        self._users = 1  # the owner's reference
        self._exited = False
        self._users_lock = threading.Lock()
        self._exit_hooks: list[Callable[[], object]] = []

    # -- lifetime -------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once the owner has exited."""
        return self._exited

    @property
    def users(self) -> int:
        return self._users

    @property
    def released(self) -> bool:
        """True once the last user is gone and every mapping has been freed."""
        return self._users == 0

    def mmget_not_zero(self) -> bool:
        """Count a user unless the owner has exited (no task lock)."""
        with self._users_lock:
            if self._users == 0 or self._exited:
                return False
            self._users += 1
            return True

    def get_task_mm(self) -> bool:
        """The 2020 path: under ``task_lock``, refuse an exited or kernel-thread owner, count."""
        with self.task_lock:
            if self._exited or self.kthread:
                return False
            with self._users_lock:
                self._users += 1
            return True

    def mmput(self) -> None:
        """Drop a user; the last one frees every mapping."""
        with self._users_lock:
            if self._users <= 0:
                raise fail(errno.EINVAL, "mmput without a user reference")
            self._users -= 1
            last = self._users == 0
        if last:
            with self._map_lock:
                regions, self._snap = self._snap[0], ((), [])
            for r in regions:
                r.release()

    def on_exit(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` when the owner exits (at once if it already has), under task_lock."""
        with self.task_lock:
            self._exit_hooks.append(fn)
            if self._exited:
                fn()

    def close(self) -> None:
        """The owner exits: refuse new users, drop the owner's reference (idempotent)."""
        with self.task_lock:
            if self._exited:
                return
            self._exited = True
            for fn in self._exit_hooks:
                fn()
        self.mmput()

    # -- mappings -------------------------------------------------------------------------
    def mmap(self, size: int, *, backing: str | os.PathLike[str] = "anon") -> int:
        """Map ``size`` bytes (a positive multiple of 4096, at most :data:`MMAP_MAX`) backed
        by ``"anon"``, ``"memfd"`` or the file at a :class:`pathlib.Path`; returns the hva."""
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % PAGE_SIZE:
            raise fail(errno.EINVAL, f"mmap size {addr(size)} is not a positive multiple of the page size (4096)")
        if size > MMAP_MAX:
            raise fail(errno.ENOMEM, f"mmap size {addr(size)} is more than any address space can map ({MMAP_MAX:#x})")
        if isinstance(backing, str) and backing not in ("anon", "memfd"):
            raise fail(errno.EINVAL, f"mmap backing {backing!r}: 'anon', 'memfd' or a pathlib.Path to a file")
        if not isinstance(backing, str | os.PathLike):
            raise fail(errno.EINVAL, f"mmap backing {backing!r}: 'anon', 'memfd' or a pathlib.Path to a file")
        if self._exited:
            raise fail(errno.EFAULT, f"mmap of {size:#x} bytes: the owner has exited")
        fd: int | None = None
        kind = backing if isinstance(backing, str) else os.fspath(backing)
        try:
            if backing == "anon":
                m = _mmap.mmap(-1, size, flags=_mmap.MAP_SHARED | _mmap.MAP_ANONYMOUS)
            else:
                if backing == "memfd":
                    fd = os.memfd_create("dmarw-guest", 0)
                else:
                    fd = os.open(backing, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    if os.fstat(fd).st_size < size:  # a new memfd is empty; a file may be longer
                        os.ftruncate(fd, size)
                    m = _mmap.mmap(fd, size, flags=_mmap.MAP_SHARED)
                except BaseException:
                    os.close(fd)
                    raise
        except OSError as e:
            raise fail(e.errno or errno.ENOMEM, f"mmap {size:#x} bytes backed by {kind!r}: {e.strerror}") from None
        except (OverflowError, MemoryError):
            raise fail(errno.ENOMEM, f"mmap {size:#x} bytes backed by {kind!r}: out of memory") from None
        region = Region(_address_of(m), size, m, kind, fd)
        with self._map_lock:
            regions = sorted((*self._snap[0], region), key=lambda r: r.hva)
            self._snap = (tuple(regions), [r.hva for r in regions])
        return region.hva

    def munmap(self, hva: int, size: int) -> None:
        """Unmap a whole mapping made by :meth:`mmap` (``EINVAL`` otherwise)."""
        check_access("munmap", hva, size, "hva")
        with self._map_lock:
            for r in self._snap[0]:
                if r.hva == hva and r.size == size:
                    break
            else:
                raise fail(errno.EINVAL, f"munmap {rng(hva, size)}: not a whole mapping")
            rest = tuple(x for x in self._snap[0] if x is not r)
            self._snap = (rest, [x.hva for x in rest])
        r.release()  # a racing access through a cached Region sees ValueError -> EFAULT

    def region(self, hva: int, n: int) -> tuple[Region, int]:
        """The region holding ``[hva, hva+n)`` and the offset of hva in it, else ``EFAULT``."""
        check_access("hva", hva, n, "hva", empty=True)
        regions, starts = self._snap
        i = bisect.bisect_right(starts, hva) - 1
        if i >= 0:
            r = regions[i]
            if hva + n <= r.end and n >= 0:
                return r, hva - r.hva
        raise fail(errno.EFAULT, f"hva {rng(hva, n)} is not mapped")

    def fd(self, hva: int) -> int:
        """The backing fd of the memfd or file mapping at ``hva`` (``EINVAL`` for anon)."""
        check_access("fd", hva, 1, "hva")
        r, _ = self.region(hva, 1)
        if r.fd is None:
            raise fail(errno.EINVAL, f"hva {hva:#x}: anonymous mapping has no fd")
        return r.fd

    def regions(self) -> tuple[Region, ...]:
        return self._snap[0]

    # -- byte access (the owner's own loads and stores) ------------------------------------
    def read(self, hva: int, n: int) -> bytes:
        r, off = self.region(hva, n)
        try:
            return r.map[off : off + n]
        except ValueError as e:
            raise fail(errno.EFAULT, f"hva {rng(hva, n)}: mapping gone") from e

    def write(self, hva: int, data: bytes | bytearray | memoryview) -> None:
        mv = check_rw("write", hva, data, False, "hva", True)
        n = mv.nbytes
        r, off = self.region(hva, n)
        try:
            r.map[off : off + n] = mv
        except ValueError as e:
            raise fail(errno.EFAULT, f"hva {rng(hva, n)}: mapping gone") from e
