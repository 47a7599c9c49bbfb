"""Errors: every failure is a :class:`DmaError`, an ``OSError`` carrying the kernel's errno.

A failing call changes nothing: each operation validates first and mutates last.

Messages are made here, once, for both cores.  The Python core calls :func:`error` (and
the argument checks :func:`check_access` / :func:`check_buffer`); the native core calls
the same functions from C when a call fails, passing the errno key and the fields (the
addresses as ints), so one failure reads the same whichever core ran it.  Addresses and
sizes are always printed in hex; an access permission as ``READ|WRITE``.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Callable
from typing import Any

ADDR_LIMIT = 1 << 64


class DmaError(OSError):
    """An ``OSError`` with the kernel's errno and a message naming the address and size."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, f"{_errno.errorcode.get(err, str(err))}: {message}")
        self.detail = message

    def __str__(self) -> str:  # "[Errno 22] EINVAL: ..." reads better than the default
        return f"[Errno {self.errno}] {os.strerror(self.errno or 0)}: {self.detail}"

    def __reduce__(self) -> tuple[type[DmaError], tuple[int, str]]:
        """Pickle as the constructor's arguments (errors cross process boundaries in the lab);
        the default would rebuild from ``args`` and prefix the errno name twice."""
        return (type(self), (self.errno or 0, self.detail))


class CoreUnavailable(DmaError):
    """The native core was asked for but ``dmarw._native`` is not built, or the core's name
    is not one of ``python``/``native`` (raised when an object is built, never at import)."""


def fail(err: int, message: str) -> DmaError:
    """Build the error to raise: ``raise fail(EINVAL, f"iova {iova:#x} ...")``."""
    return DmaError(err, message)


def addr(v: object) -> str:
    """An address or size as the messages print it: hex for an int, ``repr`` otherwise."""
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:#x}" if v >= 0 else f"-{-v:#x}"
    return repr(v)


def rng(start: object, size: object) -> str:
    """Format an address range the same way in every message: ``0x1000+0x10``."""
    return f"{addr(start)}+{addr(size)}"


def prot_str(prot: int) -> str:
    """An access permission as ``READ``, ``WRITE``, ``READ|WRITE`` (``NONE`` for 0)."""
    p = int(prot)
    names = [n for bit, n in ((1, "READ"), (2, "WRITE")) if p & bit]
    return "|".join(names) or "NONE"


# -- the failures of an access, by key: (errno, message from the fields) ----------------------
# ``op`` is the call (``dma_rw``, ``read_guest`` ...), ``a``/``n`` the access's address and
# length, ``s``/``sz`` the mapping's (or memslot's) start and size.
_MESSAGES: dict[str, tuple[int, Callable[..., str]]] = {
    "not_mapped": (_errno.EINVAL, lambda op, a, n, cur: f"{op} {rng(a, n)}: iova {addr(cur)} is not mapped"),
    "no_perm": (
        _errno.EPERM,
        lambda op, a, n, s, sz, prot: f"{op} {rng(a, n)}: mapping {rng(s, sz)} is {prot_str(prot)}",
    ),
    "owner_exited": (_errno.EPERM, lambda op, a, n: f"{op} {rng(a, n)}: the owner's address space has exited"),
    "host_gone": (
        _errno.EFAULT,
        lambda op, a, n, s, sz: f"{op} {rng(a, n)}: host memory of mapping {rng(s, sz)} is gone",
    ),
    "no_memslot": (_errno.EFAULT, lambda op, a, n, g: f"{op} {rng(a, n)}: gpa {addr(g)} has no memslot"),
    "slot_read_only": (
        _errno.EFAULT,
        lambda op, a, n, g, slot: f"{op} {rng(a, n)}: gpa {addr(g)} is in read-only memslot {slot}",
    ),
    "slot_gone": (
        _errno.EFAULT,
        lambda op, a, n, g, slot: f"{op} {rng(a, n)}: host memory of memslot {slot} (gpa {addr(g)}) is gone",
    ),
    "closed_handle": (_errno.EINVAL, lambda op, group: f"{op}: external user of group {group!r} is closed"),
    "no_memory": (_errno.ENOMEM, lambda op, a, n: f"{op} {rng(a, n)}: cannot allocate a buffer of {addr(n)} bytes"),
}


def error(key: str, *fields: Any) -> DmaError:
    """The error of failure ``key`` (see ``_MESSAGES``) with its fields: both cores call this."""
    err, message = _MESSAGES[key]
    return DmaError(err, message(*fields))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_access(
    op: str, a: object, n: object, what: str = "iova", empty: bool = False, guest: bool = False
) -> None:
    """The argument rules of every access, in this order (both cores):

    ``a`` (named ``what``) or the length ``n`` not an int (``bool`` included) → EINVAL naming
    the value; a negative address or length → EINVAL; an empty access unless ``empty``
    (KVM allows it, type1 does not) → EINVAL; ``a + n`` past 2**64 → EOVERFLOW naming the
    address given.  A guest access (``guest``: KVM's read/write of guest memory) outside guest
    physical space — a negative gpa, or past 2**64 — is instead EFAULT, as KVM finds no
    memslot there.  Returns when the arguments are valid.  The native core calls this (and
    :func:`check_rw`) from C with positional arguments when a call fails its inline checks.
    """
    if not _is_int(a):
        raise DmaError(_errno.EINVAL, f"{op}: {what} {a!r} is not an int")
    if not _is_int(n):
        raise DmaError(_errno.EINVAL, f"{op} {what} {addr(a)}: length {n!r} is not an int")
    assert isinstance(a, int) and isinstance(n, int)
    if n < 0:
        raise DmaError(_errno.EINVAL, f"{op} {what} {addr(a)}: length {addr(n)} is negative")
    if guest and (a < 0 or a + max(n, 1) > ADDR_LIMIT):
        raise DmaError(_errno.EFAULT, f"{op} {rng(a, n)}: outside guest physical space")
    if a < 0:
        raise DmaError(_errno.EINVAL, f"{op}: {what} {addr(a)} is negative")
    if n == 0 and not empty:
        raise DmaError(_errno.EINVAL, f"{op} {what} {addr(a)}: zero length")
    if a + max(n, 1) > ADDR_LIMIT:
        raise DmaError(_errno.EOVERFLOW, f"{op} {rng(a, n)}: runs past 2**64")


def buffer_view(op: str, a: object, buf: object, *, what: str = "iova") -> memoryview:
    """A flat byte view of ``buf``: a bytes-like, contiguous object, else EINVAL."""
    try:
        mv = buf if type(buf) is memoryview else memoryview(buf)  # type: ignore[arg-type]
    except TypeError:
        raise DmaError(_errno.EINVAL, f"{op} {what} {addr(a)}: {type(buf).__name__} is not a buffer") from None
    if not mv.contiguous:
        raise DmaError(_errno.EINVAL, f"{op} {rng(a, mv.nbytes)}: buffer is not contiguous")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def check_rw(
    op: str, a: object, buf: object, fill: bool, what: str = "iova", empty: bool = False, guest: bool = False
) -> memoryview:
    """The rules of an access through a caller's buffer (both cores, in this order): the
    buffer (:func:`buffer_view`), the address and its length (:func:`check_access`), then a
    read-only buffer that the access would fill → EINVAL.  Returns the byte view."""
    mv = buffer_view(op, a, buf, what=what)
    check_access(op, a, mv.nbytes, what, empty, guest)
    if fill and mv.readonly:
        raise DmaError(_errno.EINVAL, f"{op} {rng(a, mv.nbytes)}: buffer is read-only")
    return mv
