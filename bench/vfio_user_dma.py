"""vfio-user device DMA: through the client's fd mapping vs through DMA_READ/DMA_WRITE messages.

A device served by ``dmarw.vfio_user.Server`` in a child process is offered two DMA regions
by ``dmarw.vfio_user.Client`` (the parent): one with its memfd (the server maps it and its
``dma_rw`` is the container's), one without (every access is a DMA_READ / DMA_WRITE message
that the client serves while it waits for the reply to the command that started the loop).  The device times its own ``self.dma.read/write``
loop (``time.perf_counter_ns`` around N accesses, in the server process) when the client
writes a command to its BAR0; the client reads the result back from BAR0.  Sizes 4 KiB and
64 KiB, read and write, rounds interleaved; medians per access and the ratio
messages / fd.

Run: ``.venv/bin/python bench/vfio_user_dma.py [--rounds N] [--json FILE]`` (~5 s).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dmarw import AddressSpace
from dmarw.vfio_user import Client, Device, PciConfig, Region, Server

FD_IOVA, MSG_IOVA, SPAN = 0x0, 0x1000000, 1 << 20
CMD = struct.Struct("<IIII")  # path (0 fd, 1 messages), write, size, count
SIZES = (4096, 65536)
COUNTS = {(0, 4096): 400, (0, 65536): 200, (1, 4096): 60, (1, 65536): 30}


class DmaBenchDevice(Device):
    """BAR0: write a CMD to run a timed DMA loop; read 8 bytes: its ns total."""

    def __init__(self) -> None:
        super().__init__(PciConfig(0x1DB0, 0x0D3A))
        self.last_ns = 0
        self.add_region(0, Region(16, read=self._read, write=self._write))

    def _write(self, offset: int, data: bytes) -> None:
        path, write, size, count = CMD.unpack(data)
        base = MSG_IOVA if path else FD_IOVA
        buf = bytearray(os.urandom(size))
        iovas = [base + (i * size) % SPAN for i in range(count)]
        t0 = time.perf_counter_ns()
        if write:
            for iova in iovas:
                self.dma.write(iova, buf)
        else:
            for iova in iovas:
                self.dma.rw(iova, buf, False)
        self.last_ns = time.perf_counter_ns() - t0

    def _read(self, offset: int, count: int) -> bytes:
        return struct.pack("<QQ", self.last_ns, 0)[offset : offset + count]


def _serve(path: str) -> None:
    with Server(path, DmaBenchDevice()) as srv:
        srv.serve_one()


def measure(rounds: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sock = str(Path(tmp) / "dma.sock")
        proc = multiprocessing.get_context("fork").Process(target=_serve, args=(sock,), daemon=True)
        proc.start()
        space = AddressSpace()
        try:
            with Client(sock, timeout=60) as c:
                c.dma_map(FD_IOVA, SPAN, space, space.mmap(SPAN, backing="memfd"), with_fd=True)
                c.dma_map(MSG_IOVA, SPAN, space, space.mmap(SPAN, backing="anon"), with_fd=False)
                cases = [(p, w, s) for s in SIZES for w in (0, 1) for p in (0, 1)]
                for r in range(rounds):
                    print(f"\rround {r + 1}/{rounds}", end="", file=sys.stderr, flush=True)
                    for path, write, size in cases:
                        n = COUNTS[path, size]
                        c.region_write(0, 0, CMD.pack(path, write, size, n))
                        (ns,) = struct.unpack_from("<Q", c.region_read(0, 0, 8))
                        key = f"{'msg' if path else 'fd'}/{'write' if write else 'read'}/{size}"
                        samples.setdefault(key, []).append(ns / n)
                print(file=sys.stderr)
                samples["_served"] = [float(c.dma_requests[k]) for k in sorted(c.dma_requests)]
        finally:
            space.close()
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--json", metavar="FILE", help="also write every sample to FILE")
    args = ap.parse_args(argv)
    if not 1 <= args.rounds <= 1000:
        ap.error("--rounds must be in 1..1000")
    samples = measure(args.rounds)
    console = Console(width=80)
    t = Table(title="device DMA per access (median ns): fd mapping vs messages")
    for col in ("op", "size", "fd ns", "msg ns", "msg/fd", "fd MB/s", "msg MB/s"):
        t.add_column(col, justify="right")
    rows = []
    for op in ("read", "write"):
        for size in SIZES:
            fd = statistics.median(samples[f"fd/{op}/{size}"])
            msg = statistics.median(samples[f"msg/{op}/{size}"])
            rows.append({"op": op, "size": size, "fd_ns": fd, "msg_ns": msg, "ratio": msg / fd})
            t.add_row(op, f"{size // 1024} KiB", f"{fd:,.0f}", f"{msg:,.0f}", f"{msg / fd:,.1f}x",
                      f"{size / fd * 1e3:,.0f}", f"{size / msg * 1e3:,.0f}")
    console.print(t)
    served = samples.pop("_served")
    console.print(f"{args.rounds} rounds; DMA_READ/DMA_WRITE messages served by the client: "
                  f"{int(served[0])}/{int(served[1])}; server in its own process, the client "
                  "answering them while it waits for its REGION_WRITE's reply.")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "samples": samples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
