"""What ``vcpu.run()`` returns: an :class:`Exit`, decoded from the native loop's tuple.

``reason`` is one of :data:`REASONS` (KVM's exit names; anything else KVM reports keeps its
own name, e.g. ``"debug"``, or ``"exit-<n>"``).  For ``"mmio"``: ``address``, ``size``,
``is_write`` and, for a write, ``data`` (the value stored, little-endian) and ``raw``; for
``"io"``: ``port``, ``size``, ``count`` (> 1 for ``rep ins/outs``), ``is_write`` and, for
``out``, ``data`` (the first item) and ``raw`` (all items).  A read that no device served
loads zero unless the caller answers with ``vcpu.complete(value)`` before the next run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import uapi

REASONS = ("hlt", "io", "mmio", "shutdown", "internal-error", "fail-entry", "intr")


@dataclass(frozen=True)
class Exit:
    reason: str
    address: int | None = None
    port: int | None = None
    size: int = 0
    count: int = 1
    is_write: bool = False
    data: int | None = None
    raw: bytes = b""
    code: int = 0
    detail: tuple[int, ...] = field(default=())

    def __str__(self) -> str:
        if self.reason == "mmio":
            rw = f"write {self.data:#x}" if self.is_write else "read"
            return f"mmio {rw} {self.size} B at {self.address:#x}"
        if self.reason == "io":
            rw = f"out {self.data:#x}" if self.is_write else "in"
            rep = f" x{self.count}" if self.count > 1 else ""
            return f"io {rw} {self.size} B port {self.port:#x}{rep}"
        if self.detail:
            return f"{self.reason} ({', '.join(hex(d) for d in self.detail)})"
        return self.reason


def decode(t: tuple[Any, ...]) -> Exit:
    """Turn the native loop's exit tuple into an :class:`Exit`."""
    code = t[0]
    reason = uapi.EXIT_NAMES.get(code, f"exit-{code}")
    if code == uapi.EXIT_MMIO:
        _, addr, size, is_write, raw = t
        data = int.from_bytes(raw, "little") if raw is not None else None
        return Exit("mmio", address=addr, size=size, is_write=bool(is_write), data=data, raw=raw or b"", code=code)
    if code == uapi.EXIT_IO:
        _, port, size, is_write, count, raw = t
        data = int.from_bytes(raw[:size], "little") if raw is not None else None
        return Exit("io", port=port, size=size, count=count, is_write=bool(is_write), data=data,
                    raw=raw or b"", code=code)
    if code == uapi.EXIT_FAIL_ENTRY:
        return Exit(reason, code=code, detail=(t[1], t[2]))
    if code == uapi.EXIT_INTERNAL_ERROR:
        return Exit(reason, code=code, detail=(t[1], *t[2]))
    return Exit(reason, code=code)
