"""The 2020 thread's conclusions, each checked on this run: one small function per claim.

Every check compares figures round by round (:mod:`.stats`): a claim **holds** when its
whole 95% interval lies on the claimed side, **does not hold** when the whole interval
lies on the other side, and is **within noise** when the interval straddles the edge.
A check whose configurations were not run says **not measured**.  An explanation of why a
claim fails here is given only when it clearly does not hold.  The thread's figures in
the claims come from :mod:`.reference`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import lockstat
from . import reference as REF
from . import stats
from .measure import SWEEP_PATH, Results
from .runner import RunResult
from .stats import FAILS, HOLDS, MISSING, NOISE, Interval, diff_interval, ratio_interval
from .tables import size_label as _size_label


@dataclass
class Verdict:
    """One claim's outcome: ``state`` is one of :data:`dmarw.lab.stats.STATES`."""

    id: str
    claim: str
    state: str
    detail: str
    intervals: list[tuple[str, Interval]] = field(default_factory=list)

    @property
    def holds(self) -> bool | None:
        """True / False for a clear outcome; None when within noise or not measured."""
        return {HOLDS: True, FAILS: False}.get(self.state)

    def line(self) -> str:
        ivs = "; ".join(f"{name} {iv.text(' cycles' if iv.kind == 'diff' else '')}" for name, iv in self.intervals)
        n = f" over {self.intervals[0][1].n} rounds" if self.intervals else ""
        tail = f" — {self.detail}" if self.detail else ""
        return f"[{self.id}] {self.claim}: {self.state.upper()}{' — ' + ivs + n if ivs else ''}{tail}"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "claim": self.claim, "verdict": self.state, "holds": self.holds,
                "detail": self.detail,
                "intervals": [{"what": name, **iv.to_json()} for name, iv in self.intervals]}


def _missing(cid: str, claim: str, needs: str) -> Verdict:
    return Verdict(cid, claim, MISSING, f"needs {needs}")


def _rounds(res: Results, path: str, vms: int) -> list[RunResult]:
    return res.per_round(path, vms)


def _ratio(res: Results, a: str, b: str, vms: int, attr: str = "avg_ns") -> Interval | None:
    """Per-round ratio of path ``a`` over path ``b`` (same VM count, same rounds)."""
    ra, rb = _rounds(res, a, vms), _rounds(res, b, vms)
    if not ra or not rb:
        return None
    return ratio_interval([getattr(r, attr) for r in ra], [getattr(r, attr) for r in rb])


def _lock_ns(rs: Sequence[RunResult], name: str) -> list[float] | None:
    """Lock ``name``'s per-round average, or None when a round has no figure for it."""
    out = []
    for r in rs:
        row = r.lock(name)
        if row is None:
            return None
        out.append(float(row["avg_ns"]))
    return out or None


def _cyc(ns: float) -> float:
    return lockstat.ns_to_cycles(ns)


REF_KVM = float(REF.TABLE3["kvm"]["avg"] or 0)
REF_MUTEX = float(REF.TABLE3["vfio-mutex"]["avg"] or 0)
REF_RWSEM = float(REF.TABLE3["vfio-rwsem"]["avg"] or 0)


def _pct(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.1f}%"


# -- one function per claim -----------------------------------------------------------------
def c1(res: Results) -> Verdict:
    claim = (f"vfio_dma_rw costs more than kvm_read/write_guest (2020: +{REF.TABLE3['vfio-mutex']['inc']} cycles, "
             f"×{REF_MUTEX / REF_KVM:.2f})")
    k1, m1 = res.get("kvm", 1), res.get("vfio-mutex", 1)
    iv = _ratio(res, "vfio-mutex", "kvm", 1)
    if not (k1 and m1 and iv):
        return _missing("C1", claim, "the kvm and vfio-mutex paths with 1 VM")
    return Verdict("C1", claim, stats.above(iv, 1.0),
                   f"ours +{m1.avg_cycles - k1.avg_cycles:,.0f} cycles a call on average", [("vfio-mutex/kvm", iv)])


def c2(res: Results) -> Verdict:
    t1, t2 = REF.TABLE2["test 1"]["avg"], REF.TABLE2["test 2"]["avg"]
    claim = (f"weighting by read/write counts makes repeat runs agree within {REPEAT_BAND:.0%} "
             f"(2020: avg {t1} vs {t2}, {abs(t2 / t1 - 1):.2%})")
    first, again = res.per_round(res.repeat_path, 1), res.rounds.get("repeat", [])
    if not first or not again or res.repeat is None:
        return _missing("C2", claim, "a vfio path with 1 VM")
    iv = ratio_interval([r.avg_ns for r in again], [r.avg_ns for r in first])
    f = res.get(res.repeat_path or "", 1)
    detail = (f"ours {f.avg_cycles:,.0f} vs {res.repeat.avg_cycles:,.0f} cycles ({res.repeat_path}, the next random "
              f"seed in the same rounds)" if f else "")
    return Verdict("C2", claim, stats.inside(iv, 1 - REPEAT_BAND, 1 + REPEAT_BAND), detail, [("test 2/test 1", iv)] if iv else [])


REPEAT_BAND = 0.03


def c3(res: Results) -> Verdict:
    k, m = REF.TABLE3["kvm"], REF.TABLE3["vfio-mutex"]
    claim = (f"vfio_dma_rw adds to every read and every write, one VM (2020: +{m['read'] - k['read']} per read, "  # type: ignore[operator]
             f"+{m['write'] - k['write']} per write)")  # type: ignore[operator]
    ir, iw = _ratio(res, "vfio-mutex", "kvm", 1, "read_ns"), _ratio(res, "vfio-mutex", "kvm", 1, "write_ns")
    k1, m1 = res.get("kvm", 1), res.get("vfio-mutex", 1)
    if not (ir and iw and k1 and m1):
        return _missing("C3", claim, "kvm and vfio-mutex with 1 VM")
    return Verdict("C3", claim, stats.all_of([stats.above(ir, 1.0), stats.above(iw, 1.0)]),
                   f"ours +{m1.read_cycles - k1.read_cycles:,.0f} per read, +{m1.write_cycles - k1.write_cycles:,.0f} per write",
                   [("reads", ir), ("writes", iw)])


def c4(res: Results) -> Verdict:
    claim = (f"an rwsem iommu lock brings no real gain with one VM, no more than {RWSEM_GAIN:.0%} "
             f"(2020: {REF_RWSEM:.0f} vs {REF_MUTEX:.0f}, {_pct(REF_RWSEM, REF_MUTEX)})")
    iv = _ratio(res, "vfio-rwsem", "vfio-mutex", 1)
    if not iv:
        return _missing("C4", claim, "vfio-mutex and vfio-rwsem with 1 VM")
    li_m, li_w = _lock_ns(_rounds(res, "vfio-mutex", 1), "iommu.lock"), _lock_ns(_rounds(res, "vfio-rwsem", 1), "iommu.lock")
    why = ""
    if li_m and li_w:
        why = (f"our rwsem read side costs {sum(li_w) / len(li_w):.0f} ns against the mutex's "
               f"{sum(li_m) / len(li_m):.0f} ns; with one reader at a time there is nothing to share")
    return Verdict("C4", claim, stats.above(iv, 1 - RWSEM_GAIN), why, [("rwsem/mutex", iv)])


RWSEM_GAIN = 0.05


def c5(res: Results) -> Verdict:
    lo, hi = min(REF.TABLE4.values()), max(REF.TABLE4.values())
    claim = (f"lock contention in one VM is light: each lock within {LIGHT:.1f}× an uncontended mutex "
             f"(2020: {lo}–{hi} vs {REF.UNCONTENDED_MUTEX}, ≤{hi / REF.UNCONTENDED_MUTEX:.2f}×)")
    rs = _rounds(res, "vfio-mutex", 1)
    if not rs:
        return _missing("C5", claim, "vfio-mutex with 1 VM")
    probe = [r.uncontended_mutex_ns for r in rs]
    worst: tuple[str, Interval] | None = None
    for name in REF.TABLE4:
        ns = _lock_ns(rs, name)
        iv = ratio_interval(ns, probe) if ns else None
        if iv and (worst is None or iv.point > worst[1].point):
            worst = (name, iv)
    if worst is None:
        return Verdict("C5", claim, MISSING, "no lock statistics recorded")
    return Verdict("C5", claim, stats.below(worst[1], LIGHT),
                   f"the dearest lock is {worst[0]}, against the uncontended-mutex probe of each round",
                   [(f"{worst[0]}/mutex", worst[1])])


LIGHT = 1.5


def c6(res: Results) -> Verdict:
    t6 = REF.TABLE6
    claim = (f"two VMs raise lock costs a little, by more than nothing and at most {RISE_CAP:.0f}× (2020: iommu lock "
             f"×{t6['iommu lock (mutex)']['two'] / t6['iommu lock (mutex)']['one']:.2f}, kvm->srcu "
             f"×{t6['kvm->srcu']['two'] / t6['kvm->srcu']['one']:.2f})")
    pairs = (("iommu.lock 2/1 VMs", "vfio-mutex", "iommu.lock"), ("kvm.srcu 2/1 VMs", "kvm", "kvm.srcu"))
    ivs: list[tuple[str, Interval]] = []
    for label, path, name in pairs:
        one, two = _lock_ns(_rounds(res, path, 1), name), _lock_ns(_rounds(res, path, 2), name)
        iv = ratio_interval(two, one) if one and two and len(one) == len(two) else None
        if iv is None:
            return _missing("C6", claim, "kvm and vfio-mutex with 1 and 2 VMs, with lock statistics")
        ivs.append((label, iv))
    g1, g2 = (_lock_ns(_rounds(res, "vfio-mutex", v), "vfio.group_lock") for v in (1, 2))
    gl = ratio_interval(g2, g1) if g1 and g2 and len(g1) == len(g2) else None
    top = max(ivs, key=lambda x: x[1].point)
    state = stats.inside(top[1], 1.0, RISE_CAP)
    why = ("each VM process has its own container and kvm, so a second VM does not touch their locks; "
           "only vfio.group_lock is shared" if state == FAILS else "")
    return Verdict("C6", claim, state, why, [*ivs, *([("vfio.group_lock 2/1 VMs", gl)] if gl else [])])


RISE_CAP = 2.0


def c7(res: Results) -> Verdict:
    t3, t5 = REF.TABLE3, REF.TABLE5
    claim = (f"two VMs widen vfio's increment over kvm (2020: +{t3['vfio-mutex']['inc']} → +{t5['vfio-mutex']['inc']} "
             f"mutex, +{t3['vfio-rwsem']['inc']} → +{t5['vfio-rwsem']['inc']} rwsem)")
    k1, m1, k2, m2 = (_rounds(res, p, v) for v in (1, 2) for p in ("kvm", "vfio-mutex"))
    if not (k1 and m1 and k2 and m2) or len({len(k1), len(m1), len(k2), len(m2)}) != 1:
        return _missing("C7", claim, "kvm and vfio-mutex with 1 and 2 VMs")
    widen = [_cyc((b2.avg_ns - a2.avg_ns) - (b1.avg_ns - a1.avg_ns)) for a1, b1, a2, b2 in zip(k1, m1, k2, m2, strict=True)]
    iv = diff_interval(widen)
    r1, r2 = res.get("vfio-mutex", 1), res.get("vfio-mutex", 2)
    q1, q2 = res.get("kvm", 1), res.get("kvm", 2)
    detail = (f"ours mutex +{r1.avg_cycles - q1.avg_cycles:,.0f} → +{r2.avg_cycles - q2.avg_cycles:,.0f} cycles"
              if r1 and r2 and q1 and q2 else "")
    if iv and stats.above(iv, 0.0) == FAILS:
        detail += "; the VM processes share only vfio.group_lock, whose extra wait is small against our per-call cost"
    return Verdict("C7", claim, stats.above(iv, 0.0), detail, [("widening", iv)] if iv else [])


def c8(res: Results) -> Verdict:
    r, m = float(REF.TABLE5["vfio-rwsem"]["avg"] or 0), float(REF.TABLE5["vfio-mutex"]["avg"] or 0)
    claim = f"with two VMs the rwsem helps a little (2020: {r:.0f} vs {m:.0f}, {_pct(r, m)})"
    iv = _ratio(res, "vfio-rwsem", "vfio-mutex", 2)
    if not iv:
        return _missing("C8", claim, "vfio-mutex and vfio-rwsem with 2 VMs")
    state = stats.below(iv, 1.0)
    why = ("" if state != FAILS else "each VM has its own container, so its iommu lock has one reader at a time: "
           "an rwsem has no reader to share with")
    return Verdict("C8", claim, state, why, [("rwsem/mutex", iv)])


def c9(res: Results) -> Verdict:
    claim = (f"kvm's own 2-VM increase exceeds what kvm->srcu costs (2020: +{REF.KVM_2VM_INCREASE} vs "
             f"{REF.TABLE6['kvm->srcu']['two']} cycles)")
    k1, k2 = _rounds(res, "kvm", 1), _rounds(res, "kvm", 2)
    srcu = _lock_ns(k2, "kvm.srcu") if k2 else None
    if not (k1 and k2 and srcu) or len(k1) != len(k2):
        return _missing("C9", claim, "kvm with 1 and 2 VMs, with lock statistics")
    iv = diff_interval([_cyc(b.avg_ns - a.avg_ns - s) for a, b, s in zip(k1, k2, srcu, strict=True)])
    state = stats.above(iv, 0.0)
    why = ("" if state != FAILS else "our kvm path shares nothing between VM processes, so a second VM adds little")
    return Verdict("C9", claim, state, why, [("increase − srcu", iv)] if iv else [])


def c10(res: Results) -> Verdict:
    claim = (f"the external-user handle removes most of the gap, over {HANDLE_GAIN:.0%} (2020: {REF_MUTEX:.0f} → "
             f"{REF.EXTERNAL_USER}, {_pct(REF.EXTERNAL_USER, REF_MUTEX)})")
    iv = _ratio(res, "vfio-external-user", "vfio-mutex", 1)
    if not iv:
        return _missing("C10", claim, "vfio-mutex and vfio-external-user with 1 VM")
    return Verdict("C10", claim, stats.below(iv, 1 - HANDLE_GAIN),
                   "group lookup, viability and container-user steps (4 locks) leave the per-call path",
                   [("ext-user/mutex", iv)])


HANDLE_GAIN = 0.10


def c11(res: Results) -> Verdict:
    claim = (f"mmget_not_zero instead of get_task_mm saves more (2020: {REF.EXTERNAL_USER} → "
             f"{REF.EXTERNAL_USER_MMGET}, {_pct(REF.EXTERNAL_USER_MMGET, REF.EXTERNAL_USER)})")
    iv = _ratio(res, "vfio-external-user-mmget", "vfio-external-user", 1)
    if not iv:
        return _missing("C11", claim, "both external-user paths with 1 VM")
    tl = _lock_ns(_rounds(res, "vfio-external-user", 1), "task_lock")
    why = f"the saving is one task_lock, {_cyc(sum(tl) / len(tl)):,.0f} cycles a call here" if tl else ""
    return Verdict("C11", claim, stats.below(iv, 1.0), why, [("mmget/get_task_mm", iv)])


def c12(res: Results) -> Verdict:
    claim = (f"with handle + mmget_not_zero vfio is nearly as cheap as kvm, within {NEARLY:.1f}× (2020: "
             f"{REF.EXTERNAL_USER_MMGET} vs {REF_KVM:.0f}, ×{REF.EXTERNAL_USER_MMGET / REF_KVM:.2f})")
    iv = _ratio(res, "vfio-external-user-mmget", "kvm", 1)
    if not iv:
        return _missing("C12", claim, "kvm and vfio-external-user-mmget with 1 VM")
    state = stats.below(iv, NEARLY)
    why = ("" if state != FAILS else "vfio's fixed per-call steps (iommu lock, the address-space user count, a "
           "chunk walk) weigh more against our cheap copies than in the kernel")
    return Verdict("C12", claim, state, why, [("mmget/kvm", iv)])


NEARLY = 1.2


def c13(res: Results) -> Verdict:
    lo, hi = REF.SWEEP_DIFF["5 pages"]
    big_lo, big_hi = REF.SWEEP_DIFF["20 pages"]
    claim = (f"for large accesses vfio beats kvm, from about {REF.SWEEP_CROSSOVER_PAGES} pages: dearer below "
             f"{SMALL_PAGES} pages, cheaper from {LARGE_PAGES} (2020: {lo:+} at 5 pages, {big_hi:+} to {big_lo:+} at 20)")
    sw = res.sweep
    if not sw or not sw.get("rows") or "kvm_rounds_ns" not in sw["rows"][0]:
        return _missing("C13", claim, "the size sweep")
    ivs: dict[int, Interval] = {}
    for row in sw["rows"]:
        iv = ratio_interval(row["vfio_rounds_ns"], row["kvm_rounds_ns"])
        if iv:
            ivs[row["size"]] = iv
    small = [iv for size, iv in ivs.items() if size < SMALL_PAGES * 4096]
    large = [iv for size, iv in ivs.items() if size >= LARGE_PAGES * 4096]
    if not small or not large:
        return _missing("C13", claim, f"sweep sizes under {SMALL_PAGES} pages and from {LARGE_PAGES} pages")
    state = stats.all_of([*(stats.above(iv, 1.0) for iv in small), *(stats.below(iv, 1.0) for iv in large)])
    cross = sw.get("crossover_bytes")
    detail = f"ours: the medians cross at {_size_label(cross)}" if cross else "ours: the medians never cross"
    one = ivs.get(4096)
    top = max(ivs)
    shown = [*([("1 page vfio/kvm", one)] if one else []), (f"{top // 4096} pages vfio/kvm", ivs[top])]
    return Verdict("C13", claim, state, detail, shown)


SMALL_PAGES = 3
LARGE_PAGES = 8


def x1(res: Results) -> Verdict:
    claim = "beyond 2020: lock-free (RCU) readers beat the mutex external user"
    iv = _ratio(res, "vfio-rcu", "vfio-external-user-mmget", 1)
    if not iv:
        return _missing("X1", claim, "vfio-rcu and vfio-external-user-mmget with 1 VM")
    state = stats.below(iv, 1.0)
    why = "" if state != FAILS else "with one reader per container there is no contention for RCU to remove"
    return Verdict("X1", claim, state, why, [("rcu/mutex", iv)])


CLAIMS: list[Callable[[Results], Verdict]] = [c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, x1]


def conclusions(res: Results) -> list[Verdict]:
    """Every claim's verdict, in order."""
    return [check(res) for check in CLAIMS]


def summary(verdicts: Sequence[Verdict]) -> str:
    n = {s: sum(1 for v in verdicts if v.state == s) for s in (HOLDS, FAILS, NOISE, MISSING)}
    return (f"{n[HOLDS]} of {len(verdicts)} hold here; {n[FAILS]} do not; {n[NOISE]} within noise; "
            f"{n[MISSING]} not measured ({stats.METHOD}).")


__all__ = ["CLAIMS", "SWEEP_PATH", "Verdict", "conclusions", "summary"]
