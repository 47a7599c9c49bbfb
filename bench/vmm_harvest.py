"""Harvest cost of KVM's dirty log on a 1 GiB guest: bitmap vs clear vs ring.

Per mode one KvmVm with a 1 GiB memfd slot logging dirty pages and one vCPU.  Each round
picks a page set P (0 %, 1 % and 10 % of the slot, from one fixed pool so the guest's
memory stays bounded), the guest stores to every page of P (a table of addresses it walks),
and ``get_dirty_log(0)`` is timed: the harvest (``KVM_GET_DIRTY_LOG``; or that plus
``KVM_CLEAR_DIRTY_LOG``; or walking the vCPU's ring and ``KVM_RESET_DIRTY_RINGS``) plus the
union with the user-space log.  Every harvest is checked to report exactly P.  The modes
run the same P in each round, in a fresh order each round; figures are medians over rounds,
"× bitmap" the median of each round's ratio to bitmap (the fastest at 1 % is chosen by it).

Per harvest (µs) and per dirty page (ns); the guest's run time per stored page is shown
too (what each mode costs the vCPU: write-protect faults vs ring pushes).

Run: ``.venv/bin/python bench/vmm_harvest.py [--rounds R] [--size-mib M] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dmarw import AddressSpace, KvmVm, bitmap_pages
from dmarw.vmm.system import dirty_modes_usable, system

CODE = 0x1000
TABLE = 0x10000  # the address table: up to 4 MiB - 64 KiB of addresses
GUEST = """
.code32
.globl _start
_start:
1:  test %ecx, %ecx
    jz 2f
    mov (%esi), %edi
    mov %ecx, (%edi)
    add $4, %esi
    dec %ecx
    jmp 1b
2:  hlt
"""
FRACTIONS = (0.0, 0.01, 0.10)
LOW = 1024  # pages below 4 MiB hold the code and the table


def assemble(text: str, origin: int) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d)
        (p / "g.s").write_text(text)
        subprocess.run(["as", "--32", "-o", str(p / "g.o"), str(p / "g.s")], check=True)
        subprocess.run(["ld", "-m", "elf_i386", f"-Ttext={origin:#x}", "-o", str(p / "g.elf"), str(p / "g.o")],
                       check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(p / "g.elf"), str(p / "g.bin")], check=True)
        return (p / "g.bin").read_bytes()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=1024, help="guest RAM (the one slot), MiB")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not 1 <= args.rounds <= 50 or not 64 <= args.size_mib <= 4032:
        raise SystemExit("vmm_harvest: --rounds 1..50, --size-mib 64..4032 (32-bit guest addresses)")
    size = args.size_mib << 20
    npages = size >> 12
    modes = dirty_modes_usable(system())
    code = assemble(GUEST, CODE)
    vms: dict[str, tuple[AddressSpace, KvmVm, int]] = {}
    for m in modes:
        sp = AddressSpace()
        hva = sp.mmap(size, backing="memfd")
        sp.write(hva + CODE, code)
        vm = KvmVm(sp, dirty=m)
        vm.set_memslot(0, 0, size, hva, dirty_log=True)
        vm.create_vcpu()
        vms[m] = (sp, vm, hva)
    rng = random.Random(2020)
    pool = rng.sample(range(LOW, npages), int(npages * max(FRACTIONS) * 2))

    def one(m: str, pages: list[int]) -> tuple[float, float]:
        sp, vm, hva = vms[m]
        vcpu = vm.vcpus[0]
        sp.write(hva + TABLE, b"".join(struct.pack("<I", p << 12) for p in pages))
        vcpu.set_regs(rip=CODE, rsi=TABLE, rcx=len(pages))
        t0 = time.perf_counter_ns()
        ex = vcpu.run()
        t1 = time.perf_counter_ns()
        log = vm.get_dirty_log(0)
        t2 = time.perf_counter_ns()
        assert ex.reason == "hlt", ex
        got = bitmap_pages(log)
        assert got == sorted(pages), (m, len(got), len(pages))
        return (t2 - t1) / 1e3, (t1 - t0) / max(len(pages), 1)

    harvest: dict[str, dict[str, list[float]]] = {f"{f:.0%}": {m: [] for m in modes} for f in FRACTIONS}
    run_ns: dict[str, dict[str, list[float]]] = {f"{f:.0%}": {m: [] for m in modes} for f in FRACTIONS}
    for m in modes:  # warm: fault the pool in, so rounds time the harvest, not first touch
        one(m, sorted(pool))
    err = Console(stderr=True)
    t_start = time.monotonic()
    with Progress(console=err, transient=True) as prog:
        task = prog.add_task("harvests", total=args.rounds * len(FRACTIONS))
        for _ in range(args.rounds):
            for f in FRACTIONS:
                pages = sorted(rng.sample(pool, int(npages * f)))
                order = modes[:]
                rng.shuffle(order)
                for m in order:
                    h, r = one(m, pages)
                    harvest[f"{f:.0%}"][m].append(h)
                    run_ns[f"{f:.0%}"][m].append(r)
                prog.advance(task)
    for sp, vm, _ in vms.values():
        vm.close()
        sp.close()

    table = Table(title=f"dirty-log harvest, {args.size_mib} MiB guest, {args.rounds} rounds (median)")
    for col in ("dirty", "mode", "µs/harvest", "× bitmap", "ns/dirty page", "guest ns/store"):
        table.add_column(col, justify="right" if col != "mode" else "left")
    medians: dict[str, dict[str, float]] = {}
    ratios: dict[str, dict[str, float]] = {}  # median over rounds of each round's mode / bitmap
    for f in FRACTIONS:
        key = f"{f:.0%}"
        n = int(npages * f)
        medians[key] = {}
        for m in modes:
            h = statistics.median(harvest[key][m])
            medians[key][m] = h
            rel = statistics.median(a / b for a, b in zip(harvest[key][m], harvest[key]["bitmap"], strict=True))
            ratios.setdefault(key, {})[m] = rel
            per = f"{h * 1e3 / n:,.1f}" if n else "-"
            guest = f"{statistics.median(run_ns[key][m]):,.0f}" if n else "-"
            table.add_row(key, m, f"{h:,.1f}", f"{rel:.3f}", per, guest)
    Console().print(table)
    fastest = min(modes, key=lambda m: ratios["1%"][m])
    at1 = ", ".join(f"{m} {medians['1%'][m]:,.0f} µs" for m in modes)
    print(f"fastest at 1 %: {fastest} ({at1}); measured in {time.monotonic() - t_start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"size_mib": args.size_mib, "rounds": args.rounds, "harvest_us": harvest,
                                         "guest_ns_per_store": run_ns, "ratio_to_bitmap": ratios,
                                         "fastest_at_1pct": fastest}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
