"""``dmarw migrate --guest``: migrate the running guest program and let it prove the result.

Exit status: 0 only when every page at switchover is identical and the guest's checksum on
the destination equals the unmigrated run's; 1 when a verification fails; 3 when the
migration itself failed (the source guest kept running).
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from .. import exitcodes
from ..errors import DmaError
from ..lab.cli import MAX_OPS
from ..vmm import DEFAULT_DIRTY
from ..vmm.dirty import MODES
from .running import GuestConfig, GuestOutcome, run_guest_migration

if TYPE_CHECKING:
    from .cli import RoundProgress


@functools.cache
def kvm_unusable() -> str | None:
    """Why a running guest cannot be migrated here, or None."""
    try:
        from ..guest import image
        from ..vmm import native_available
        from ..vmm.system import system

        if not native_available():
            return "the native vCPU loop dmarw._vmm is not built"
        system()
        image()
    except OSError as e:
        return str(e)
    return None


def want_guest(args: argparse.Namespace) -> bool:
    """Guest mode: asked for, or the default when KVM is usable and --replay not given."""
    if args.ops < 1:
        raise DmaError(errno.EINVAL, f"--ops {args.ops} must be >= 1 (workload records per writer)")
    if args.ops > MAX_OPS:  # two writers' records are generated in memory before the run
        raise DmaError(errno.EINVAL, f"--ops {args.ops:,} is more than {MAX_OPS:,} workload records per writer")
    if args.replay and args.guest:
        raise DmaError(errno.EINVAL, "--guest and --replay exclude each other")
    if not args.guest:  # --replay, or replay because KVM is unusable: these would be ignored
        given = [flag for flag, value, default in GUEST_ONLY if getattr(args, value) != default]
        if given and (args.replay or kvm_unusable() is not None):
            raise DmaError(errno.EINVAL, f"{', '.join(given)}: only with a running guest (--guest), not --replay")
    if args.replay:
        return False
    why = kvm_unusable()
    if args.guest and why is not None:
        raise DmaError(errno.ENODEV, f"--guest needs KVM: {why}")
    if why is None:  # the running guest has its own writers and core: these would be ignored
        given = [flag for flag, value, default in REPLAY_ONLY if getattr(args, value) != default]
        if given:
            raise DmaError(errno.EINVAL, f"{', '.join(given)}: only with --replay (the running guest does its "
                           "own writes on the default core)")
    return why is None


GUEST_ONLY = (("--commands", "commands", 20_000), ("--batch", "batch", 16), ("--writer-heavy", "writer_heavy", False),
              ("--dirty", "dirty", DEFAULT_DIRTY), ("--no-kvm-log", "no_kvm_log", False),
              ("--no-auto-converge", "no_auto_converge", False), ("--device-process", "device_process", False),
              ("--precopy-commands", "precopy_commands", None))
# flags of the replay mode only: (flag, attribute, default)
REPLAY_ONLY = (("--vcpu-rate", "vcpu_rate", 64.0), ("--dma-rate", "dma_rate", 32.0), ("--pinned", "pinned", 16),
               ("--ops", "ops", 20_000), ("--core", "core", None))


def add_guest_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("running guest (--guest, the default where KVM is usable)")
    g.add_argument("--guest", action="store_true", help="migrate the guest program running on a KvmVm with the device")
    g.add_argument("--replay", action="store_true", help="migrate RAM written by replay threads instead (no KVM needed)")
    g.add_argument("--commands", type=int, default=20_000, help="device commands the guest issues (default 20000)")
    g.add_argument("--batch", type=int, default=16, help="commands per doorbell (default 16)")
    g.add_argument("--writer-heavy", action="store_true", help="the guest also sweeps its batch area, one store a page, before each doorbell")
    g.add_argument("--dirty", choices=MODES, default=DEFAULT_DIRTY,
                   help=f"how the kernel's dirty log is read (default {DEFAULT_DIRTY})")
    g.add_argument("--no-kvm-log", action="store_true", help="negative control: ignore the kernel's dirty log")
    g.add_argument("--no-auto-converge", action="store_true", help="never throttle the vCPU")
    g.add_argument("--precopy-commands", type=int, metavar="N",
                   help="after round 0, wait for the device to serve N more commands before the next harvest "
                   "(default: 4 batches under a negative control, so it always has writes to lose; else 0)")
    g.add_argument("--device-process", action="store_true",
                   help="the device runs in a 'dmarw serve' process on each side, attached over vfio-user; "
                   "its DMA-logging report joins the dirty set (--no-vfio-log leaves it out)")


def _ms(s: float) -> str:
    return f"{s * 1e3:,.2f} ms"


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def report(o: GuestOutcome, con: Console) -> int:
    """Rounds, totals, downtime parts, throughput, then the two verification lines."""
    r = o.report
    t = Table(title="pre-copy rounds (pages dirtied per log, sent, bytes, time, throttle)", box=None,
              padding=(0, 1), collapse_padding=True, pad_edge=False)
    for col in ("round", "kvm log", "user log", "vfio log", "sent", "bytes", "harvest", "time", "throttle"):
        t.add_column(col, justify="right")
    for st in r.rounds:
        t.add_row("final" if st.final else str(st.round), f"{st.kvm:,}", f"{st.user:,}", f"{st.vfio:,}",
                  f"{st.sent:,}", f"{st.bytes:,}", _ms(st.harvest_seconds), _ms(st.seconds), f"{st.throttle:.0%}")
    con.print(t)
    why = "dirty set under the threshold" if r.converged else f"round limit {o.config.max_rounds}"
    con.print(f"total: {len(r.rounds) - 1} pre-copy round(s) + final ({why}); {r.pages_sent:,} pages, "
              f"{r.bytes_sent:,} bytes ({_mib(r.bytes_sent)}) in {r.total_seconds:.3f} s")
    parts = ", ".join(f"{k} {_ms(v)}" for k, v in r.downtime_parts.items())
    con.print(f"downtime: {_ms(r.downtime_seconds)} = {parts}")
    total = o.stat.get("commands") or o.config.commands
    con.print(f"guest at switchover: {o.commands_at_stop:,} of {total:,} device commands done; "
              f"vCPU throttled for {o.throttled_seconds * 1e3:,.0f} ms in all")
    if o.config.hold():
        con.print(f"pre-copy waited {_ms(o.held_seconds)} after round 0 while the device served "
                  f"{o.held_commands:,} commands (asked: {o.config.hold():,})")
    resent = sum(st.resent for st in r.rounds)
    con.print(f"pages sent again because their live copy failed its check on the destination: {resent:,}")
    streamed = r.total_seconds - o.held_seconds  # the wait after round 0 is not the stream's
    if o.plain is not None and streamed > 0:
        mig = r.bytes_sent / streamed
        less = ", less the wait after round 0" if o.held_seconds else ""
        con.print(f"throughput: migration {_mib(mig)}/s (bytes sent over the total time{less}), against plain")
        con.print(f"copies of the same {_mib(o.plain.bytes)} over the same kind of socket (no framing, check or log):")
        tp = Table(box=None, padding=(0, 1), collapse_padding=True, pad_edge=False)
        for col in ("transfer", "when", "time", "MiB/s", "migration", "CPU s/GiB"):
            tp.add_column(col, justify="left" if col in ("transfer", "when") else "right")
        gib = (1 << 30) / r.bytes_sent
        rcv = float(o.stat.get("receive_cpu_seconds", 0.0))
        tp.add_row("migration", "guest running", f"{streamed:.3f} s", f"{mig / (1 << 20):,.1f}", "1.00x",
                   f"{r.sender_cpu_seconds * gib:.3f}+{rcv * gib:.3f}")
        for p in (o.plain, *o.plain_others):
            if p.rate:
                per = (1 << 30) / p.bytes
                tp.add_row(f"{p.api} copy", p.when.replace("with the ", "").replace("before the guest started", "before it started"),
                           f"{p.seconds:.3f} s", f"{p.rate / (1 << 20):,.1f}", f"{mig / p.rate:.2f}x",
                           f"{p.sender_cpu * per:.3f}+{p.receiver_cpu * per:.3f}")
        con.print(tp)
        runs = max(p.runs for p in (o.plain, *o.plain_others))
        each = f"; each copy: the median of {runs}, by time" if runs > 1 else ""
        con.print(f"(migration: its rate over the copy's; CPU: sending thread + receiving process{each})")
    n = r.npages
    if o.pages_ok:
        con.print(f"verification: OK, {n} pages identical")
    else:
        shown = ", ".join(f"{g:#x}" for g in o.differing[:16])
        more = f" (first 16 of {len(o.differing)})" if len(o.differing) > 16 else ""
        con.print(f"verification: FAILED, {len(o.differing)} of {n} pages differ: gpa {shown}{more}")
    if o.checksum_ok:
        con.print(f"verification: OK, guest checksum {o.reference:#018x} matches the unmigrated run")
    elif o.checksum is not None:
        con.print(f"verification: FAILED, guest checksum {o.checksum:#018x} on the destination, "
                  f"{o.reference:#018x} in the unmigrated run")
    else:
        con.print(f"verification: FAILED, the guest did not finish on the destination ({o.guest_error}); "
                  f"the unmigrated run's checksum is {o.reference:#018x}")
    return exitcodes.OK if o.ok else exitcodes.FAILED


def run_guest_cli(args: argparse.Namespace, key: bytes | None, con: Console, bar: RoundProgress) -> int:
    cfg = GuestConfig(
        ram=args.ram, seed=args.seed, commands=args.commands, batch=args.batch, writer_heavy=args.writer_heavy,
        dirty=args.dirty, threshold=args.threshold, max_rounds=args.max_rounds, max_bandwidth=args.max_bandwidth,
        auto_converge=not args.no_auto_converge, device_bypass=args.device_bypass, no_vfio_log=args.no_vfio_log,
        no_kvm_log=args.no_kvm_log, device_process=args.device_process, to=args.to, key=key, timeout=args.timeout,
        precopy_commands=args.precopy_commands,
    )
    cfg.check()  # a user's mistake: raised before any work, main prints one line
    controls = [n for n, on in (("device writes bypass dma_rw", cfg.device_bypass),
                                ("the container's bitmap" + (" and the device server's report" if cfg.device_process
                                                              else "") + " ignored", cfg.no_vfio_log),
                                ("the kernel's dirty log ignored", cfg.no_kvm_log)) if on]
    con.print(f"dmarw migrate --guest: {_mib(cfg.ram)} guest RAM ({cfg.ram >> 12:,} pages), seed {cfg.seed}, "
              f"{cfg.commands:,} commands{' (writer-heavy)' if cfg.writer_heavy else ''}; dirty log {cfg.dirty}; "
              f"to {cfg.to or 'a local process'}"
              + (f"; pre-copy at most {_mib(cfg.max_bandwidth)}/s" if cfg.max_bandwidth else "")
              + ("; device in its own process (vfio-user)" if cfg.device_process else "")
              + (f"; negative control: {', '.join(controls)}" if controls else ""))
    try:
        with bar.progress:
            o = run_guest_migration(cfg, on_sent=bar.sent, on_round_start=bar.round_start, on_round_end=bar.round_end)
    except DmaError as e:
        Console(stderr=True, soft_wrap=True).print(
            f"dmarw migrate: migration failed, the source guest kept running: {e}", markup=False, highlight=False)
        return exitcodes.MIGRATION_FAILED
    con.print(f"unmigrated run of the same guest: checksum {o.reference:#018x} in {o.reference_seconds:.2f} s")
    rc = report(o, con)
    if args.json:
        out: dict[str, Any] = {
            "config": {k: v for k, v in asdict(cfg).items() if k != "key"},
            "report": asdict(o.report), "plain_copy": asdict(o.plain) if o.plain else None,
            "plain_copy_others": [asdict(p) for p in o.plain_others],
            "reference_checksum": o.reference, "checksum": o.checksum, "destination": o.stat,
            "differing_gpas": o.differing, "commands_at_stop": o.commands_at_stop,
            "held_commands": o.held_commands, "held_seconds": o.held_seconds,
            "pages_ok": o.pages_ok, "checksum_ok": o.checksum_ok, "ok": o.ok,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return rc
