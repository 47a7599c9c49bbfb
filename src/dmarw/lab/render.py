"""Printing a run: the header, the tables laid out for the terminal, the verdict lines.

:func:`fit` never cuts a cell: a table that fits the width is printed whole; a wider one is
split into the 2020 thread's columns and ours (the first column repeated, the group's prefix
dropped from the headers); a group still too wide is split again by columns.
"""

from __future__ import annotations

from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import reference as REF
from . import runner
from .measure import Results
from .paths import PATHS
from .stats import FAILS, HOLDS, NOISE
from .tables import OURS, THEIRS, Cell, Tab, fmt, tables
from .verdicts import Verdict, conclusions, summary

_COLOUR = {HOLDS: "green", FAILS: "yellow", NOISE: "cyan"}


def _need(headers: list[str], rows: list[list[str]]) -> int:
    """Columns a rich table with the default box and padding takes for these cells."""
    widths = [max([cell_len(h), *(cell_len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    return sum(w + 3 for w in widths) + 1


def _table(title: str, note: str, headers: list[str], rows: list[list[str]], ref_cols: set[int]) -> Table:
    t = Table(title=title, caption=note or None, title_justify="left", caption_justify="left", header_style="bold")
    for i, name in enumerate(headers):
        t.add_column(name, justify="left" if i == 0 else "right", no_wrap=True,
                     style="cyan" if i in ref_cols else None)
    for row in rows:
        t.add_row(*(escape(c) for c in row))
    return t


def _chunks(idx: list[int], headers: list[str], rows: list[list[str]], width: int) -> list[list[int]]:
    """Column indices (after the first) grouped so that each group plus column 0 fits."""
    out: list[list[int]] = []
    cur: list[int] = []
    for i in idx:
        trial = [0, *cur, i]
        if cur and _need([headers[j] for j in trial], [[r[j] for j in trial] for r in rows]) > width:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def fit(tab: Tab, width: int) -> list[Table]:
    """``tab`` as one or more rich tables, none wider than ``width``, no cell truncated."""
    headers = [name for name, _f in tab.cols]
    rows = [[fmt(v, f) for v, (_n, f) in zip(row, tab.cols, strict=True)] for row in tab.rows]
    title = f"({tab.id}) {tab.title}" if tab.id else tab.title
    theirs = {i for i, h in enumerate(headers) if h.startswith(THEIRS + " ")}
    if _need(headers, rows) <= width:
        return [_table(title, tab.note, headers, rows, theirs)]
    groups = [(f"{THEIRS} thread", [i for i in range(1, len(headers)) if i in theirs], THEIRS + " "),
              (f"{OURS}, this run", [i for i in range(1, len(headers)) if i not in theirs], OURS + " ")]
    parts: list[tuple[str, list[int], str]] = []
    for name, idx, prefix in groups:
        if not idx:
            continue
        short = [headers[0], *(headers[i].removeprefix(prefix) for i in idx)]
        sub = [[r[0], *(r[i] for i in idx)] for r in rows]
        if _need(short, sub) <= width:
            parts.append((name, idx, prefix))
        else:
            chunks = _chunks(idx, headers, rows, width)
            parts += [(f"{name} ({k + 1}/{len(chunks)})", c, prefix) for k, c in enumerate(chunks)]
    out = []
    for n, (name, idx, prefix) in enumerate(parts):
        short = [headers[0], *(headers[i].removeprefix(prefix) for i in idx)]
        sub = [[r[0], *(r[i] for i in idx)] for r in rows]
        ref = {k + 1 for k, i in enumerate(idx) if i in theirs}
        out.append(_table(f"{title} — {name}", tab.note if n == len(parts) - 1 else "", short, sub, ref))
    return out


def verdict_line(v: Verdict) -> str:
    colour = _COLOUR.get(v.state, "dim")
    return f"[{colour}]{escape(v.line())}[/]"


def header(res: Results, con: Console) -> None:
    m, w, o = res.machine, res.workload, res.options
    con.print(f"[bold]dmarw reproduce[/] — the 2020 vfio_dma_rw thread's study re-run on dmarw's own code paths "
              f"({'quick' if o.quick else 'full'} mode)")
    con.print(f"machine: {m['cpu_model']}, {m['ncpu']} CPUs, load {m['loadavg'][0]:.2f}, Python {m['python']} "
              f"({m['implementation']}), dmarw {m['dmarw']}, core {m['core']}")
    con.print(f"timer: a {m.get('timer', 'perf_counter_ns pair')} costs {m['timer_overhead_ns']:.0f} ns "
              f"({m['timer_overhead_cycles']:.0f} cycles; 2020: get_cycles ~{REF.TIMER_COST}); subtracted from every op")
    con.print(f"{m['cycles_source']}")
    con.print(f"workload: {w['profile']} random seed {w['seed']}, {w['ops']:,} ops per VM (2020: "
              f"{REF.GLMARK2['ops'] // 1_000_000}M+), reads {w['reads'] / max(w['ops'], 1):.1%}, page reads "
              f"{w['page_reads'] / max(w['reads'], 1):.1%} of reads, guest RAM {w['ram_size'] >> 20} MiB; "
              f"VM i uses seed+i; {o.n_rounds()} interleaved rounds per configuration")
    if w.get("assumption"):
        con.print(f"  {escape(w['assumption'])}")
    con.print("paths: " + "; ".join(f"{p} = {PATHS[p].description}" for p in o.paths))
    ours = ("dmarw's C paths timed in C with the native counter" if m["core"] == "native"
            else "Python calls timed with perf_counter_ns")
    con.print(f"[bold]Absolute cycles differ from the 2020 thread's[/] (kernel C timed with get_cycles vs {ours}): "
              "compare the ratio columns (×kvm, ×mutex, ×).")
    runs = [*res.runs.values(), *([res.repeat] if res.repeat else [])]
    dropped = sum(r.dropped for r in runs)
    total = sum(r.reads + r.writes for r in runs)
    worst = max(runs, key=lambda r: r.dropped_share, default=None)
    con.print(f"deschedule filter: {dropped:,} of {total:,} timed ops ({dropped / max(total, 1):.2%}) took over "
              f"{runner.OUTLIER_FACTOR}× their class's median (the VM process was descheduled on the shared host) and "
              f"are left out of the averages"
              + (f"; worst run {worst.path}/{worst.vms} VM: {worst.dropped_share:.1%} of its time" if worst else ""))


def report(res: Results, con: Console) -> tuple[list[Tab], list[Verdict]]:
    """Print the header, the eight tables and the verdicts; returns them for JSON and plot."""
    header(res, con)
    tabs = tables(res)
    for tab in tabs:
        for t in fit(tab, con.width):
            con.print()
            con.print(t)
    verdicts = conclusions(res)
    con.print()
    con.print("[bold]The 2020 thread's conclusions, checked here[/] (each: the verdict, then the per-round "
              "interval it rests on)")
    for v in verdicts:
        con.print(verdict_line(v))
    con.print(summary(verdicts))
    return tabs, verdicts


__all__ = ["Cell", "fit", "header", "report", "verdict_line"]
