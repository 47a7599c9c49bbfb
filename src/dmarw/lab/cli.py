"""``dmarw reproduce``, ``dmarw bench`` and ``dmarw workload``."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from ..errors import DmaError
from . import reproduce as R
from . import runner
from .paths import PATHS, resolve_core
from .workload import DEFAULT_RAM, PROFILES, Workload, generate


def _paths(text: str) -> list[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    for p in out:
        if p not in PATHS:
            raise argparse.ArgumentTypeError(f"unknown path {p!r} (have {', '.join(PATHS)})")
    return out


def _vms(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--vms takes VM counts like 1,2 (got {text!r})") from None
    if not out or any(v < 1 or v > 16 for v in out):
        raise argparse.ArgumentTypeError(f"--vms counts must be 1..16 (got {text!r})")
    return out


def _positive(text: str) -> int:
    v = int(text, 0)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive (got {text!r})")
    return v


def _console() -> Console:
    c = Console()
    return c if c.is_terminal else Console(width=150)


def add_reproduce_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help=f"{R.NATIVE_QUICK_OPS:,} ops per VM on the native core ({R.QUICK_OPS:,} on the Python "
                   "core), a short sweep (make demo)")
    p.add_argument("--ops", type=_positive,
                   help=f"ops per VM per run (default: native {R.NATIVE_DEFAULT_OPS:,}, quick {R.NATIVE_QUICK_OPS:,}; "
                   f"Python {R.DEFAULT_OPS:,}, quick {R.QUICK_OPS:,})")
    p.add_argument("--seed", type=int, default=0, help="workload seed; VM i uses seed+i (default 0)")
    p.add_argument("--paths", type=_paths, default=list(PATHS), help=f"comma list of: {', '.join(PATHS)}")
    p.add_argument("--vms", type=_vms, default=[1, 2], help="VM counts to run, comma list (default 1,2)")
    p.add_argument("--profile", choices=PROFILES, default="glmark2", help="built-in workload profile")
    p.add_argument("--trace", metavar="FILE", help="replay this trace file in every VM instead of a profile")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the access-size sweep (8)")
    p.add_argument("--rounds", type=_positive, help="round-robin rounds per configuration (default 8; quick 4)")
    p.add_argument("--json", metavar="FILE", help="write every number, the machine and the workload (docs/lab.md)")
    p.add_argument("--plot", metavar="FILE.png", help="bar charts, ours vs the seed, per table")
    p.add_argument("--core", choices=("python", "native"), help="dmarw core (default: native when built; $DMARW_CORE)")


def run_reproduce(args: argparse.Namespace) -> int:
    opts = R.Options(quick=args.quick, ops=args.ops, seed=args.seed, paths=args.paths, vms=args.vms,
                     profile=args.profile, trace=args.trace, sweep=args.sweep, core=args.core,
                     rounds=args.rounds)
    try:
        R.reproduce(opts, args.json, args.plot, _console())
    except (DmaError, ValueError, RuntimeError, ImportError) as e:
        Console(stderr=True).print(f"[red]dmarw reproduce: {e}[/]")
        return 1
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """One configuration: ``--path`` on ``--vms`` VMs; kvm too (for inc) unless --no-baseline."""
    con = _console()
    try:
        if args.trace:
            base = Workload.load(args.trace)
            if args.ops:
                base.records = base.records[: args.ops]
            wls = [base] * args.vms
        else:
            wls = [generate(args.profile, args.ops or 100_000, args.seed + i) for i in range(args.vms)]
        todo = [args.path] if args.no_baseline or args.path == "kvm" else ["kvm", args.path]
        results = {}
        from rich.progress import Progress, TaskID

        with Progress(console=Console(stderr=True), transient=True) as bar:
            for path in todo:
                task = bar.add_task(f"{path}, {args.vms} VM(s)", total=1)
                def cb(done: int, total: int, task: TaskID = task) -> None:
                    bar.update(task, completed=done, total=total)

                results[path] = runner.run(path, wls, on_progress=cb, core=args.core)
    except (DmaError, ValueError, RuntimeError, ImportError) as e:
        Console(stderr=True).print(f"[red]dmarw bench: {e}[/]")
        return 1
    from rich.table import Table

    from .. import lockstat

    w = wls[0]
    con.print(f"workload: {w.profile} ({w.meta.get('source', f'seed {w.seed}')}), {w.ops:,} ops per VM, {args.vms} VM(s)")
    con.print(f"core {resolve_core(args.core)}; {lockstat.cycles_source()}; timer overhead subtracted; ops over "
              f"{runner.OUTLIER_FACTOR}× their class's median (descheduled) left out")
    t = Table(title="per-op cost (timer overhead subtracted)", title_justify="left")
    for c in ("path", "read ns", "write ns", "avg ns", "read cyc", "write cyc", "avg cyc", "inc cyc",
              "read cnt", "write cnt"):
        t.add_column(c, justify="left" if c == "path" else "right")
    kvm = results.get("kvm")
    for path, r in results.items():
        inc = "/" if path == "kvm" or kvm is None else f"{r.avg_cycles - kvm.avg_cycles:,.0f}"
        t.add_row(path, f"{r.read_ns:,.0f}", f"{r.write_ns:,.0f}", f"{r.avg_ns:,.0f}", f"{r.read_cycles:,.0f}",
                  f"{r.write_cycles:,.0f}", f"{r.avg_cycles:,.0f}", inc, f"{r.reads:,}", f"{r.writes:,}")
    con.print(t)
    r = results[args.path]
    lt = Table(title=f"locks on {args.path}", caption=f"lock-statistics pass; uncontended mutex "
               f"{r.uncontended_mutex_cycles:,.0f} cycles", title_justify="left", caption_justify="left")
    for c in ("lock", "per op", "avg ns", "avg cyc"):
        lt.add_column(c, justify="left" if c == "lock" else "right")
    for row in r.locks:
        lt.add_row(row["name"], f"{row['per_op']:.2f}", f"{row['avg_ns']:,.0f}", f"{row['avg_cycles']:,.0f}")
    con.print(lt)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"schema": "dmarw-bench/1", "workload": w.params(), "vms": args.vms,
                       "runs": {p: x.to_json() for p, x in results.items()}}, f, indent=1)
        con.print(f"wrote {args.json}")
    return 0


def run_workload(args: argparse.Namespace) -> int:
    try:
        w = generate(args.profile, args.ops, args.seed, args.ram_size)
        w.save(args.output)
    except (DmaError, OSError) as e:
        Console(stderr=True).print(f"[red]dmarw workload: {e}[/]")
        return 1
    c = w.counts()
    _console().print(
        f"wrote {args.output}: {c['ops']:,} ops ({c['reads']:,} reads, {c['page_reads']:,} of them whole pages; "
        f"{c['writes']:,} writes), profile {w.profile}, seed {w.seed}, guest RAM {w.ram_size:#x}"
    )
    return 0


def register_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="re-run the seed's study on dmarw's own paths: eight tables and verdicts")
    add_reproduce_args(p)
    p.set_defaults(func=run_reproduce)


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="one configuration: a path, a VM count, a workload or trace")
    p.add_argument("--path", choices=list(PATHS), default="vfio-mutex")
    p.add_argument("--vms", type=int, choices=range(1, 17), default=1, metavar="N")
    p.add_argument("--profile", choices=PROFILES, default="glmark2")
    p.add_argument("--trace", metavar="FILE", help="replay a trace file (dmarw workload -o FILE)")
    p.add_argument("--ops", type=_positive, help="ops per VM (default 100,000; with --trace: the whole trace)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="do not also run kvm for the inc column")
    p.add_argument("--core", choices=("python", "native"), help="dmarw core (default: native when built; $DMARW_CORE)")
    p.add_argument("--json", metavar="FILE")
    p.set_defaults(func=run_bench)


def register_workload(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("workload", help="generate a workload and save it as a trace file")
    p.add_argument("--profile", choices=PROFILES, default="glmark2")
    p.add_argument("--ops", type=_positive, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ram-size", type=_positive, default=DEFAULT_RAM)
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.set_defaults(func=run_workload)
