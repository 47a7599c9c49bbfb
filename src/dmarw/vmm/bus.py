"""The device buses: MMIO ranges and port ranges, each served by a device object.

A bus is a sorted list of non-overlapping ``[start, start+size)`` ranges; the native exit
loop looks an access up in its copy (``dmarw._vmm.Bus``) and calls the device's bound
read/write method with ``(offset from the range's start, size[, value])``.  A range must
hold the whole access; an access that crosses out of it is not served (it returns from
``run()`` as an exit).

Rules: ``size`` > 0, the range inside the address space (2**64 for MMIO, 2**16 for ports),
no overlap with another range on the same bus (EEXIST).  The VM adds "an MMIO range over
a memslot is EEXIST".  Locking: mutations are made under the VM's ``_lock`` and published
to the native copy whole; the loop reads that copy only with the GIL held.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from ..errors import fail, rng


@dataclass(frozen=True)
class Range:
    start: int
    size: int
    device: Any

    @property
    def end(self) -> int:
        return self.start + self.size


class DeviceBus:
    """One address space of devices: ``kind`` is ``"mmio"`` or ``"pio"``."""

    def __init__(self, kind: str, limit: int, native: Any) -> None:
        self.kind = kind
        self.limit = limit
        self.native = native
        self._ranges: list[Range] = []

    def ranges(self) -> tuple[Range, ...]:
        return tuple(self._ranges)

    def overlapping(self, start: int, size: int) -> Range | None:
        for r in self._ranges:
            if start < r.end and r.start < start + size:
                return r
        return None

    def check(self, start: int, size: int, device: Any) -> tuple[Any, Any]:
        """Validate a new range (EINVAL/EEXIST); returns the device's (read, write) methods."""
        what = "add_mmio" if self.kind == "mmio" else "add_pio"
        for name, v in (("address", start), ("size", size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise fail(errno.EINVAL, f"{what}: {name} {v!r} must be a non-negative int")
        if size == 0 or start + size > self.limit:
            raise fail(errno.EINVAL, f"{what} {rng(start, size)}: empty or past {self.limit:#x}")
        other = self.overlapping(start, size)
        if other is not None:
            raise fail(errno.EEXIST, f"{what} {rng(start, size)} overlaps {self.kind} range {rng(other.start, other.size)}")
        names = (f"{self.kind}_read", f"{self.kind}_write")
        methods = (getattr(device, names[0], None), getattr(device, names[1], None))
        if not all(callable(m) for m in methods):
            raise fail(errno.EINVAL, f"{what} {rng(start, size)}: the device needs {names[0]}() and {names[1]}()")
        return methods

    def add(self, start: int, size: int, device: Any) -> None:
        self.check(start, size, device)
        self._ranges.append(Range(start, size, device))
        self._ranges.sort(key=lambda r: r.start)
        self._publish()

    def remove(self, start: int) -> None:
        for r in self._ranges:
            if r.start == start:
                self._ranges.remove(r)
                self._publish()
                return
        what = "remove_mmio" if self.kind == "mmio" else "remove_pio"
        raise fail(errno.ENOENT, f"{what}: no {self.kind} range starts at {start:#x}")

    def _publish(self) -> None:
        self.native.set([
            (r.start, r.size, getattr(r.device, f"{self.kind}_read"), getattr(r.device, f"{self.kind}_write"))
            for r in self._ranges
        ])
