"""Migration throughput against plain copies of the same RAM, repeated, in one run.

Each trial migrates the same running guest (RAM, seed, commands; the unmigrated run's
checksum is recorded once, by the first trial) to a forked destination, verified both ways,
and times three kinds of plain copy of the same RAM over the same kind of socket in that
trial: ``write`` and ``sendfile`` while the guest runs (the migration's own conditions), and
``write`` before the guest starts; each kind is the median of three copies.  Per trial: round 0's time and rate, the whole migration's
rate (every byte sent over the total time), each ratio, the downtime and the pages sent
again; then the median, lowest and highest of each ratio over the trials.  A shared
machine moves each figure between trials: read the spread, not one trial.

Run: ``.venv/bin/python bench/migration_throughput.py [--ram 1G] [--trials 3] [--seed 0]
[--commands 20000] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from dmarw.migration.cli import parse_size
from dmarw.migration.guest_cli import kvm_unusable
from dmarw.migration.running import GuestConfig, GuestOutcome, run_guest_migration

MIB = 1 << 20


def trial(o: GuestOutcome) -> dict[str, Any]:
    r = o.report
    mig = r.bytes_sent / r.total_seconds
    out: dict[str, Any] = {
        "round0_s": r.rounds[0].seconds,
        "round0_rate": r.rounds[0].bytes / r.rounds[0].seconds,
        "total_s": r.total_seconds,
        "rate": mig,
        "downtime_s": r.downtime_seconds,
        "resent": sum(st.resent for st in r.rounds),
        "verified": o.ok,
        "sender_cpu_per_gib": r.sender_cpu_seconds * (1 << 30) / r.bytes_sent,
        "receiver_cpu_per_gib": float(o.stat.get("receive_cpu_seconds", 0.0)) * (1 << 30) / r.bytes_sent,
        "plain": {},
    }
    for p in ([o.plain] if o.plain else []) + o.plain_others:
        out["plain"][f"{p.api}, {p.when}"] = {
            "seconds": p.seconds, "rate": p.rate, "ratio": mig / p.rate,
            "sender_cpu_per_gib": p.sender_cpu * (1 << 30) / p.bytes,
            "receiver_cpu_per_gib": p.receiver_cpu * (1 << 30) / p.bytes,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ram", type=parse_size, default=1 << 30, help="guest RAM (default 1G)")
    ap.add_argument("--trials", type=int, default=3, help="migrations (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--commands", type=int, default=20000, help="device commands the guest issues (default 20000)")
    ap.add_argument("--json", metavar="FILE", help="write every number as JSON")
    args = ap.parse_args(argv)
    if not 1 <= args.trials <= 20:
        ap.error(f"--trials {args.trials}: 1..20")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        ap.error(f"--json {args.json}: its folder does not exist")
    why = kvm_unusable()
    if why:
        print(f"bench/migration_throughput.py: cannot run here: {why}", file=sys.stderr)
        return 1
    try:
        GuestConfig(ram=args.ram, seed=args.seed, commands=args.commands).check()
    except OSError as e:  # a user's mistake: one line, before any work
        ap.error(str(e))
    err = Console(stderr=True)
    rows: list[dict[str, Any]] = []
    ref: int | None = None
    for i in range(args.trials):
        err.print(f"trial {i + 1}/{args.trials}: {args.ram >> 20} MiB guest, seed {args.seed} ...")
        o = run_guest_migration(GuestConfig(ram=args.ram, seed=args.seed, commands=args.commands), reference=ref)
        ref = o.reference
        rows.append(trial(o))
    con = Console(width=max(Console().width, 80))
    t = Table(title=f"migration of a running {args.ram >> 20} MiB guest (round 0, all rounds) and plain copies "
                    "(with the guest running, before it started): MiB/s, x = migration / copy")
    names = list(rows[0]["plain"])
    short = [n.split(", ")[0] + ("\nrunning" if "running" in n else "\nbefore") for n in names]
    for col in ("trial", "round 0", "all", *short, "downtime", "ok"):
        t.add_column(col, justify="right")
    for i, d in enumerate(rows):
        cells = [f"{d['plain'][n]['rate'] / MIB:,.0f} {d['plain'][n]['ratio']:.2f}x" for n in names]
        t.add_row(str(i + 1), f"{d['round0_rate'] / MIB:,.0f}", f"{d['rate'] / MIB:,.0f}", *cells,
                  f"{d['downtime_s'] * 1e3:.2f} ms", "yes" if d["verified"] else "NO")
    con.print(t)
    c = Table(title="CPU seconds per GiB moved (median over the trials): why the ratios are what they are")
    for col in ("transfer", "sending thread", "receiving process", "both"):
        c.add_column(col, justify="right")
    med = statistics.median
    for name, key in [("migration", None), *((n, n) for n in names)]:
        src = [d if key is None else d["plain"][key] for d in rows]
        snd, rcv = med(x["sender_cpu_per_gib"] for x in src), med(x["receiver_cpu_per_gib"] for x in src)
        c.add_row(name, f"{snd:.3f}", f"{rcv:.3f}", f"{snd + rcv:.3f}")
    con.print(c)
    summary = {}
    for n in names:
        ratios = [d["plain"][n]["ratio"] for d in rows]
        summary[n] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        con.print(f"migration / plain copy ({n}): median {summary[n]['median']:.2f}x "
                  f"(lowest {summary[n]['min']:.2f}x, highest {summary[n]['max']:.2f}x over {len(rows)} trials)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"ram": args.ram, "seed": args.seed, "commands": args.commands, "trials": rows,
                       "summary": summary}, f, indent=1)
    return 0 if all(d["verified"] for d in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
