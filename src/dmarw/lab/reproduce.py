"""``dmarw reproduce``: measure (:mod:`.measure`), tabulate (:mod:`.tables`), judge
(:mod:`.verdicts`), print (:mod:`.render`), and store the JSON document and the PNG.

Every figure of ours is measured in this run by :mod:`.runner`; the 2020 thread's figures
come only from :mod:`.reference`.  Absolute cycles cannot match (the thread timed kernel
code with ``get_cycles()``; on the native core we time each call in C with the native
counter, rdtsc where the TSC is invariant; on the Python core we time Python calls with
``perf_counter_ns`` and convert with the CPU frequency), so each table also gives ratios,
which can be compared.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from typing import Any

from rich.console import Console

from . import reference as REF
from .measure import (
    DEFAULT_OPS,
    MIN_ROUNDS,
    NATIVE_DEFAULT_OPS,
    NATIVE_QUICK_OPS,
    QUICK_OPS,
    QUICK_ROUNDS,
    ROUNDS,
    SWEEP_PATH,
    Options,
    Results,
    machine_info,
    measure,
)
from .paths import PATHS
from .render import report
from .stats import STATES
from .tables import Cell, Tab, tables
from .verdicts import Verdict, conclusions

SCHEMA = "dmarw-results/2"


def _round_json(res: Results, key: str) -> list[dict[str, Any]]:
    return [{"read_ns": r.read_ns, "write_ns": r.write_ns, "avg_ns": r.avg_ns,
             "uncontended_mutex_ns": r.uncontended_mutex_ns,
             "locks": {row["name"]: row["avg_ns"] for row in r.locks}} for r in res.rounds.get(key, [])]


def to_json(res: Results, tabs: list[Tab], verdicts: list[Verdict]) -> dict[str, Any]:
    """The JSON document (schema ``dmarw-results/2``, see docs/lab.md)."""
    reference = {
        "source": REF.SOURCE, "table1": REF.TABLE1, "table2": REF.TABLE2, "glmark2": REF.GLMARK2,
        "table3": REF.TABLE3, "table4": REF.TABLE4, "kvm_srcu_1vm": REF.KVM_SRCU_1VM,
        "uncontended_mutex": REF.UNCONTENDED_MUTEX, "timer_cost": REF.TIMER_COST, "table5": REF.TABLE5,
        "table6": REF.TABLE6, "external_user": REF.EXTERNAL_USER, "external_user_mmget": REF.EXTERNAL_USER_MMGET,
        "sweep_diff": {k: list(v) for k, v in REF.SWEEP_DIFF.items()},
        "sweep_crossover_pages": REF.SWEEP_CROSSOVER_PAGES,
    }
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "options": res.options.to_json(replayed=res.workload["profile"]),
        "machine": res.machine,
        "workload": res.workload,
        "paths": {p: {"kind": PATHS[p].kind, "lock": PATHS[p].lock, "mm_ref": PATHS[p].mm_ref,
                      "description": PATHS[p].description} for p in res.options.paths},
        "runs": {k: {**r.to_json(), "rounds": _round_json(res, k)} for k, r in res.runs.items()},
        "repeat": None if res.repeat is None else {"path": res.repeat_path, **res.repeat.to_json(),
                                                    "rounds": _round_json(res, "repeat")},
        "sweep": res.sweep,
        "tables": [t.to_json() for t in tabs],
        "conclusions": [v.to_json() for v in verdicts],
        "reference": reference,
    }


REQUIRED: dict[str, type | tuple[type, ...]] = {
    "schema": str, "created": str, "options": dict, "machine": dict, "workload": dict, "paths": dict,
    "runs": dict, "tables": list, "conclusions": list, "reference": dict,
}
OPTION_KEYS = ("quick", "source", "ops", "seed", "paths", "vms", "profile", "trace", "sweep", "sweep_reps", "core",
               "rounds")
RUN_KEYS = ("path", "vms", "ops_per_vm", "seeds", "reads", "writes", "read_ns", "write_ns", "avg_ns",
            "read_cycles", "write_cycles", "avg_cycles", "timer_overhead_ns", "uncontended_mutex_ns",
            "uncontended_mutex_cycles", "locks", "dirty_pages", "per_vm", "rounds")


def validate(doc: dict[str, Any]) -> list[str]:
    """Problems with a results document against the documented schema (empty: valid)."""
    errs = []
    for key, typ in REQUIRED.items():
        if not isinstance(doc.get(key), typ):
            errs.append(f"{key}: missing or not {typ}")
    if doc.get("schema") != SCHEMA:
        errs.append(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    for name, run in (doc.get("runs") or {}).items():
        for k in RUN_KEYS:
            if k not in run:
                errs.append(f"runs[{name}].{k} missing")
        for lk in run.get("locks", []):
            for k in ("name", "count", "per_op", "avg_ns", "avg_cycles"):
                if k not in lk:
                    errs.append(f"runs[{name}].locks[].{k} missing")
    opts = doc.get("options") or {}
    for k in OPTION_KEYS:
        if k not in opts:
            errs.append(f"options.{k} missing")
    if opts.get("source") == "profile" and not isinstance(opts.get("ops"), int):
        errs.append("options.ops: a generated profile's records per VM must be given")
    for k in ("cpu_model", "ncpu", "cpu_hz", "cycles_source", "timer_overhead_ns", "python"):
        if k not in (doc.get("machine") or {}):
            errs.append(f"machine.{k} missing")
    for k in ("profile", "seed", "ops", "ram_size", "reads", "writes", "page_reads"):
        if k not in (doc.get("workload") or {}):
            errs.append(f"workload.{k} missing")
    ids = [t.get("id") for t in doc.get("tables") or []]
    if ids != [str(i) for i in range(1, 9)]:
        errs.append(f"tables ids {ids} are not 1..8")
    for t in doc.get("tables") or []:
        for row in t.get("rows", []):
            if len(row) != len(t.get("columns", [])):
                errs.append(f"table {t.get('id')}: a row does not match its columns")
    for c in doc.get("conclusions") or []:
        if (set(c) != {"id", "claim", "verdict", "holds", "detail", "intervals"} or c["verdict"] not in STATES
                or c["holds"] not in (True, False, None)):
            errs.append(f"conclusion {c.get('id')}: bad shape")
            continue
        for iv in c["intervals"]:
            if set(iv) != {"what", "point", "lo", "hi", "n", "kind"} or not iv["lo"] <= iv["point"] <= iv["hi"]:
                errs.append(f"conclusion {c['id']}: bad interval {iv}")
    sw = doc.get("sweep")
    if sw is not None:
        for k in ("path", "rows", "crossover_bytes", "reps", "timer_overhead_ns"):
            if k not in sw:
                errs.append(f"sweep.{k} missing")
    return errs


def reproduce(
    opts: Options,
    json_path: str | None = None,
    plot_path: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Measure, print, and write the JSON and PNG; returns the JSON document."""
    con = console or Console()
    progress_con = Console(stderr=True)
    t0 = time.perf_counter()
    res = measure(opts, progress_con)
    elapsed = time.perf_counter() - t0
    tabs, verdicts = report(res, con)
    con.print(f"measured in {elapsed:.1f} s ({len(res.runs) + (res.repeat is not None)} configurations × "
              f"{opts.n_rounds()} rounds{', + the size sweep' if res.sweep else ''})")
    doc = to_json(res, tabs, verdicts)
    doc["elapsed_s"] = elapsed
    problems = validate(doc)
    if problems:
        raise RuntimeError("results do not match the schema: " + "; ".join(problems))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        con.print(f"wrote {json_path}")
    if plot_path:
        from .plot import plot

        plot(doc, plot_path)
        con.print(f"wrote {plot_path}")
    return doc


__all__ = [
    "DEFAULT_OPS", "MIN_ROUNDS", "NATIVE_DEFAULT_OPS", "NATIVE_QUICK_OPS", "QUICK_OPS", "QUICK_ROUNDS", "ROUNDS",
    "SCHEMA", "SWEEP_PATH", "Cell", "Options", "Results", "Tab", "Verdict", "conclusions", "machine_info",
    "measure", "reproduce", "tables", "to_json", "validate",
]
