"""Errors: every failure is a :class:`DmaError`, an ``OSError`` carrying the kernel's errno.

A failing call changes nothing: each operation validates first and mutates last.
"""

from __future__ import annotations

import errno as _errno
import os


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


def fail(err: int, message: str) -> DmaError:
    """Build the error to raise: ``raise fail(EINVAL, f"iova {iova:#x} ...")``."""
    return DmaError(err, message)


def rng(addr: int, size: int) -> str:
    """Format an address range the same way in every message."""
    return f"{addr:#x}+{size:#x}"
