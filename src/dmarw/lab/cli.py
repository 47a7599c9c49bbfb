"""``dmarw reproduce``, ``dmarw bench`` and ``dmarw workload``."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from rich.console import Console

from . import reproduce as R
from . import runner
from .paths import PATHS, resolve_core
from .source import trace_source
from .workload import DEFAULT_RAM, PROFILES, Workload, check_ram, generate


def _paths(text: str) -> list[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"--paths names no path (got {text!r}; have {', '.join(PATHS)})")
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


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _positive(text: str) -> int:
    v = _int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive (got {text!r})")
    if v > MAX_OPS:
        raise argparse.ArgumentTypeError(f"at most {MAX_OPS:,} (got {text!r})")
    return v


def _bytes(text: str) -> int:
    v = _int(text)
    if v < 64 << 10 or v % 4096:
        raise argparse.ArgumentTypeError(f"must be a multiple of 4096, at least 64 KiB (got {text!r})")
    return v


def _rounds(text: str) -> int:
    v = _positive(text)
    if v < R.MIN_ROUNDS:
        raise argparse.ArgumentTypeError(f"at least {R.MIN_ROUNDS} rounds: each verdict needs an interval over "
                                         f"{R.MIN_ROUNDS} or more (got {text!r})")
    return v


MAX_OPS = 40_000_000  # records per VM (the 2020 thread's run length): ~1 GB while generated
MAX_TOTAL_OPS = 80_000_000  # records over all VMs of one configuration


def check_size(ops: int | None, vms: Sequence[int]) -> None:
    """Refuse a run whose records would not fit this machine's memory comfortably."""
    if ops is not None and ops * max(vms) > MAX_TOTAL_OPS:
        raise SystemExit(f"--ops {ops:,} on {max(vms)} VMs is {ops * max(vms):,} records; at most "
                         f"{MAX_TOTAL_OPS:,} over all VMs of a configuration")


def check_output(path: str | None, flag: str) -> None:
    """Refuse, before any measuring, an output file that could not be written: a folder,
    a missing or read-only folder, a read-only file.  Nothing is created here."""
    if path is None:
        return
    if path == "" or os.path.isdir(path):
        raise SystemExit(f"{flag} {path!r} is a folder, not a file")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise SystemExit(f"{flag} {path}: no such folder {folder!r}")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise SystemExit(f"{flag} {path}: not writable")


def check_core(core: str | None) -> str:
    """The core this run will use; an unknown ``$DMARW_CORE`` or a native core asked for but
    not built is refused here, before any work."""
    try:
        return resolve_core(core)
    except (ValueError, ImportError) as e:
        raise SystemExit(str(e)) from None


def load_trace(path: str) -> Workload:
    """The trace, validated whole (every line, RAM bounds, the lab's largest access)."""
    if os.path.isdir(path):
        raise SystemExit(f"--trace {path}: is a folder, not a trace file")
    return Workload.load(path, max_size=runner.MAX_ACCESS)


def _console() -> Console:
    """stdout: the terminal's width; $COLUMNS when set; else (a file, a pipe) 150 columns."""
    c = Console()
    return c if c.is_terminal or os.environ.get("COLUMNS", "").isdigit() else Console(width=150)


def add_reproduce_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help=f"{R.NATIVE_QUICK_OPS:,} ops per VM on the native core ({R.QUICK_OPS:,} on the Python "
                   f"core), {R.QUICK_ROUNDS} rounds, a short sweep (make demo)")
    p.add_argument("--ops", type=_positive,
                   help=f"ops per VM per run (default: native {R.NATIVE_DEFAULT_OPS:,}, quick {R.NATIVE_QUICK_OPS:,}; "
                   f"Python {R.DEFAULT_OPS:,}, quick {R.QUICK_OPS:,})")
    p.add_argument("--seed", type=_int, default=0, help="random seed of the workload; VM i uses seed+i (default 0)")
    p.add_argument("--paths", type=_paths, default=list(PATHS), metavar="P1,P2",
                   help=f"comma list of access paths (default all): {', '.join(PATHS)}")
    p.add_argument("--vms", type=_vms, default=[1, 2], metavar="N1,N2",
                   help="VM counts to run, comma list of 1..16 (default 1,2)")
    p.add_argument("--profile", choices=PROFILES, default="glmark2", help="built-in workload profile (default glmark2)")
    p.add_argument("--trace", metavar="FILE",
                   help="replay this trace file (dmarw workload -o FILE; format in docs/lab.md) in every VM")
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip table (8), the access-size sweep")
    p.add_argument("--guest", action="store_true",
                   help="take each VM's accesses from dmarw's guest program on real KVM: the GPU-like "
                   "device's dma_rw calls serving its command ring (docs/guest.md)")
    p.add_argument("--guest-commands", type=_positive, metavar="N",
                   help="commands each real guest issues with --guest (default 100,000; quick 25,000)")
    p.add_argument("--rounds", type=_rounds,
                   help=f"interleaved rounds per configuration, at least {R.MIN_ROUNDS}: each verdict's interval "
                   f"is over the per-round figures (default {R.ROUNDS}; quick {R.QUICK_ROUNDS})")
    p.add_argument("--json", metavar="FILE", help="write every number, the machine and the workload (schema in docs/lab.md)")
    p.add_argument("--plot", metavar="FILE", help="write a PNG to FILE: bar charts, ours vs the 2020 thread, per table")
    p.add_argument("--core", choices=("python", "native"),
                   help="dmarw core (default: native when built; $DMARW_CORE overrides)")


def options_from(args: argparse.Namespace) -> R.Options:
    """The run's options with every input checked (core, trace, outputs): nothing measured yet."""
    check_output(args.json, "--json")
    check_output(args.plot, "--plot")
    check_core(args.core)
    check_size(args.ops, args.vms)
    access, params = None, {}
    if getattr(args, "guest", False):
        from ..guest.traffic import lab_commands, lab_source

        access, params = lab_source(args), {"source": "guest", "guest_commands": lab_commands(args)}
    elif args.trace:
        access, params = trace_source(load_trace(args.trace), args.ops), {"source": "trace"}
    return R.Options(quick=args.quick, ops=args.ops, seed=args.seed, paths=args.paths, vms=args.vms,
                     profile=args.profile, trace=args.trace, sweep=args.sweep, core=args.core,
                     rounds=args.rounds, access=access, access_params=params)


def run_reproduce(args: argparse.Namespace) -> int:
    R.reproduce(options_from(args), args.json, args.plot, _console())
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """One configuration: ``--path`` on ``--vms`` VMs; kvm too (for inc) unless --no-baseline."""
    check_output(args.json, "--json")
    core = check_core(args.core)
    check_size(args.ops, [args.vms])
    con = _console()
    if args.trace:
        base = load_trace(args.trace)
        if args.ops:
            base.records = base.records[: args.ops]
        wls = [base] * args.vms
    else:
        wls = [generate(args.profile, args.ops or 100_000, args.seed + i) for i in range(args.vms)]
    todo = [args.path] if args.no_baseline or args.path == "kvm" else ["kvm", args.path]
    results = {}
    from rich.progress import Progress, TaskID

    with Progress(console=(err := Console(stderr=True)), transient=True, disable=not err.is_terminal) as bar:
        for path in todo:
            task = bar.add_task(f"{path}, {args.vms} VM(s)", total=1)

            def cb(done: int, total: int, task: TaskID = task) -> None:
                bar.update(task, completed=done, total=total)

            results[path] = runner.run(path, wls, on_progress=cb, core=core)
    from rich.table import Table

    from .. import lockstat
    from .render import fit

    w = wls[0]
    con.print(f"workload: {w.profile} ({w.meta.get('source', f'random seed {w.seed}')}), {w.ops:,} ops per VM, "
              f"{args.vms} VM(s)")
    con.print(f"core {core}; {lockstat.cycles_source()}; timer overhead subtracted; ops over "
              f"{runner.OUTLIER_FACTOR}× their class's median (descheduled) left out")
    cols = [("path", "s"), ("read ns", "c"), ("write ns", "c"), ("avg ns", "c"), ("read cyc", "c"),
            ("write cyc", "c"), ("avg cyc", "c"), ("inc cyc", "c"), ("read cnt", "n"), ("write cnt", "n")]
    kvm = results.get("kvm")
    rows: list[list[R.Cell]] = []
    for path, r in results.items():
        inc = None if path == "kvm" or kvm is None else r.avg_cycles - kvm.avg_cycles
        rows.append([path, r.read_ns, r.write_ns, r.avg_ns, r.read_cycles, r.write_cycles, r.avg_cycles, inc,
                     r.reads, r.writes])
    for t in fit(R.Tab("", "per-op cost (timer overhead subtracted)", cols, rows), con.width):
        con.print(t)
    r = results[args.path]
    lt = Table(title=f"locks on {args.path}", caption=f"lock-statistics pass; uncontended mutex "
               f"{r.uncontended_mutex_cycles:,.0f} cycles", title_justify="left", caption_justify="left")
    for c in ("lock", "per op", "avg ns", "avg cyc"):
        lt.add_column(c, justify="left" if c == "lock" else "right", no_wrap=True)
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
    check_output(args.output, "--output")
    check_ram(args.ram_size, "--ram-size")
    w = generate(args.profile, args.ops, args.seed, args.ram_size)
    w.save(args.output)
    c = w.counts()
    _console().print(
        f"wrote {args.output}: {c['ops']:,} ops ({c['reads']:,} reads, {c['page_reads']:,} of them whole pages; "
        f"{c['writes']:,} writes), profile {w.profile}, random seed {w.seed}, guest RAM {w.ram_size:#x}"
    )
    return 0


def register_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="re-run the 2020 thread's study on dmarw's own paths: eight tables and verdicts",
                       description="Re-run the 2020 vfio_dma_rw thread's measurements on dmarw's own access paths: "
                       "eight tables (the thread's figures beside ours) and a statistical verdict per conclusion.")
    add_reproduce_args(p)
    p.set_defaults(func=run_reproduce)


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="one configuration: a path, a VM count, a workload or trace",
                       description="Time one access path on N VM processes (and kvm beside it for the inc column).")
    p.add_argument("--path", choices=list(PATHS), default="vfio-mutex", metavar="PATH",
                   help=f"access path: {', '.join(PATHS)} (default vfio-mutex)")
    p.add_argument("--vms", type=int, choices=range(1, 17), default=1, metavar="N", help="VM processes, 1..16 (default 1)")
    p.add_argument("--profile", choices=PROFILES, default="glmark2", help="built-in workload profile (default glmark2)")
    p.add_argument("--trace", metavar="FILE", help="replay a trace file (dmarw workload -o FILE) in every VM")
    p.add_argument("--ops", type=_positive, help="ops per VM (default 100,000; with --trace: the whole trace)")
    p.add_argument("--seed", type=_int, default=0, help="random seed of the workload; VM i uses seed+i (default 0)")
    p.add_argument("--no-baseline", action="store_true", help="do not also run kvm for the inc column")
    p.add_argument("--core", choices=("python", "native"), help="dmarw core (default: native when built; $DMARW_CORE)")
    p.add_argument("--json", metavar="FILE", help="write the runs as JSON (schema dmarw-bench/1)")
    p.set_defaults(func=run_bench)


def register_workload(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("workload", help="generate a workload and save it as a trace file",
                       description="Generate a seeded workload and write it as a dmarw-trace 1 file.")
    p.add_argument("--profile", choices=PROFILES, default="glmark2", help="workload profile (default glmark2)")
    p.add_argument("--ops", type=_positive, default=1_000_000, help="records to generate (default 1,000,000)")
    p.add_argument("--seed", type=_int, default=0, help="random seed (default 0)")
    p.add_argument("--ram-size", type=_bytes, default=DEFAULT_RAM, metavar="BYTES",
                   help=f"guest RAM the records fall in, a multiple of 4096 (default {DEFAULT_RAM:#x})")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="trace file to write")
    p.set_defaults(func=run_workload)
