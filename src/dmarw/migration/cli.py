"""``dmarw migrate``: migrate a guest while its vCPUs and a device write, then verify it.

Exit status (:mod:`dmarw.exitcodes`): 0 only when every page of the destination equals the
source's; 1 when the verification names differing pages; 3 when the migration itself was
refused or cancelled (the source kept running).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
from dataclasses import asdict

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from .. import exitcodes
from ..errors import DmaError
from ..mm import PAGE_SIZE
from .guest_cli import add_guest_arguments, run_guest_cli, want_guest
from .harness import Config, Outcome, run
from .incoming import parse_hostport, read_key, resolve, serve
from .source import RoundStats

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``1G``, ``64MiB``, ``4096`` → bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1G, 64M, 262144K)")
    return int(m.group(1)) * _UNITS[m.group(2)]


MAX_TIMEOUT = 86_400.0  # a day: socket waits take a finite, bounded number of seconds
MAX_RATE = 65_536.0  # writes per MiB streamed (256 per page sent): beyond it a writer never lets a round end


def _bandwidth(text: str) -> int:
    """``--max-bandwidth``: a size per second, at least 1 MiB/s."""
    v = parse_size(text)
    if v < 1 << 20:
        raise argparse.ArgumentTypeError(f"{text!r} is under 1 MiB/s (e.g. 256M)")
    return v


def _seconds(text: str) -> float:
    """``--timeout``: a finite number of seconds in (0, a day]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < v <= MAX_TIMEOUT:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, {MAX_TIMEOUT:,.0f}] seconds")
    return v


def _rate(text: str) -> float:
    """``--vcpu-rate``/``--dma-rate``: writes per MiB streamed, finite, in [0, MAX_RATE]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= v <= MAX_RATE:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} must be in 0..{MAX_RATE:,.0f} writes per MiB streamed")
    return v


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def _area(o: Outcome, gpa: int) -> str:
    ram, pinned = o.config.ram, o.config.pinned
    if gpa >= ram - pinned * PAGE_SIZE:
        return "pinned"
    return "device" if gpa >= (ram * 3 // 4) // PAGE_SIZE * PAGE_SIZE else "vCPU"


def report(o: Outcome, con: Console) -> int:
    """Print the rounds, totals, throughput and the verification line; returns the exit code."""
    r = o.report
    t = Table(title="pre-copy rounds", box=None, padding=(0, 1), collapse_padding=True, pad_edge=False)
    for col in ("round", "dirtied", "kvm log", "vfio log", "pinned", "sent", "bytes", "time"):
        t.add_column(col, justify="right")
    for st in r.rounds:
        t.add_row(
            "final" if st.final else str(st.round),
            f"{st.dirtied:,}",
            f"{st.kvm:,}",
            f"{st.vfio:,}",
            f"{st.pinned:,}",
            f"{st.sent:,}",
            f"{st.bytes:,}",
            f"{st.seconds * 1e3:,.1f} ms",
        )
    con.print(t)
    iters = len(r.rounds) - 1
    why = "dirty set under the threshold" if r.converged else f"round limit {o.config.max_rounds}"
    con.print(
        f"total: {iters} pre-copy round(s) + final ({why}); {r.pages_sent:,} pages, "
        f"{r.bytes_sent:,} bytes ({_mib(r.bytes_sent)}) in {r.total_seconds:.3f} s; "
        f"downtime {r.downtime_seconds * 1e3:.2f} ms (pause → destination complete)"
    )
    con.print(f"writes during the migration: {', '.join(f'{k} {v:,}' for k, v in o.writes.items())}")
    if o.plain is not None and r.total_seconds > 0:
        mig = r.bytes_sent / r.total_seconds
        ram_rate = o.config.ram / r.total_seconds
        con.print(
            f"plain copy of the same RAM over the same kind of stream (socketpair, no framing): "
            f"{_mib(o.plain.bytes)} in {o.plain.seconds:.3f} s = {_mib(o.plain.rate)}/s"
        )
        con.print(
            f"throughput vs plain copy: migration wire {_mib(mig)}/s = {mig / o.plain.rate:.2f}x; "
            f"RAM moved per second {_mib(ram_rate)}/s = {ram_rate / o.plain.rate:.2f}x"
        )
    n = r.npages
    if o.ok:
        con.print(f"verification: OK, {n} pages identical")
        return exitcodes.OK
    areas: dict[str, int] = {}
    for g in o.differing:
        areas[_area(o, g)] = areas.get(_area(o, g), 0) + 1
    shown = ", ".join(f"{g:#x}" for g in o.differing[:16])
    more = f" (first 16 of {len(o.differing)})" if len(o.differing) > 16 else ""
    by = ", ".join(f"{k} area {v}" for k, v in sorted(areas.items()))
    con.print(f"verification: FAILED, {len(o.differing)} of {n} pages differ ({by}): gpa {shown}{more}")
    return exitcodes.FAILED


class RoundProgress:
    """A transient rich progress bar on stderr, one task per round (no refresh thread: the
    run forks processes)."""

    def __init__(self, disable: bool) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=(err := Console(stderr=True)),
            transient=True,
            auto_refresh=False,
            disable=disable or not err.is_terminal,  # a pipe or a file: no bar, no stray blank line
        )
        self.task: TaskID | None = None
        self.frames = 0

    def round_start(self, rnd: int, pages: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"round {rnd}", total=max(pages, 1))
        self.progress.refresh()

    def sent(self, _n: int, pages: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, pages)
        self.frames += 1
        if self.frames % 16 == 0:
            self.progress.refresh()

    def round_end(self, _st: RoundStats) -> None:
        self.progress.refresh()


def check_output(path: str) -> None:
    """Refuse an output file that cannot be written, before any work."""
    import os

    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d) or os.path.isdir(path) or not os.access(d, os.W_OK):
        raise DmaError(errno.ENOENT, f"--json {path}: cannot write there (folder {d} missing, not writable, or a folder given)")


def console() -> Console:
    con = Console(soft_wrap=True)
    if not con.is_terminal and not os.environ.get("COLUMNS", "").isdigit():  # a pipe or a file: keep the numbers whole
        con = Console(soft_wrap=True, width=max(con.width, 120))
    return con


def _run(args: argparse.Namespace) -> int:
    key = read_key(args.key_file) if args.key_file else None  # a user's mistake: raised, one line
    guest = want_guest(args)
    if args.json:
        check_output(args.json)
    if guest:
        return run_guest_cli(args, key, console(), RoundProgress(args.no_progress))
    cfg = Config(
        ram=args.ram,
        seed=args.seed,
        vcpu_rate=args.vcpu_rate,
        dma_rate=args.dma_rate,
        pinned=args.pinned,
        threshold=args.threshold,
        max_rounds=args.max_rounds,
        max_bandwidth=args.max_bandwidth,
        device_bypass=args.device_bypass,
        no_vfio_log=args.no_vfio_log,
        ops=args.ops,
        core=args.core,
        to=args.to,
        key=key,
        timeout=args.timeout,
    )
    con = console()
    cfg.check()  # a user's mistake: raised before any work, main prints one line
    if cfg.to is not None:  # and a destination whose name does not resolve
        resolve(*parse_hostport(cfg.to, "--to"), f"--to {cfg.to}")
    mode = "device writes bypass dma_rw (raw hva)" if cfg.device_bypass else "device writes via dma_rw"
    if cfg.no_vfio_log:
        mode += "; the container's dirty bitmap is ignored"
    con.print(
        f"dmarw migrate: {_mib(cfg.ram)} guest RAM ({cfg.ram // PAGE_SIZE:,} pages), seed {cfg.seed}; "
        f"vCPU {cfg.vcpu_rate:g} + device {cfg.dma_rate:g} writes per MiB streamed "
        f"({cfg.profile} workload writes), {cfg.pinned} pinned pages; {mode}"
    )
    bar = RoundProgress(args.no_progress)
    try:
        with bar.progress:
            outcome = run(cfg, on_sent=bar.sent, on_round_start=bar.round_start, on_round_end=bar.round_end)
    except DmaError as e:
        Console(stderr=True, soft_wrap=True).print(
            f"dmarw migrate: migration failed, the source guest kept running: {e}", markup=False, highlight=False
        )
        return exitcodes.MIGRATION_FAILED
    con.print(f"core: {outcome.core}")
    rc = report(outcome, con)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "config": asdict(cfg),
                    "core": outcome.core,
                    "report": asdict(outcome.report),
                    "plain_copy": asdict(outcome.plain) if outcome.plain else None,
                    "writes": outcome.writes,
                    "differing_gpas": outcome.differing,
                    "ok": outcome.ok,
                },
                f,
                indent=1,
            )
    return rc


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "migrate",
        help="live-migrate a running guest (or a replayed one) and verify it two ways",
        description="Pre-copy migration driven by the KVM and VFIO dirty logs, to a second process or "
        "(--to) a `dmarw incoming` on another host. With KVM usable it migrates the guest program "
        "running on a KvmVm with the GPU-like device (--guest); --replay migrates RAM written by "
        "threads replaying the lab's workload instead.",
        epilog=exitcodes.EPILOG,
    )
    p.add_argument("--ram", type=parse_size, default=1 << 30, help="guest RAM size (default 1G)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the guest's choices (default 0)")
    add_guest_arguments(p)
    p.add_argument("--vcpu-rate", type=_rate, default=64.0, help="vCPU writes per MiB streamed (default 64)")
    p.add_argument("--dma-rate", type=_rate, default=32.0, help="device writes per MiB streamed (default 32)")
    p.add_argument("--pinned", type=int, default=16, help="pages the device pins and writes by hva (default 16)")
    p.add_argument("--threshold", type=int, default=256, help="stop iterating at this many dirty pages (default 256)")
    p.add_argument("--max-rounds", type=int, default=16, help="pre-copy round limit (default 16)")
    p.add_argument("--max-bandwidth", type=_bandwidth, metavar="RATE",
                   help="bytes per second a pre-copy round may send, e.g. 256M (default: no cap; the final round has none)")
    p.add_argument("--ops", type=int, default=20_000, help="workload records per writer, cycled (default 20000)")
    p.add_argument("--device-bypass", action="store_true", help="negative control: device writes the raw hva")
    p.add_argument("--no-vfio-log", action="store_true", help="negative control: ignore the container's dirty bitmap")
    p.add_argument("--core", choices=("python", "native"), help="dmarw core (default: native when built)")
    p.add_argument("--to", metavar="HOST:PORT", help="migrate to a `dmarw incoming` there (needs --key-file)")
    p.add_argument("--key-file", metavar="FILE", help="shared key (>= 16 bytes, used as they are) authenticating the stream")
    p.add_argument("--timeout", type=_seconds, default=30.0, help="seconds any wait for the destination may last (default 30)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", metavar="FILE", help="write every number of the run as JSON")
    p.set_defaults(func=_run)


def _incoming(args: argparse.Namespace) -> int:
    key = read_key(args.key_file)
    if args.timeout <= 0:
        raise DmaError(errno.EINVAL, f"--timeout {args.timeout:g} must be > 0")
    err = Console(stderr=True, soft_wrap=True)

    def log(msg: str) -> None:
        err.print(f"incoming: {msg}", markup=False, highlight=False)

    rc = serve(args.listen, key, timeout=args.timeout, log=log)
    log("done" if rc == 0 else "failed: nothing resumed")
    return exitcodes.OK if rc == 0 else exitcodes.MIGRATION_FAILED


def register_incoming(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "incoming",
        help="receive one migration on a TCP port (the destination of `dmarw migrate --to`)",
        description="Listen, authenticate the source with the shared key, receive and verify one migration.",
        epilog=exitcodes.EPILOG,
    )
    p.add_argument("--listen", metavar="HOST:PORT", required=True, help="address to listen on (port 0: any free port)")
    p.add_argument("--key-file", metavar="FILE", required=True, help="shared key (>= 16 bytes, used as they are)")
    p.add_argument("--timeout", type=_seconds, default=120.0, help="seconds any wait for the source may last (default 120)")
    p.set_defaults(func=_incoming)
