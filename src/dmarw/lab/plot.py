"""Bar charts of a results document: ours vs the 2020 thread, per table, as ratios.

Absolute cycles of a Python path and a kernel path are not comparable, so each panel plots
the ratio the table compares (over kvm, over an uncontended mutex, two VMs over one), the 2020
and ours side by side; the size sweep plots vfio/kvm per size.  Matplotlib's Agg backend:
no display needed.
"""

from __future__ import annotations

from typing import Any

REF_COLOUR = "#8c8c8c"
OURS_COLOUR = "#1f77b4"


def _col(tab: dict[str, Any], name: str) -> int:
    return list(tab["columns"]).index(name)


def _bars(ax: Any, title: str, labels: list[str], theirs: list[float | None], ours: list[float | None],
          ylabel: str, ref: float | None = 1.0) -> None:
    import numpy as np

    x = np.arange(len(labels))
    w = 0.38
    sv = [v if v is not None else 0.0 for v in theirs]
    ov = [v if v is not None else 0.0 for v in ours]
    b1 = ax.bar(x - w / 2, sv, w, label="2020 thread (kernel)", color=REF_COLOUR)
    b2 = ax.bar(x + w / 2, ov, w, label="ours (dmarw)", color=OURS_COLOUR)
    for bars, vals in ((b1, theirs), (b2, ours)):
        for rect, v in zip(bars, vals, strict=True):
            if v is not None:
                ax.annotate(f"{v:.2f}", (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                            ha="center", va="bottom", fontsize=7)
            else:
                ax.annotate("n/a", (rect.get_x() + rect.get_width() / 2, 0), ha="center", va="bottom", fontsize=7)
    if ref is not None:
        ax.axhline(ref, color="black", linewidth=0.6, linestyle=":")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=7, rotation=20, ha="right")
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.margins(y=0.15)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) else None


def plot(doc: dict[str, Any], path: str) -> None:
    """Write a PNG with one panel per table (1)-(8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tabs = {t["id"]: t for t in doc["tables"]}
    fig, axes = plt.subplots(2, 4, figsize=(20, 9.5))
    ax = axes.flat

    t = tabs["1"]
    _bars(ax[0], "(1) per interface, ×kvm same op", [r[0] for r in t["rows"]],
          [_num(r[_col(t, "2020 ×kvm")]) for r in t["rows"]], [_num(r[_col(t, "ours ×kvm")]) for r in t["rows"]],
          "× kvm")

    t = tabs["2"]
    ref_rows = [r for r in t["rows"] if str(r[0]).startswith("2020 test")]
    our_rows = [r for r in t["rows"] if str(r[0]).startswith("ours test")]
    ci = _col(t, "avg cyc")

    def rel(rows: list[list[Any]]) -> list[float | None]:
        base = _num(rows[0][ci]) if rows else None
        return [(_num(r[ci]) or 0.0) / base if base and _num(r[ci]) is not None else None for r in rows]

    _bars(ax[1], "(2) repeat runs, avg / test 1", ["test 1", "test 2"], rel(ref_rows), rel(our_rows), "× test 1")

    for i, tid, title in ((2, "3", "(3) one VM, avg ×kvm"), (4, "5", "(5) two VMs, avg ×kvm")):
        t = tabs[tid]
        _bars(ax[i], title, [r[0] for r in t["rows"]], [_num(r[_col(t, "2020 ×kvm")]) for r in t["rows"]],
              [_num(r[_col(t, "ours ×kvm")]) for r in t["rows"]], "× kvm")

    t = tabs["4"]
    _bars(ax[3], "(4) per lock, ×uncontended mutex", [str(r[0]).split(" (")[0] for r in t["rows"]],
          [_num(r[_col(t, "2020 ×mutex")]) for r in t["rows"]], [_num(r[_col(t, "ours ×mutex")]) for r in t["rows"]],
          "× mutex")

    t = tabs["6"]
    _bars(ax[5], "(6) lock cost, two VMs / one VM", [str(r[0]).split(" (host")[0] for r in t["rows"]],
          [_num(r[_col(t, "2020 ×")]) for r in t["rows"]], [_num(r[_col(t, "ours ×")]) for r in t["rows"]],
          "× one VM")

    t = tabs["7"]
    _bars(ax[6], "(7) external user, avg ×kvm (one VM)", [str(r[0]).split(" (")[0] for r in t["rows"]],
          [_num(r[_col(t, "2020 ×kvm")]) for r in t["rows"]], [_num(r[_col(t, "ours ×kvm")]) for r in t["rows"]],
          "× kvm")

    a8 = ax[7]
    sw = doc.get("sweep")
    if sw and sw.get("rows"):
        sizes = [r["size"] for r in sw["rows"]]
        a8.plot(sizes, [r["vfio_ns"] / r["kvm_ns"] for r in sw["rows"]], marker="o", color=OURS_COLOUR,
                label="ours: vfio/kvm")
        a8.axhline(1.0, color="black", linewidth=0.6, linestyle=":")
        if sw.get("crossover_bytes"):
            a8.axvline(sw["crossover_bytes"], color=OURS_COLOUR, linestyle="--", linewidth=0.8,
                       label=f"ours crossover {sw['crossover_bytes'] // 4096} pages")
        ref_x = doc["reference"]["sweep_crossover_pages"] * 4096
        a8.axvline(ref_x, color=REF_COLOUR, linestyle="--", linewidth=0.8,
                   label=f"2020 crossover ~{doc['reference']['sweep_crossover_pages']} pages")
        a8.set_xscale("log", base=2)
        ticks = [x for x in sizes if x in (1, 64, 512, 4096, 4 * 4096, 20 * 4096)]
        a8.set_xticks(ticks)
        a8.set_xticklabels([f"{x} B" if x < 4096 else f"{x // 4096} pg" for x in ticks])
        a8.minorticks_off()
        a8.set_xlabel("access size (pg = 4096 B page)", fontsize=8)
        a8.set_ylabel("vfio / kvm", fontsize=8)
        a8.tick_params(labelsize=7)
        a8.set_title(f"(8) size sweep, {sw['path']} / kvm", fontsize=9)
        a8.legend(fontsize=7)
    else:
        a8.set_title("(8) size sweep: not run", fontsize=9)
        a8.axis("off")

    handles, labels = ax[0].get_legend_handles_labels()
    m = doc["machine"]
    fig.legend(handles, labels, loc="upper right", fontsize=9)
    fig.suptitle(
        f"dmarw reproduce: 2020 thread (kernel) vs ours ({m['cpu_model']}, {m['ncpu']} CPUs, Python {m['python']}); "
        "ratios, because absolute cycles differ",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110, format="png")  # exactly ``path``, whatever its suffix
    plt.close(fig)
