"""The kernel's dirty-log modes compared on one running-guest migration each, in one run.

The same guest (RAM, seed, commands) is migrated once per mode (``bitmap``: KVM_GET_DIRTY_LOG;
``clear``: MANUAL_DIRTY_LOG_PROTECT2 + KVM_CLEAR_DIRTY_LOG; ``ring``: the per-vCPU dirty
ring) to a forked destination, and each run is verified both ways (every page at the
switchover, and the guest's checksum on the destination against the unmigrated run, which
runs once, first).  Per mode: pre-copy rounds, pages and bytes sent, the time spent
harvesting (all three logs, summed over rounds, and the final harvest alone), total time,
downtime and its parts.  A mode that fails (e.g. a dirty ring overrun) says why in its row.

Run: ``.venv/bin/python bench/migration_modes.py [--ram 64M] [--commands 3000] [--seed 0]
[--modes bitmap,clear,ring] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from dmarw.migration.cli import parse_size
from dmarw.migration.guest import reference_checksum
from dmarw.migration.guest_cli import kvm_unusable
from dmarw.migration.running import GuestConfig, GuestOutcome, run_guest_migration
from dmarw.vmm.dirty import MODES


def row(o: GuestOutcome) -> dict[str, Any]:
    r = o.report
    return {
        "rounds": len(r.rounds) - 1,
        "pages": r.pages_sent,
        "bytes": r.bytes_sent,
        "harvest_s": sum(st.harvest_seconds for st in r.rounds),
        "final_harvest_s": r.rounds[-1].harvest_seconds,
        "total_s": r.total_seconds,
        "downtime_s": r.downtime_seconds,
        "parts_s": dict(r.downtime_parts),
        "kvm_pages": sum(st.kvm for st in r.rounds[1:]),
        "vfio_pages": sum(st.vfio for st in r.rounds[1:]),
        "commands_at_stop": o.commands_at_stop,
        "pages_ok": o.pages_ok,
        "checksum_ok": o.checksum_ok,
        "guest_error": o.guest_error,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ram", type=parse_size, default=64 << 20, help="guest RAM (default 64M)")
    ap.add_argument("--commands", type=int, default=3000, help="device commands the guest issues (default 3000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated dirty modes (default all three)")
    ap.add_argument("--json", metavar="FILE", help="write every number as JSON")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"--modes: {','.join(bad) or 'none given'}; choose from {', '.join(MODES)}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        ap.error(f"--json {args.json}: its folder does not exist")
    why = kvm_unusable()
    if why:
        print(f"bench/migration_modes.py: cannot run here: {why}", file=sys.stderr)
        return 1
    con = Console(width=max(Console().width, 100))
    err = Console(stderr=True)
    base = GuestConfig(ram=args.ram, seed=args.seed, commands=args.commands, plain_copy=False)
    try:
        base.check()
    except OSError as e:  # a user's mistake: one line, before any work
        ap.error(str(e))
    t0 = time.perf_counter()
    err.print(f"unmigrated run: {args.ram >> 20} MiB, seed {args.seed}, {args.commands} commands ...")
    ref = reference_checksum(base.spec())
    ref_s = time.perf_counter() - t0
    results: dict[str, Any] = {}
    for mode in modes:
        err.print(f"migrating with dirty={mode} ...")
        cfg = GuestConfig(ram=args.ram, seed=args.seed, commands=args.commands, plain_copy=False, dirty=mode,
                          guest_timeout=4 * ref_s + 10.0)
        try:
            results[mode] = row(run_guest_migration(cfg, reference=ref))
        except OSError as e:
            results[mode] = {"error": str(e)}
    t = Table(title=f"dirty modes, one {args.ram >> 20} MiB running guest (seed {args.seed}, {args.commands} commands)")
    for col in ("mode", "rounds", "pages", "MiB", "harvest", "final harvest", "total", "downtime", "verified"):
        t.add_column(col, justify="right")
    for mode, d in results.items():
        if "error" in d:
            t.add_row(mode, "failed", d["error"][:60], "", "", "", "", "", "no")
            continue
        ok = "both" if d["pages_ok"] and d["checksum_ok"] else "NO"
        t.add_row(mode, str(d["rounds"]), f"{d['pages']:,}", f"{d['bytes'] / (1 << 20):,.1f}",
                  f"{d['harvest_s'] * 1e3:,.2f} ms", f"{d['final_harvest_s'] * 1e3:,.2f} ms",
                  f"{d['total_s']:.3f} s", f"{d['downtime_s'] * 1e3:,.2f} ms", ok)
    con.print(t)
    for mode, d in results.items():
        if d.get("guest_error"):
            con.print(f"{mode}: the destination's guest did not finish: {d['guest_error']}")
        if "parts_s" in d:
            con.print(f"{mode}: downtime parts " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in d["parts_s"].items()))
    con.print(f"unmigrated run: checksum {ref:#018x} in {ref_s:.2f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"ram": args.ram, "seed": args.seed, "commands": args.commands, "reference": ref,
                       "modes": results}, f, indent=1)
    return 0 if all("error" not in d and d["pages_ok"] and d["checksum_ok"] for d in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
