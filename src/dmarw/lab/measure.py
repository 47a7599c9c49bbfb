"""What a ``dmarw reproduce`` run measures: its options, the configurations in interleaved
rounds, and the raw results (whole runs and each round apart, for the verdicts' intervals).

Every configuration (an access path on a VM count) runs in :meth:`Options.n_rounds` rounds;
round *k* runs share *k* of every configuration of one VM count back to back, each in fresh
VM processes (:mod:`.runner`), so a change of the shared machine's load hits them alike and
a round's figures can be paired across configurations (:mod:`.stats`).  The accesses come
from :attr:`Options.access` (:mod:`.source`): a profile, a trace, or any other source.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import __version__, lockstat
from ..errors import fail
from . import runner
from .paths import PATHS, resolve_core
from .runner import RunResult
from .source import AccessSource, profile_source, trace_source
from .workload import Workload

QUICK_OPS = 200_000  # Python core
DEFAULT_OPS = 400_000
NATIVE_QUICK_OPS = 1_000_000  # the native core runs ~50x more ops per second: longer, steadier passes
NATIVE_DEFAULT_OPS = 2_000_000
QUICK_SWEEP_REPS = 1000
SWEEP_REPS = 2000
SWEEP_PATH = "vfio-external-user"
MIN_ROUNDS = 4  # a verdict's interval needs at least this many paired rounds
QUICK_ROUNDS = 6
ROUNDS = 10

@dataclass
class Options:
    """What to run: ``paths`` on each VM count in ``vms``; workload ``profile`` or ``trace``."""

    quick: bool = False
    ops: int | None = None
    seed: int = 0
    paths: Sequence[str] = tuple(PATHS)
    vms: Sequence[int] = (1, 2)
    profile: str = "glmark2"
    trace: str | None = None
    sweep: bool = True
    sweep_reps: int | None = None
    lock_ops: int | None = None
    core: str | None = None  # python / native; None: native when built ($DMARW_CORE overrides)
    rounds: int | None = None  # each configuration's ops split over this many round-robin rounds
    access: AccessSource | None = None  # where each VM's records come from (default: profile or trace)
    # what ``access`` is, for the JSON's options: its ``source`` name ("trace", "guest"; else
    # "custom") and its own parameters (``guest_commands``)
    access_params: dict[str, Any] = field(default_factory=dict)
    _drawn: AccessSource | None = field(default=None, init=False, repr=False, compare=False)

    def source(self) -> AccessSource:
        """The run's access source: :attr:`access`, else the trace, else the profile."""
        if self.access is not None:
            return self.access
        if self._drawn is None:
            if self.trace is not None:
                self._drawn = trace_source(Workload.load(self.trace, max_size=runner.MAX_ACCESS), self.ops)
            else:
                self._drawn = profile_source(self.profile, self.n_ops)
        return self._drawn

    def source_name(self) -> str:
        """``profile`` (records generated here), ``trace``, or what :attr:`access_params` names."""
        if self.access is None:
            return "profile" if self.trace is None else "trace"
        return str(self.access_params.get("source", "custom"))

    def check(self) -> None:
        """Refuse what cannot run (``DmaError(EINVAL)``), before anything is measured."""
        for p in self.paths:
            if p not in PATHS:
                raise fail(errno.EINVAL, f"unknown path {p!r} (have {', '.join(PATHS)})")
        if not self.paths:
            raise fail(errno.EINVAL, "no path to run")
        if not self.vms or any(v < 1 for v in self.vms):
            raise fail(errno.EINVAL, f"VM counts {list(self.vms)} must be 1 or more")
        if self.n_rounds() < MIN_ROUNDS:
            raise fail(errno.EINVAL, f"{self.n_rounds()} rounds: the verdicts need at least {MIN_ROUNDS}")

    def n_rounds(self) -> int:
        if self.rounds is not None:
            return self.rounds
        return QUICK_ROUNDS if self.quick else ROUNDS

    @property
    def n_ops(self) -> int:
        if self.ops is not None:
            return self.ops
        if resolve_core(self.core) == "native":
            return NATIVE_QUICK_OPS if self.quick else NATIVE_DEFAULT_OPS
        return QUICK_OPS if self.quick else DEFAULT_OPS

    def to_json(self, replayed: str | None = None) -> dict[str, Any]:
        """What ran.  ``replayed``: the profile of the records replayed (a trace's own,
        ``guest``; default :attr:`profile`); ``ops`` is what was asked per VM, None when a
        trace or another source gave its own records uncut (their count is the workload's)."""
        generated = self.source_name() == "profile"
        return {
            "quick": self.quick,
            "source": self.source_name(),
            "ops": self.n_ops if generated else self.ops,
            "seed": self.seed,
            "paths": list(self.paths),
            "vms": list(self.vms),
            "profile": self.profile if replayed is None else replayed,
            "trace": self.trace,
            "sweep": self.sweep,
            "sweep_reps": self.reps(),
            "core": resolve_core(self.core),
            "rounds": self.n_rounds(),
            **{k: v for k, v in self.access_params.items() if k != "source"},
        }

    def reps(self) -> int:
        if self.sweep_reps is not None:
            return self.sweep_reps
        return QUICK_SWEEP_REPS if self.quick else SWEEP_REPS



@dataclass
class Results:
    """Everything measured in one reproduce run."""

    options: Options
    machine: dict[str, Any]
    workload: dict[str, Any]
    runs: dict[str, RunResult] = field(default_factory=dict)  # key "path/Nvm"
    repeat: RunResult | None = None  # table (2): the same path, the next random seed
    repeat_path: str | None = None
    sweep: dict[str, Any] | None = None
    rounds: dict[str, list[RunResult]] = field(default_factory=dict)  # key as runs, or "repeat": per round

    def get(self, path: str, vms: int) -> RunResult | None:
        return self.runs.get(f"{path}/{vms}vm")

    def per_round(self, path: str | None, vms: int) -> list[RunResult]:
        """The run's figures round by round (empty when the configuration was not run)."""
        return self.rounds.get(f"{path}/{vms}vm", []) if path else []


# -- machine ----------------------------------------------------------------------------
def machine_info(core: str | None = None) -> dict[str, Any]:
    """The machine this run measured (and the timer's own cost on it)."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    native = resolve_core(core) == "native"
    if native:
        from .runner import native_timer_overhead_ns

        overhead = native_timer_overhead_ns()
        timer = "native counter pair, timed in C (dmarw._native.timer_overhead)"
    else:
        overhead = lockstat.timer_overhead_ns()
        timer = "perf_counter_ns pair, timed in Python"
    return {
        "cpu_model": model,
        "ncpu": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "dmarw": __version__,
        "cpu_hz": lockstat.cpu_hz(),
        "cycles_source": lockstat.cycles_source(),
        "timer_overhead_ns": overhead,
        "timer_overhead_cycles": lockstat.ns_to_cycles(overhead),
        "timer": timer,
        "core": resolve_core(core),
    }


# -- running ---------------------------------------------------------------------------
def workloads_for(opts: Options, vms: int, seed: int) -> list[Workload]:
    """One workload per VM from the run's access source (VM i: seed ``seed + i`` for a profile)."""
    src = opts.source()
    return [src(i, seed) for i in range(vms)]


def _slice(w: Workload, k: int, rounds: int) -> Workload:
    """Round ``k`` of ``rounds``: the k-th contiguous share of ``w``'s records."""
    n = w.ops
    return dataclasses.replace(w, records=w.records[k * n // rounds : (k + 1) * n // rounds])


def measure(opts: Options, console: Console | None = None) -> Results:
    """Run every configuration with progress bars; returns the raw results."""
    con = console or Console(stderr=True)
    opts.check()
    base = workloads_for(opts, 1, opts.seed)[0]
    res = Results(opts, machine_info(opts.core), base.params())
    repeat_path = next((p for p in ("vfio-rwsem", "vfio-mutex") if p in opts.paths), None)
    if 1 not in opts.vms:
        repeat_path = None
    # (key, path, vms, seed) of every configuration; each runs in opts.n_rounds() rounds,
    # round-robin over the configurations of one VM count, so drift hits them all alike
    configs: list[tuple[str, str, int, int]] = []
    for v in opts.vms:
        for p in opts.paths:
            configs.append((f"{p}/{v}vm", p, v, opts.seed))
            if p == repeat_path and v == 1:
                configs.append(("repeat", p, 1, opts.seed + 1))
    rounds = opts.n_rounds()
    n_steps = len(configs) * rounds + bool(opts.sweep)
    with Progress(
        TextColumn("{task.description:<44}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=con,
        transient=True,
        disable=not con.is_terminal,  # a pipe or a file gets no bar (and no stray blank line)
    ) as bar:
        overall = bar.add_task("all configurations", total=n_steps)
        current = bar.add_task("", total=1)

        def step(desc: str, fn: Callable[[runner.Progress], Any]) -> Any:
            bar.reset(current, description=desc, total=1)

            def cb(done: int, total: int) -> None:
                bar.update(current, completed=done, total=max(total, 1))

            out = fn(cb)
            bar.advance(overall)
            return out

        drawn: dict[tuple[int, int], list[Workload]] = {}  # (VMs, seed) -> workloads, drawn once
        full: dict[str, list[Workload]] = {}
        for key, _p, v, seed in configs:
            if (v, seed) not in drawn:
                drawn[(v, seed)] = workloads_for(opts, v, seed)
            full[key] = drawn[(v, seed)]
        raw: dict[str, list[dict[str, Any]]] = {key: [] for key, *_ in configs}
        for v in opts.vms:
            for k in range(rounds):
                for key, path, vms, _seed in configs:
                    if vms != v:
                        continue
                    part = [_slice(w, k, rounds) for w in full[key]]

                    def one(cb: runner.Progress, path: str = path, wls: list[Workload] = part) -> list[dict[str, Any]]:
                        return runner.run_raw(path, wls, lock_ops=opts.lock_ops, on_progress=cb, core=opts.core)

                    label = "repeat, " if key == "repeat" else ""
                    raw[key] += step(f"{path}, {label}{v} VM{'s' if v > 1 else ''}, round {k + 1}/{rounds}", one)
        for key, path, vms, _seed in configs:
            r = runner.combine(path, raw[key], vms)
            res.rounds[key] = [runner.combine(path, raw[key][k * vms : (k + 1) * vms], vms) for k in range(rounds)]
            if key == "repeat":
                res.repeat, res.repeat_path = r, path
            else:
                res.runs[key] = r
        if opts.sweep:
            res.sweep = step(
                f"size sweep: kvm vs {SWEEP_PATH}",
                lambda cb: runner.sweep(SWEEP_PATH, reps=opts.reps(), seed=opts.seed, on_progress=cb, core=opts.core),
            )
    return res


