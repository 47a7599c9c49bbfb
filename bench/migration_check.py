"""The migration stream's per-frame check: what it costs per byte, in one run.

Over one prefaulted 64 MiB anonymous mmap (the kind of memory guest RAM is), the check
of every stream frame, done the way the stream does it (one call per frame of
``MAX_PAGES`` 4 KiB pages, through a memoryview): ``zlib.crc32`` (the stream's check
before CRC32C), the native CRC32C over a whole frame (``dmarw._native.crc32c``; stream
version 2), per page (``crc32c_pages``; version 3), the native table-driven CRC32C (the
fallback for CPUs without SSE4.2), and no check (the loop over the same views, calling
nothing), plus a plain ``memcpy`` of the same bytes
(``bytearray[:] = view``) for scale.  The native rows run every way this CPU has: folded
by carry-less multiplies (``vpclmulqdq``), three crc32 lanes (``sse4.2``), and the table.
Median of ``--repeat`` passes, in GB/s (10^9); ``--size`` under the last-level cache
measures the check on memory in cache (as the destination checks pages just received).

Run: ``.venv/bin/python bench/migration_check.py [--size 64M] [--repeat 7] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import mmap
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from dmarw.core import native_available
from dmarw.migration.cli import parse_size
from dmarw.migration.stream import MAX_PAGES

PAGE = 4096


def passes(views: list[memoryview], fn: Callable[[memoryview], Any], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        for v in views:
            fn(v)
        out.append(time.perf_counter() - t)
    return out


def _with(way: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with the native CRC32C run ``way``'s way (the choice is a global: one
    thread here)."""
    from dmarw import _native

    was = _native.crc32c_select(way)
    try:
        return fn(*args)
    finally:
        _native.crc32c_select(was)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="64M", type=parse_size)
    ap.add_argument("--repeat", default=7, type=int)
    ap.add_argument("--json", dest="json_path")
    a = ap.parse_args(argv)
    if not 0 < a.size <= 1 << 30 or not 1 <= a.repeat <= 100:
        raise SystemExit("--size must be in 1..1G and --repeat in 1..100")
    m = mmap.mmap(-1, a.size)
    frame = MAX_PAGES * PAGE
    for off in range(0, a.size, PAGE):  # fault every page in, distinct contents
        m[off : off + 8] = off.to_bytes(8, "little")
    whole = memoryview(m)
    views = [whole[o : o + frame] for o in range(0, a.size, frame)]
    sink = bytearray(frame)

    def copy(v: memoryview) -> None:
        sink[: len(v)] = v

    cases: list[tuple[str, Callable[[memoryview], Any]]] = [("no check", lambda v: None), ("zlib.crc32", zlib.crc32)]
    if native_available():
        from dmarw import _native

        best = _native.crc32c_impl()
        for way in ("vpclmulqdq", "sse4.2"):  # every way this CPU has, the picked one marked
            try:
                _native.crc32c_select(way)
            except ValueError:
                continue
            mark = ", picked" if way == best else ""
            cases += [
                (f"native crc32c ({way}{mark})", lambda v, w=way: _with(w, _native.crc32c, v)),
                (f"native crc32c per page ({way}{mark})", lambda v, w=way: _with(w, _native.crc32c_pages, v, PAGE)),
            ]
        _native.crc32c_select(best)
        cases.append(("native crc32c (table)", _native.crc32c_portable))
    else:
        print("dmarw._native is not built: native rows skipped", file=sys.stderr)
    cases.append(("memcpy (for scale)", copy))
    rows = []
    for name, fn in cases:
        t = statistics.median(passes(views, fn, a.repeat))
        rows.append({"check": name, "seconds": t, "gb_s": a.size / t / 1e9})
    base = next(r["seconds"] for r in rows if r["check"] == "zlib.crc32")
    table = Table(title=f"per-frame check over {a.size / 2**20:.0f} MiB, {len(views)} frames of {frame // 1024} KiB")
    for col in ("check", "ms", "GB/s", "vs zlib"):
        table.add_column(col, justify="left" if col == "check" else "right")
    for r in rows:
        idle = r["check"] == "no check"  # the loop alone: its GB/s would only say "free"
        table.add_row(r["check"], f"{r['seconds'] * 1e3:.2f}", "–" if idle else f"{r['gb_s']:.2f}",
                      "–" if idle else f"{base / r['seconds']:.2f}x")
    Console(width=100).print(table)
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump({"size": a.size, "frame": frame, "repeat": a.repeat, "rows": rows}, f, indent=2)
    for v in views:
        v.release()
    whole.release()
    m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
