"""The eight tables of ``dmarw reproduce``: the 2020 thread's figures beside ours.

A :class:`Tab` is data (columns with a format, rows of raw numbers); :mod:`.render` lays it
out for the terminal's width and :mod:`.reproduce` stores it in the JSON.  Column headers
start with ``2020`` (the thread's figures, from :mod:`.reference`) or ``ours`` (measured in
this run); a narrow terminal shows the two groups as separate tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import lockstat
from . import reference as REF
from .measure import SWEEP_PATH, Results
from .paths import PATHS
from .runner import RunResult

Cell = str | int | float | None
THEIRS = "2020"  # header prefix of the thread's columns
OURS = "ours"


@dataclass
class Tab:
    """One printed table: ``cols`` are (header, format) with format s / n / c / x / p."""

    id: str
    title: str
    cols: list[tuple[str, str]]
    rows: list[list[Cell]]
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "columns": [c for c, _ in self.cols],
            "rows": self.rows,
            "note": self.note,
        }


def fmt(v: Cell, f: str) -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if f == "x":
        return f"{v:.2f}×"
    if f == "p":
        return f"{v:+.1f}%"
    if f == "n":
        return f"{int(v):,}"
    if f == "c":
        return f"{v:,.0f}"
    if f == "f":
        return f"{v:.2f}"
    return f"{v}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _g(r: RunResult | None, attr: str) -> float | None:
    """``r.attr`` as a float, or None when the run was not made."""
    return None if r is None else float(getattr(r, attr))


def _l(row: dict[str, Any] | None, key: str) -> float | None:
    return None if row is None else float(row[key])


def _lock(r: RunResult | None, name: str, key: str) -> float | None:
    """Lock ``name``'s ``key`` in run ``r``, or None when the run or the lock is missing."""
    return _l(r.lock(name) if r else None, key)


def _cyc(ns: float | None) -> float | None:
    return None if ns is None else lockstat.ns_to_cycles(ns)


def _pct(a: float | None, b: float | None) -> float | None:
    r = _ratio(a, b)
    return None if r is None else (r - 1) * 100


def table1(res: Results) -> Tab:
    kvm, vfio = res.get("kvm", 1), res.get("vfio-mutex", 1)
    ours = {
        "kvm_write_guest": (_g(kvm, "write_ns"), _g(kvm, "write_ns")),
        "kvm_read_guest": (_g(kvm, "read_ns"), _g(kvm, "read_ns")),
        "vfio_dma_rw(w)": (_g(vfio, "write_ns"), _g(kvm, "write_ns")),
        "vfio_dma_rw(r)": (_g(vfio, "read_ns"), _g(kvm, "read_ns")),
    }
    ref_base = {"kvm_write_guest": "kvm_write_guest", "kvm_read_guest": "kvm_read_guest",
                 "vfio_dma_rw(w)": "kvm_write_guest", "vfio_dma_rw(r)": "kvm_read_guest"}
    rows: list[list[Cell]] = []
    for name, (ns, base) in ours.items():
        s = REF.TABLE1[name]
        rows.append([name, s["v1"], s["v2"], _ratio(s["v2"], REF.TABLE1[ref_base[name]]["v2"]),
                     ns, _cyc(ns), _ratio(ns, base)])
    return Tab("1", "per-interface average (one VM; ours: kvm and vfio-mutex paths)",
               [("interface", "s"), ("2020 v1 cyc", "c"), ("2020 v2 cyc", "c"), ("2020 ×kvm", "x"),
                ("ours ns", "c"), ("ours cyc", "c"), ("ours ×kvm", "x")], rows,
               "×kvm: each op over kvm's same op (read over kvm_read_guest, write over kvm_write_guest)")


def table2(res: Results) -> Tab:
    rows: list[list[Cell]] = []
    for name, s in REF.TABLE2.items():
        rows.append([f"2020 {name}", s["read"], s["read_cnt"], s["write"], s["write_cnt"], s["avg"]])
    rows.append(["2020 Δavg", None, None, None, None,
                 f"{_pct(REF.TABLE2['test 2']['avg'], REF.TABLE2['test 1']['avg']):+.2f}%"])
    p = res.repeat_path
    first = res.get(p, 1) if p else None
    for name, r in (("test 1", first), ("test 2", res.repeat)):
        if r is None:
            rows.append([f"ours {name}", None, None, None, None, None])
        else:
            rows.append([f"ours {name} (random seed {r.seeds[0]})", r.read_cycles, r.reads, r.write_cycles, r.writes, r.avg_cycles])
    d = _pct(_g(res.repeat, "avg_ns"), _g(first, "avg_ns"))
    rows.append(["ours Δavg", None, None, None, None, None if d is None else f"{d:+.2f}%"])
    return Tab("2", f"two repeat runs with counts (stability; 2020: rwsem patches, ours: {p or 'not run'})",
               [("run", "s"), ("avg read cyc", "c"), ("read cnt", "n"), ("avg write cyc", "c"),
                ("write cnt", "n"), ("avg cyc", "c")], rows,
               "ours: the same profile drawn with the next random seed, in the same rounds as test 1 (our counts are exact by construction)")


def _vm_table(res: Results, vms: int, tid: str, ref_tab: dict[str, dict[str, int | None]]) -> Tab:
    kvm = res.get("kvm", vms)
    rows: list[list[Cell]] = []
    for path, label in (("kvm", "kvm_read/write_page"), ("vfio-mutex", "vfio_dma_rw(mutex)"),
                        ("vfio-rwsem", "vfio_dma_rw(rwsem r)")):
        s = ref_tab[path]
        r = res.get(path, vms)
        inc = None if (r is None or kvm is None or path == "kvm") else r.avg_cycles - kvm.avg_cycles
        rows.append([label, s["read"], s["write"], s["avg"], s["inc"],
                     _ratio(s["avg"], ref_tab["kvm"]["avg"]),
                     _g(r, "read_cycles"), _g(r, "write_cycles"), _g(r, "avg_cycles"), inc,
                     _ratio(_g(r, "avg_ns"), _g(kvm, "avg_ns"))])
    what = "one VM" if vms == 1 else f"{vms} VMs at once"
    return Tab(tid, f"{what}: kvm vs vfio_dma_rw mutex vs rwsem (cycles)",
               [("path", "s"), ("2020 read", "c"), ("2020 write", "c"), ("2020 avg", "c"), ("2020 inc", "c"),
                ("2020 ×kvm", "x"), ("ours read", "c"), ("ours write", "c"), ("ours avg", "c"),
                ("ours inc", "c"), ("ours ×kvm", "x")], rows,
               "avg = weighted by the read/write counts; inc = avg − kvm avg")


def table4(res: Results) -> Tab:
    vfio, kvm = res.get("vfio-mutex", 1), res.get("kvm", 1)
    mutex = vfio or kvm
    probe = mutex.uncontended_mutex_cycles if mutex else None
    rows: list[list[Cell]] = []
    names = [("iommu.lock", "iommu->lock"), ("vfio.group_lock", "vfio.group_lock"),
             ("group.unbound_lock", "group->unbound_lock"), ("group.device_lock", "group->device_lock"),
             ("group.mutex", "group->mutex"), ("task_lock", "task_lock (get_task_mm)")]
    for key, label in names:
        row = vfio.lock(key) if vfio else None
        s = REF.TABLE4.get(key)
        rows.append([label, s, _ratio(s, REF.UNCONTENDED_MUTEX), _l(row, "avg_ns"), _l(row, "avg_cycles"),
                     _ratio(_l(row, "avg_cycles"), probe), _l(row, "per_op")])
    srcu = kvm.lock("kvm.srcu") if kvm else None
    rows.append(["kvm->srcu (kvm path)", REF.KVM_SRCU_1VM, _ratio(REF.KVM_SRCU_1VM, REF.UNCONTENDED_MUTEX),
                 _l(srcu, "avg_ns"), _l(srcu, "avg_cycles"), _ratio(_l(srcu, "avg_cycles"), probe),
                 _l(srcu, "per_op")])
    rows.append(["uncontended mutex", REF.UNCONTENDED_MUTEX, 1.0, _g(mutex, "uncontended_mutex_ns"), probe, 1.0, None])
    return Tab("4", "per-lock acquire cost on vfio_dma_rw, one VM (each includes its timer, as the 2020 figures do)",
               [("lock", "s"), ("2020 cyc", "c"), ("2020 ×mutex", "x"), ("ours ns", "c"), ("ours cyc", "c"),
                ("ours ×mutex", "x"), ("ours per call", "f")], rows,
               "×mutex: over an uncontended mutex timed the same way; task_lock is not in the 2020 table")


def table6(res: Results) -> Tab:
    def lock_cyc(path: str, vms: int, name: str) -> float | None:
        return _lock(res.get(path, vms), name, "avg_cycles")

    rows: list[list[Cell]] = []
    for label, path, name in (("iommu lock (mutex)", "vfio-mutex", "iommu.lock"),
                              ("iommu lock (rwsem r)", "vfio-rwsem", "iommu.lock"),
                              ("kvm->srcu", "kvm", "kvm.srcu")):
        s = REF.TABLE6[label]
        one, two = lock_cyc(path, 1, name), lock_cyc(path, 2, name)
        rows.append([label, s["one"], s["two"], _ratio(s["two"], s["one"]), one, two, _ratio(two, one)])
    one, two = lock_cyc("vfio-mutex", 1, "vfio.group_lock"), lock_cyc("vfio-mutex", 2, "vfio.group_lock")
    rows.append(["vfio.group_lock (host-global)", None, None, None, one, two, _ratio(two, one)])
    return Tab("6", "lock cost, one VM vs two (avg cycles per acquisition)",
               [("lock", "s"), ("2020 1 VM", "c"), ("2020 2 VMs", "c"), ("2020 ×", "x"),
                ("ours 1 VM", "c"), ("ours 2 VMs", "c"), ("ours ×", "x")], rows,
               "vfio.group_lock is the one lock both VM processes share (not in the 2020 table)")


def table7(res: Results) -> Tab:
    kvm1, kvm2 = res.get("kvm", 1), res.get("kvm", 2)
    ref_avg: dict[str, int | None] = {
        "kvm": REF.TABLE3["kvm"]["avg"], "vfio-mutex": REF.TABLE3["vfio-mutex"]["avg"],
        "vfio-external-user": REF.EXTERNAL_USER, "vfio-external-user-mmget": REF.EXTERNAL_USER_MMGET,
        "vfio-rcu": None,
    }
    ref_kvm = float(REF.TABLE3["kvm"]["avg"] or 1)
    rows: list[list[Cell]] = []
    for path, sv in ref_avg.items():
        r1, r2 = res.get(path, 1), res.get(path, 2)
        rows.append([PATHS[path].label + (" (beyond 2020)" if path == "vfio-rcu" else ""), sv,
                     None if sv is None else sv / ref_kvm, None if sv is None else sv - ref_kvm,
                     _g(r1, "avg_cycles"), _ratio(_g(r1, "avg_ns"), _g(kvm1, "avg_ns")),
                     None if (r1 is None or kvm1 is None) else r1.avg_cycles - kvm1.avg_cycles,
                     _g(r2, "avg_cycles"), _ratio(_g(r2, "avg_ns"), _g(kvm2, "avg_ns"))])
    return Tab("7", "external user (handle held across calls) and + mmget_not_zero (avg cycles)",
               [("path", "s"), ("2020 avg", "c"), ("2020 ×kvm", "x"), ("2020 inc", "c"),
                ("ours 1 VM", "c"), ("ours ×kvm", "x"), ("ours inc", "c"), ("ours 2 VMs", "c"),
                ("ours ×kvm 2", "x")], rows,
               f"2020: one VM; its {REF.EXTERNAL_USER} and {REF.EXTERNAL_USER_MMGET} are compared with its own "
               f"{REF.TABLE3['vfio-mutex']['avg']} (mutex) and {REF.TABLE3['kvm']['avg']} (kvm)")


def _ref_sweep_diff(size: int) -> str | None:
    pages = size / 4096
    if pages <= 1:
        lo, hi = REF.SWEEP_DIFF["<= 1 page"]
    elif pages == 5:
        lo, hi = REF.SWEEP_DIFF["5 pages"]
    elif pages == 20:
        lo, hi = REF.SWEEP_DIFF["20 pages"]
    else:
        return None
    return f"{lo:+}" if lo == hi else f"{lo:+} to {hi:+}"


def size_label(size: int) -> str:
    if size < 4096:
        return f"{size} B"
    return f"{size // 4096} page{'s' if size > 4096 else ''}"


def table8(res: Results) -> Tab:
    rows: list[list[Cell]] = []
    sw = res.sweep
    for row in sw["rows"] if sw else []:
        d = row["diff_cycles"]
        rows.append([size_label(row["size"]), row["kvm_cycles"], row["vfio_cycles"], d,
                     _ratio(row["vfio_ns"], row["kvm_ns"]), _ref_sweep_diff(row["size"]),
                     "vfio" if d < 0 else "kvm"])
    cross: int | None = sw["crossover_bytes"] if sw else None
    note = (f"crossover: vfio wins from {size_label(cross)} (2020: about {REF.SWEEP_CROSSOVER_PAGES} pages)"
            if cross else f"no crossover up to 20 pages (2020: about {REF.SWEEP_CROSSOVER_PAGES} pages)")
    return Tab("8", f"access-size sweep, {SWEEP_PATH} vs kvm (avg of a read and a write, cycles)",
               [("size", "s"), ("ours kvm", "c"), ("ours vfio", "c"), ("ours vfio−kvm", "c"),
                ("ours vfio/kvm", "x"), ("2020 vfio−kvm", "s"), ("cheaper", "s")], rows,
               note if sw else "not run")


def tables(res: Results) -> list[Tab]:
    return [table1(res), table2(res), _vm_table(res, 1, "3", REF.TABLE3), table4(res),
            _vm_table(res, 2, "5", REF.TABLE5), table6(res), table7(res), table8(res)]

