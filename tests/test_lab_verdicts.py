"""Verdicts from synthetic round data (no timing): a clear win holds, a clear loss does not,
a straddle is within noise; the intervals themselves; tables laid out at 80 and 120 columns
with no cell cut."""

from __future__ import annotations

import io
import math
import re

import pytest
from rich.console import Console

from dmarw.lab import stats, verdicts
from dmarw.lab.measure import Options, Results
from dmarw.lab.paths import PATHS
from dmarw.lab.render import fit
from dmarw.lab.runner import RunResult
from dmarw.lab.tables import fmt, tables

LOCKS = ("iommu.lock", "vfio.group_lock", "group.unbound_lock", "group.device_lock", "group.mutex", "task_lock",
         "kvm.srcu", "iommu.rcu")


def run(path: str, vms: int, avg: float, lock_ns: float = 30.0) -> RunResult:
    locks = [{"name": n, "count": 1000, "per_op": 1.0, "avg_ns": lock_ns, "avg_cycles": lock_ns * 3,
              "mean_ns": lock_ns} for n in LOCKS]
    return RunResult(path=path, vms=vms, ops_per_vm=1_234_567, seeds=[0] * vms, reads=7_777_777, writes=4_444_444,
                     read_ns=avg * 0.8, write_ns=avg * 1.3, avg_ns=avg, timer_overhead_ns=9.0,
                     uncontended_mutex_ns=25.0, uncontended_mutex_cycles=75.0, locks=locks, dirty_pages=[1234] * vms)


def results(avg: dict[tuple[str, int], list[float]], rounds: int = 6) -> Results:
    """Results whose per-round averages are ``avg[(path, vms)]`` (missing: 1000 ns every round)."""
    res = Results(Options(rounds=rounds, core="python"), {"core": "python", "loadavg": [0.5], "ncpu": 2}, {})
    for v in (1, 2):
        for p in PATHS:
            per = avg.get((p, v), [1000.0] * rounds)
            res.rounds[f"{p}/{v}vm"] = [run(p, v, a) for a in per]
            res.runs[f"{p}/{v}vm"] = run(p, v, sum(per) / len(per))
    res.repeat_path = "vfio-rwsem"
    res.repeat = res.runs["vfio-rwsem/1vm"]
    res.rounds["repeat"] = res.rounds["vfio-rwsem/1vm"]
    return res


def wobble(level: float, spread: float, n: int = 6) -> list[float]:
    return [level * (1 + spread * (-1) ** k * (k % 3 + 1) / 3) for k in range(n)]


@pytest.mark.parametrize(
    ("name", "mine", "expect"),
    [
        ("clear win", wobble(700.0, 0.01), stats.HOLDS),
        ("clear loss", wobble(1500.0, 0.01), stats.FAILS),
        ("straddle", wobble(1000.0, 0.5), stats.NOISE),
    ],
)
def test_rcu_claim_on_synthetic_rounds(name: str, mine: list[float], expect: str) -> None:
    base = [1000.0 * (1 + 0.002 * k) for k in range(6)]
    res = results({("vfio-rcu", 1): mine, ("vfio-external-user-mmget", 1): base})
    v = verdicts.x1(res)
    assert v.state == expect, name
    (label, iv), = v.intervals
    assert iv.n == 6 and iv.lo <= iv.point <= iv.hi
    assert f"[{iv.lo:.3f}, {iv.hi:.3f}]" in v.line() and expect.upper() in v.line()


def test_a_cost_claim_and_a_band_claim() -> None:
    k = [1000.0] * 6
    assert verdicts.c1(results({("kvm", 1): k, ("vfio-mutex", 1): wobble(1600, 0.02)})).state == stats.HOLDS
    assert verdicts.c1(results({("kvm", 1): k, ("vfio-mutex", 1): wobble(800, 0.02)})).state == stats.FAILS
    # C2 is a band (repeat within 3%): inside, far outside, and across its edge
    for mine, expect in ((wobble(1005, 0.005), stats.HOLDS), (wobble(1200, 0.01), stats.FAILS),
                         (wobble(1030, 0.02), stats.NOISE)):
        res = results({("vfio-rwsem", 1): [1000.0 * (1 + 0.001 * i) for i in range(6)]})
        res.rounds["repeat"] = [run("vfio-rwsem", 1, a) for a in mine]
        assert verdicts.c2(res).state == expect


def test_difference_claims_and_missing_runs() -> None:
    wide = {("kvm", 1): [1000.0] * 6, ("vfio-mutex", 1): [1500.0] * 6,
            ("kvm", 2): [1000.0] * 6, ("vfio-mutex", 2): wobble(2500, 0.01)}
    assert verdicts.c7(results(wide)).state == stats.HOLDS
    narrow = dict(wide)
    narrow[("vfio-mutex", 2)] = wobble(1100, 0.01)
    assert verdicts.c7(results(narrow)).state == stats.FAILS
    res = results({})
    for key in list(res.rounds):
        if key.startswith("vfio-rcu"):
            del res.rounds[key], res.runs[key]
    v = verdicts.x1(res)
    assert v.state == stats.MISSING and v.holds is None and "needs" in v.detail
    assert [c(res).id for c in verdicts.CLAIMS] == [f"C{i}" for i in range(1, 14)] + ["X1"]


def test_intervals_against_hand_computed_t() -> None:
    iv = stats.diff_interval([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(sum((x - 2.5) ** 2 for x in (1, 2, 3, 4)) / 3)
    assert iv is not None and iv.point == 2.5
    assert iv.hi - iv.point == pytest.approx(3.182 * sd / 2)
    r = stats.ratio_interval([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])
    assert r is not None and r.point == pytest.approx(2.0) and r.lo == pytest.approx(2.0)
    assert stats.ratio_interval([1.0], [1.0]) is None  # one round has no interval
    assert stats.t975(1000) == 1.960 and stats.t975(21) == stats.t975(20)
    assert stats.inside(stats.Interval(1.0, 0.9, 1.1, 4, "ratio"), 0.97, 1.03) == stats.NOISE
    assert stats.all_of([stats.HOLDS, stats.NOISE]) == stats.NOISE
    assert stats.all_of([stats.HOLDS, stats.FAILS]) == stats.FAILS


def sweep_doc() -> dict[str, object]:
    rows = []
    for size in (1, 8, 64, 512, 2048, 4096, *(p * 4096 for p in (2, 3, 4, 5, 6, 8, 10, 12, 16, 20))):
        k, vv = 100.0 + size / 40, 356.0 + size / 80  # they cross near 5 pages
        rows.append({"size": size, "pages": size / 4096, "kvm_ns": k, "vfio_ns": vv, "kvm_cycles": k * 3,
                     "vfio_cycles": vv * 3, "diff_ns": vv - k, "diff_cycles": (vv - k) * 3,
                     "kvm_rounds_ns": wobble(k, 0.01), "vfio_rounds_ns": wobble(vv, 0.01)})
    return {"rows": rows, "crossover_bytes": 3 * 4096, "path": "vfio-external-user", "reps": 150}


@pytest.mark.parametrize("width", [80, 120])
def test_tables_fit_without_cutting_a_cell(width: int) -> None:
    res = results({})
    res.sweep = sweep_doc()
    for tab in tables(res):
        buf = io.StringIO()
        con = Console(file=buf, width=width, color_system=None)
        for t in fit(tab, width):
            con.print(t)
        out = buf.getvalue()
        assert "…" not in out, f"table {tab.id} cut at {width} columns:\n{out}"
        assert max(len(line) for line in out.splitlines()) <= width
        for row in tab.rows:  # every cell printed whole
            for v, (_name, f) in zip(row, tab.cols, strict=True):
                assert fmt(v, f) in out, (tab.id, fmt(v, f))
    labels = [r[0] for r in tables(res)[2].rows]
    assert len(set(labels)) == len(labels) == 3  # mutex and rwsem rows stay apart


def test_the_sweep_claim_uses_per_round_sizes() -> None:
    res = results({})
    res.sweep = sweep_doc()
    v = verdicts.c13(res)
    assert v.state == stats.HOLDS and re.search(r"20 pages vfio/kvm ×0\.\d+ \[", v.line())
