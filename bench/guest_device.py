"""The GPU-like device's per-command cost on each path with the real guest, beside the same
accesses replayed, in one run.

Per round, per path (the paths in a fresh random order each round):

* **live**: dmarw's guest program on a :class:`dmarw.KvmVm` with the device on the path
  (engine thread, doorbell-woken), recording its accesses; from the device's own counters:
  ns per command (decode + ``dma_rw`` + state update) and ns per ``dma_rw`` read / write
  (``time.perf_counter_ns`` around the call, in the engine, while the vCPU runs);
* **replay (py)**: the recorded accesses through the same path's ``dma_rw``, from a Python
  loop, each call timed with ``perf_counter_ns`` (no guest running: the same timer as live);
* **replay (lab)**: the same records through the lab's runner (``dmarw.lab.runner.run``,
  one VM process, the path's replay timed per call in C on the native core), the figures
  ``dmarw reproduce`` prints.

Each figure is the median over the rounds; ``live/py`` is the median of the per-round
ratios.  Run: ``.venv/bin/python bench/guest_device.py [--commands N] [--rounds R]
[--ram 16M] [--json FILE]`` (defaults: 3,000 commands, 3 rounds, about 40 s here).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from dmarw import lockstat
from dmarw.devices.paths import PATH_NAMES, dma_rw_for, path_env
from dmarw.guest.cli import parse_size
from dmarw.guest.machine import GuestMachine
from dmarw.guest.params import Params
from dmarw.lab import runner
from dmarw.lab.workload import Records, Workload


def live(path: str, params: Params) -> tuple[dict[str, Any], list[tuple[bool, int, int]], int]:
    with GuestMachine(path, params, device_kw={"record": True}) as m:
        m.run()
        r = m.report()
        accesses = list(m.device.accesses)
    if not r.ok:
        bad = [f"{c.name}: {c.detail}" for c in r.checks if not c.ok]
        raise SystemExit(f"guest on {path}: checks failed: {bad}")
    d = r.device
    fig = {
        "cmd_ns": d["per_command_ns"],
        "read_ns": d["read_ns"] / d["reads"],
        "write_ns": d["write_ns"] / d["writes"],
        "reads": d["reads"],
        "writes": d["writes"],
        "wall_s": r.wall_s,
    }
    return fig, accesses, r.checksum or 0


def replay_py(path: str, ram_size: int, recs: list[tuple[bool, int, int]]) -> dict[str, float]:
    """The records through the path's dma_rw from Python, each call timed."""
    env = path_env(path, ram_size)
    try:
        env.prefault()
        rw = dma_rw_for(env)
        buf = memoryview(bytearray(runner.MAX_ACCESS))
        for w, a, s in recs[:500]:  # warm-up
            rw(a, buf[:s], w)
        clock = time.perf_counter_ns
        rd = wr = 0
        nr = nw = 0
        gc.disable()
        try:
            for w, a, s in recs:
                mv = buf[:s]
                t0 = clock()
                rw(a, mv, w)
                dt = clock() - t0
                if w:
                    wr += dt
                    nw += 1
                else:
                    rd += dt
                    nr += 1
        finally:
            gc.enable()
        over = lockstat.timer_overhead_ns()
        return {"read_ns": rd / nr - over, "write_ns": wr / nw - over}
    finally:
        env.close()


def replay_lab(path: str, ram_size: int, recs: list[tuple[bool, int, int]]) -> dict[str, float]:
    from array import array

    wl = Workload("guest", 0, ram_size, Records(array("B", (w for w, _, _ in recs)),
                                                array("Q", (a for _, a, _ in recs)),
                                                array("I", (s for _, _, s in recs))))
    r = runner.run(path, [wl])
    return {"read_ns": r.read_ns, "write_ns": r.write_ns}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commands", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ram", type=parse_size, default=16 << 20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--paths", default=",".join(PATH_NAMES))
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    for p in paths:
        if p not in PATH_NAMES:
            raise SystemExit(f"unknown path {p!r} (have {', '.join(PATH_NAMES)})")
    if not 1 <= args.rounds <= 20:
        raise SystemExit("--rounds must be in 1..20")
    params = Params(seed=args.seed, commands=args.commands, ram_size=args.ram)
    from rich.progress import Progress

    samples: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
    sums: set[int] = set()
    t0 = time.perf_counter()
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("guest + replays", total=args.rounds * len(paths))
        for k in range(args.rounds):
            order = paths[:]
            random.Random(k).shuffle(order)
            for p in order:
                bar.update(task, description=f"round {k + 1}/{args.rounds}: {p}")
                fig, recs, ck = live(p, params)
                sums.add(ck)
                py = replay_py(p, params.ram_size, recs)
                lab = replay_lab(p, params.ram_size, recs)
                samples[p].append({"live": fig, "py": py, "lab": lab, "records": len(recs)})
                bar.advance(task)
    elapsed = time.perf_counter() - t0

    def med(p: str, *key: str) -> float:
        vals = []
        for s in samples[p]:
            v: Any = s
            for x in key:
                v = v[x]
            vals.append(v)
        return statistics.median(vals)

    con = Console() if Console().is_terminal else Console(width=80)
    con.print(f"guest: {params.commands:,} commands, {params.ram_size >> 20} MiB, seed {params.seed}; "
              f"{args.rounds} rounds; checksums {'identical' if len(sums) == 1 else 'DIFFER'} on all paths")
    t = Table(title="ns per call: live (guest running) vs replayed (no guest)", title_justify="left",
              box=None, padding=(0, 1), collapse_padding=True, pad_edge=False)
    for c in ("path", "cmd", "live r", "live w", "py r", "py w", "lab r", "lab w", "xpy"):
        t.add_column(c, justify="left" if c == "path" else "right", no_wrap=True)
    rows = {}
    for p in paths:
        ratio = statistics.median(
            (s["live"]["read_ns"] * s["live"]["reads"] + s["live"]["write_ns"] * s["live"]["writes"])
            / (s["py"]["read_ns"] * s["live"]["reads"] + s["py"]["write_ns"] * s["live"]["writes"])
            for s in samples[p])
        row = {"cmd_ns": med(p, "live", "cmd_ns"), "live_read_ns": med(p, "live", "read_ns"),
               "live_write_ns": med(p, "live", "write_ns"), "py_read_ns": med(p, "py", "read_ns"),
               "py_write_ns": med(p, "py", "write_ns"), "lab_read_ns": med(p, "lab", "read_ns"),
               "lab_write_ns": med(p, "lab", "write_ns"), "live_over_py": ratio}
        rows[p] = row
        t.add_row(p, *(f"{row[k]:,.0f}" for k in ("cmd_ns", "live_read_ns", "live_write_ns", "py_read_ns",
                                                   "py_write_ns", "lab_read_ns", "lab_write_ns")),
                  f"{ratio:.2f}x")
    con.print(t)
    con.print("ns. cmd: the device's cost per command, its dma_rw included; live r/w: one dma_rw "
              "read/write timed in the engine while the vCPU runs; py: the same records from a Python "
              "loop, no guest; lab: the lab's runner (C-timed on the native core); xpy: live over py, "
              "weighted by the run's reads and writes, median of per-round ratios.")
    con.print(f"{elapsed:.1f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"schema": "dmarw-bench-guest-device/1", "params": {
                "commands": params.commands, "ram_size": params.ram_size, "seed": params.seed,
                "rounds": args.rounds}, "rows": rows, "samples": samples, "elapsed_s": elapsed,
                "checksums_identical": len(sums) == 1}, f, indent=1)
    return 0 if len(sums) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
