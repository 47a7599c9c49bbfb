"""The MMIO round trip on real KVM: guest store -> Python device callback -> resume.

Three loops over the same guest (``N`` stores to an MMIO page, then ``hlt``), interleaved
in each round so the machine's load falls on all of them alike:

- ``bare``: the native exit loop serving each exit in C with no Python (``run_bare``):
  the cost of the exit itself and KVM_RUN, the floor;
- ``device``: ``vcpu.run()`` with a Python device whose ``mmio_write`` is called for each
  store (the native loop: KVM_RUN with the GIL released, the exit decoded in C);
- ``python-ioctl``: the same round trip written in plain Python (``fcntl.ioctl(KVM_RUN)``,
  the exit decoded from the mapped ``kvm_run`` with ``struct``, the same device call).

Per exit: total time / N; a ratio is the median over rounds of that round's ratio (short
rounds, many of them, so the compared loops run close together in time on a shared
machine), with the quartiles of those per-round ratios; "CPU" is the same ratio of this thread's CPU
time (``time.thread_time_ns``: guest time counts, time spent descheduled does not).  The target: ``device`` <= 1.15 x
``bare``.

Run: ``.venv/bin/python bench/vmm_mmio.py [--exits N] [--rounds R] [--json FILE]``
"""

from __future__ import annotations

import argparse
import fcntl
import json
import mmap
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dmarw import AddressSpace, KvmVm
from dmarw.vmm import uapi

CODE = 0x1000
MMIO = 0xD000_0000
GUEST = f"""
.code32
.globl _start
_start:
1:  mov %ecx, {MMIO:#x}
    dec %ecx
    jnz 1b
    hlt
"""
TARGET = 1.15


def assemble(text: str, origin: int) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d)
        (p / "g.s").write_text(text)
        subprocess.run(["as", "--32", "-o", str(p / "g.o"), str(p / "g.s")], check=True)
        subprocess.run(["ld", "-m", "elf_i386", f"-Ttext={origin:#x}", "-o", str(p / "g.elf"), str(p / "g.o")],
                       check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(p / "g.elf"), str(p / "g.bin")], check=True)
        return (p / "g.bin").read_bytes()


class Sink:
    """The device: counts the stores (the least a device model does)."""

    def __init__(self) -> None:
        self.n = 0

    def mmio_read(self, offset: int, size: int) -> int:
        return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.n += 1


def python_loop(vcpu: Any, dev: Sink) -> None:
    """The round trip in plain Python: ioctl, decode kvm_run, call the device."""
    run = mmap.mmap(vcpu.fd, vcpu.vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        mmio = struct.Struct("<QQIB")
        while True:
            fcntl.ioctl(vcpu.fd, uapi.KVM_RUN, 0)
            reason = struct.unpack_from("<I", run, 8)[0]
            if reason != uapi.EXIT_MMIO:
                assert reason == uapi.EXIT_HLT, reason
                return
            addr, data, length, is_write = mmio.unpack_from(run, 32)
            if is_write:
                dev.mmio_write(addr - MMIO, length, data & ((1 << (8 * length)) - 1))
            else:
                run[40 : 40 + length] = dev.mmio_read(addr - MMIO, length).to_bytes(length, "little")
    finally:
        run.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--exits", type=int, default=2000, help="guest stores (MMIO exits) per loop and round")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--json", type=Path, help="write every sample here")
    args = ap.parse_args(argv)
    if not 1 <= args.exits <= 1_000_000 or not 1 <= args.rounds <= 1000:
        raise SystemExit("vmm_mmio: --exits 1..1000000, --rounds 1..1000")
    space = AddressSpace()
    hva = space.mmap(1 << 20)
    space.write(hva + CODE, assemble(GUEST, CODE))
    vm = KvmVm(space)
    vm.set_memslot(0, 0, 1 << 20, hva)
    dev = Sink()
    vm.add_mmio(MMIO, 0x1000, dev)
    vcpu = vm.create_vcpu()

    def once(kind: str) -> tuple[float, float]:
        """(wall ns, this thread's CPU ns) per exit."""
        vcpu.set_regs(rip=CODE, rcx=args.exits, rsp=1 << 20)
        dev.n = 0
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        if kind == "bare":
            ex = vcpu.run_bare()
        elif kind == "device":
            ex = vcpu.run()
        else:
            python_loop(vcpu, dev)
            ex = None
        t1 = time.perf_counter_ns()
        c1 = time.thread_time_ns()
        assert ex is None or ex.reason == "hlt", ex
        assert kind == "bare" or dev.n == args.exits, (kind, dev.n)
        return (t1 - t0) / args.exits, (c1 - c0) / args.exits

    kinds = ["bare", "device", "python-ioctl"]
    for k in kinds:  # warm: pages faulted in, caches, branch predictors
        once(k)
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    err = Console(stderr=True)
    with Progress(console=err, transient=True) as prog:
        task = prog.add_task("MMIO round trips", total=args.rounds)
        for _ in range(args.rounds):
            order = kinds[:]
            random.shuffle(order)
            for k in order:
                wall, c = once(k)
                samples[k].append(wall)
                cpu[k].append(c)
            prog.advance(task)
    vm.close()
    space.close()

    per_round = {k: [a / b for a, b in zip(samples[k], samples["bare"], strict=True)] for k in kinds}
    ratio = {k: statistics.median(v) for k, v in per_round.items()}
    cpu_ratio = {k: statistics.median(a / b for a, b in zip(cpu[k], cpu["bare"], strict=True)) for k in kinds}
    quart = {k: statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0]] * 3 for k, v in per_round.items()}
    table = Table(title=f"MMIO round trip, {args.exits} exits x {args.rounds} rounds (median)")
    table.add_column("loop")
    table.add_column("ns/exit", justify="right")
    table.add_column("x bare", justify="right")
    table.add_column("quartiles", justify="right")
    table.add_column("CPU x bare", justify="right")
    for k in kinds:
        q = quart[k]
        table.add_row(k, f"{statistics.median(samples[k]):,.0f}", f"{ratio[k]:.3f}", f"{q[0]:.3f}-{q[2]:.3f}",
                      f"{cpu_ratio[k]:.3f}")
    Console().print(table)
    verdict = "meets" if ratio["device"] <= TARGET else "misses"
    print(f"device callback / bare exit: {ratio['device']:.3f}x wall, {cpu_ratio['device']:.3f}x CPU "
          f"({verdict} the {TARGET}x target)")
    print(f"plain-Python ioctl loop / bare exit: {ratio['python-ioctl']:.3f}x wall")
    if args.json:
        args.json.write_text(json.dumps({"exits": args.exits, "rounds": args.rounds, "ns_per_exit": samples,
                                         "cpu_ns_per_exit": cpu, "ratio_to_bare": ratio, "cpu_ratio_to_bare": cpu_ratio,
                                         "quartiles": quart, "target": TARGET}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
