"""``dmarw guest``: the guest program and the GPU-like device on real KVM, with the checks.

Runs :class:`~dmarw.guest.machine.GuestMachine` on one path (``--path``) or all six
(``--all-paths``), prints the exits, the MMIO round trip and the doorbell as the guest
timed them (rdtsc), the device's per-command cost, and the checks; the guest's checksum is
also compared with the Python model of the guest.  Exit status 0 only when every check
holds.  Tables go to stdout (80 columns), progress to stderr, ``--json FILE`` keeps it all.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .. import lockstat
from ..devices.paths import PATH_NAMES
from ..lab.cli import check_core, check_output
from ..vmm import DEFAULT_DIRTY
from .machine import GuestMachine, RunReport
from .model import model_run
from .params import RAM_MAX, Params

DIRTY_MODES = ("bitmap", "clear", "ring")
SCHEMA = "dmarw-guest/1"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``16M``, ``1G``, ``4096K`` or a plain byte count (``0x`` allowed)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        v = int(t[: len(t) - len(unit)], 0) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: a byte count or e.g. 16M, 1G") from None
    if v <= 0 or v > RAM_MAX:
        raise argparse.ArgumentTypeError(f"size {text!r} must be in 1..{RAM_MAX:#x} bytes")
    return v


def _count(text: str) -> int:
    try:
        v = int(text.replace("_", "").replace(",", ""), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return v


def _console() -> Console:
    c = Console()
    return c if c.is_terminal else Console(width=80)


def run_one(path: str, params: Params, args: argparse.Namespace, bar: Progress | None) -> RunReport:
    m = GuestMachine(path, params, dirty=args.dirty, threaded=not args.inline, core=args.core)
    try:
        done = threading.Event()
        ticker = None
        if bar is not None:
            task = bar.add_task(f"guest on {path}", total=params.commands)

            def tick() -> None:
                while not done.wait(0.2):
                    bar.update(task, completed=m.device.regs.commands)

            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
        try:
            m.run()
        finally:
            done.set()
            if ticker is not None:
                ticker.join()
        return m.report()
    finally:
        m.close()


def _us(cycles: float, hz: float) -> str:
    return "-" if cycles != cycles else f"{cycles / hz * 1e6:,.1f}"


def render(con: Console, params: Params, args: argparse.Namespace, reports: list[RunReport],
           model: int | None, extra: list[tuple[str, bool, str]]) -> None:
    hz = lockstat.cpu_hz()
    con.print(f"guest: seed {params.seed}, {params.commands:,} commands in batches of {params.batch}, "
              f"{params.ram_size >> 20} MiB RAM, writer-heavy {params.writer_heavy}, dirty {args.dirty}, "
              f"device {'inline' if args.inline else 'threaded'}")
    t = Table(title="runs", title_justify="left", box=None, padding=(0, 1), collapse_padding=True, pad_edge=False)
    for c in ("path", "checksum", "wall s", "hlt", "mmio", "io", "waits", "checks"):
        t.add_column(c, justify="left" if c in ("path", "checksum") else "right", no_wrap=True)
    for r in reports:
        n_ok = sum(c.ok for c in r.checks)
        t.add_row(r.path, "-" if r.checksum is None else f"{r.checksum:016x}", f"{r.wall_s:.2f}",
                  str(r.exits.get("hlt", 0)), f"{r.exits.get('mmio', 0):,}", f"{r.exits.get('io', 0):,}",
                  f"{r.waits:,}", f"{n_ok}/{len(r.checks)}")
    con.print(t)
    cost = Table(title="cost (guest rdtsc for MMIO; device: host perf_counter)", title_justify="left",
              box=None, padding=(0, 1), collapse_padding=True, pad_edge=False)
    for col in ("path", "mmio us", "bell us", "cmd us", "rd ns", "wr ns", "fetch us"):
        cost.add_column(col, justify="left" if col == "path" else "right", no_wrap=True)
    for r in reports:
        d = r.device
        rd = d["read_ns"] / d["reads"] if d["reads"] else float("nan")
        wr = d["write_ns"] / d["writes"] if d["writes"] else float("nan")
        fe = d["fetch_ns"] / d["fetches"] / 1e3 if d["fetches"] else float("nan")
        cost.add_row(r.path, _us(r.mmio_probe_cycles, hz), _us(r.doorbell_cycles, hz),
                  f"{d['per_command_ns'] / 1e3:,.1f}", f"{rd:,.0f}", f"{wr:,.0f}", f"{fe:,.1f}")
    con.print(cost)
    con.print(f"mmio: the guest's ID-register read (the callback does nothing), {params.probes} "
              f"probes; bell: its doorbell store; both timed by the guest with rdtsc, at "
              f"{hz / 1e9:.2f} GHz. cmd: one command in the device, its dma_rw included (rd/wr: "
              f"the dma_rw alone); fetch: one ring read per doorbell span.")
    for r in reports:
        for ch in r.checks:
            if not ch.ok:
                con.print(f"FAIL {r.path}: {ch.name}: {ch.detail}")
    if reports:
        r0 = reports[0]
        con.print(f"pages: vCPU {r0.pages['vrec']:,} (kernel log {r0.pages['kernel']:,}), device "
                  f"{r0.pages['drec']:,} (user-space log {r0.pages['user']:,}, container "
                  f"{r0.pages['container']:,}) on {r0.path}")
    for name, ok, detail in extra:
        con.print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    if model is not None:
        con.print(f"model checksum {model:016x}")


def run(args: argparse.Namespace) -> int:
    # a bad size or count is a DmaError (EINVAL), raised before any work: dmarw.cli.main
    # prints it as one line
    params = Params(seed=args.seed, commands=args.commands, ram_size=args.ram, batch=args.batch,
                    writer_heavy=args.writer_heavy)
    check_output(args.json, "--json")
    check_core(args.core)
    paths = list(PATH_NAMES) if args.all_paths else [args.path]
    con = _console()
    reports: list[RunReport] = []
    t0 = time.perf_counter()
    with Progress(console=(err := Console(stderr=True)), transient=True, disable=not err.is_terminal) as bar:
        for path in paths:
            reports.append(run_one(path, params, args, bar))
    elapsed = time.perf_counter() - t0
    model = model_run(params).checksum
    sums = {r.checksum for r in reports}
    extra: list[tuple[str, bool, str]] = [
        ("guest checksum == the Python model's", sums == {model}, f"{model:016x}"),
    ]
    if len(paths) > 1:
        extra.append((f"checksum identical on all {len(paths)} paths", len(sums) == 1,
                      ", ".join(f"{s:016x}" if s is not None else "-" for s in sorted(sums, key=str))))
    render(con, params, args, reports, None, extra)
    ok = all(r.ok for r in reports) and all(e[1] for e in extra)
    if args.json:
        doc: dict[str, Any] = {
            "schema": SCHEMA, "elapsed_s": elapsed,
            "machine": {"cpu_hz": lockstat.cpu_hz(), "cycles_source": lockstat.cycles_source()},
            "runs": [r.as_dict() for r in reports], "model_checksum": f"{model:#018x}",
            "checks": [{"name": n, "ok": o, "detail": d} for n, o, d in extra], "ok": ok,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        con.print(f"wrote {args.json}")
    con.print("all checks hold" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("guest", help="run the guest program and the GPU-like device on real KVM, with checks",
                       description="Run dmarw's guest program on a KvmVm with the GPU-like device on one "
                       "access path (or all six), print exits, MMIO round trip, per-command cost, and "
                       "check the dirty logs against the guest's own record and the checksum across paths.")
    p.add_argument("--path", choices=PATH_NAMES, default="vfio-external-user", metavar="PATH",
                   help=f"the device's path: {', '.join(PATH_NAMES)} (default vfio-external-user)")
    p.add_argument("--all-paths", action="store_true", help="run all six paths, check one checksum")
    p.add_argument("--ram", type=parse_size, default=16 << 20, help="guest RAM, e.g. 16M (2M..1G; default 16M)")
    p.add_argument("--commands", type=_count, default=2000, help="device commands the guest issues (default 2000)")
    p.add_argument("--seed", type=_count, default=0, help="the guest's random seed (default 0)")
    p.add_argument("--batch", type=_count, default=16, help="commands per doorbell (1..64; default 16)")
    p.add_argument("--writer-heavy", type=_count, default=0, metavar="N",
                   help="before each doorbell the guest stores to N x 4096 more pages, a rolling window of its batch area (0..64; default 0)")
    p.add_argument("--dirty", choices=DIRTY_MODES, default=DEFAULT_DIRTY, help="KVM dirty-log mode")
    p.add_argument("--inline", action="store_true", help="run the device in the vCPU thread (no engine thread)")
    p.add_argument("--core", choices=("python", "native"), help="dmarw core (default: native when built)")
    p.add_argument("--json", metavar="FILE", help="write every figure and check as JSON")
    p.set_defaults(func=run)


