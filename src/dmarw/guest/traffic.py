"""The lab's accesses from the real guest: an access source (:mod:`dmarw.lab.source`) whose
records are what the GPU-like device did while serving the guest's command ring on KVM.

Capture: guest *i* of a run (seed ``s + i``) runs in its own process, each its own
:class:`~dmarw.vmm.KvmVm` with the device on ``path``, the VMs at once, all sharing the one
host-wide ``vfio.group_lock`` (made before the fork, as the lab's VMs share it).  The device
records every ``dma_rw`` it makes — ring fetches, the commands' reads and writes, fences —
in order; the run must pass every check of :meth:`GuestMachine.report` or the capture fails.
The records become a :class:`~dmarw.lab.workload.Workload` that the lab splits into rounds
and replays, timed, through each path under test, like a trace.  The access sequence of a
guest depends only on its parameters (the checksum is the same on every path), so one
capture per seed serves every path and VM count.
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import signal
import threading
import traceback
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ..errors import fail
from ..lab.workload import Records, Workload
from ..vfio import new_group_lock, set_group_lock
from .params import Params

_ctx = mp.get_context("fork")
DEFAULT_PATH = "vfio-external-user"
GUEST_ASSUMPTION = (
    "records from dmarw's guest program on KVM: its command ring served by the GPU-like device "
    "(glmark2 mix per command: 63% reads, 48% of reads one page; GTT entries, ring dwords, batch "
    "and descriptor chunks, context state), plus one ring fetch read per doorbell and one 4 B "
    "fence write per batch; addresses in the guest's areas (page tables 25%, rings 5%, contexts "
    "15%, batches 55% of RAM above 256 KiB), alternate batches in alternate halves"
)


@dataclass
class Capture:
    """One guest's recorded accesses and what its run reported."""

    seed: int
    workload: Workload
    checksum: int
    wall_s: float
    per_command_ns: float
    pid: int


def _capture_main(path: str, params: Params, core: str | None, group_lock: Any, barrier: Any,
                  progress: Any, index: int, conn: Connection) -> None:
    from .machine import GuestMachine

    # Ctrl-C is the parent's (it ends the guests); SIGTERM, how the parent ends one, kills at once
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        set_group_lock(group_lock)
        with GuestMachine(path, params, core=core, device_kw={"record": True}) as m:
            done = threading.Event()

            def tick() -> None:  # the vCPU thread sits in KVM_RUN; report the device's count
                while not done.wait(0.2):
                    progress[index] = m.device.regs.commands

            ticker = threading.Thread(target=tick, daemon=True)
            barrier.wait(300)
            ticker.start()
            try:
                m.run()
            finally:
                done.set()
                ticker.join()
            progress[index] = params.commands
            r = m.report()
            if not r.ok:
                bad = "; ".join(f"{c.name}: {c.detail}" for c in r.checks if not c.ok)
                raise RuntimeError(f"guest seed {params.seed} on {path}: checks failed: {bad}")
            acc = m.device.accesses
            writes = array("B", (w for w, _, _ in acc))
            addrs = array("Q", (a for _, a, _ in acc))
            sizes = array("I", (s for _, _, s in acc))
            conn.send(("ok", (writes.tobytes(), addrs.tobytes(), sizes.tobytes(), r.checksum, r.wall_s,
                              r.device["per_command_ns"])))
    except BaseException:
        barrier.abort()
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def capture(seeds: list[int], *, commands: int, ram_size: int, path: str = DEFAULT_PATH,
            core: str | None = None, batch: int = 16,
            on_progress: Callable[[int, int], None] | None = None) -> list[Capture]:
    """Run one guest per seed, each in its own process and KvmVm, all at once;
    ``on_progress(done, total)`` with the commands done over all guests."""
    group_lock = new_group_lock(core)
    barrier = _ctx.Barrier(len(seeds))
    progress = _ctx.Array("q", len(seeds), lock=False)
    procs, conns = [], []
    for i, s in enumerate(seeds):
        params = Params(seed=s, commands=commands, ram_size=ram_size, batch=batch)
        rx, tx = _ctx.Pipe(duplex=False)
        p = _ctx.Process(target=_capture_main,
                         args=(path, params, core, group_lock, barrier, progress, i, tx),
                         name=f"dmarw-guest-{s}", daemon=True)
        p.start()
        tx.close()
        procs.append(p)
        conns.append(rx)
    out: list[Capture] = []
    errors = []
    total = commands * len(seeds)
    done = False
    try:
        for s, p, rx in zip(seeds, procs, conns, strict=True):
            while not rx.poll(0.2):  # an I/O wait on the pipe, reporting progress meanwhile
                if on_progress is not None:
                    on_progress(sum(progress[:]), total)
                if not p.is_alive() and not rx.poll(0):
                    break
            try:
                kind, msg = rx.recv()
            except EOFError:
                kind, msg = "error", f"guest process for seed {s} exited (code {p.exitcode}) without a result"
            if kind == "error":
                errors.append(msg)
                continue
            w, a, z, checksum, wall, per_cmd = msg
            writes, addrs, sizes = array("B"), array("Q"), array("I")
            writes.frombytes(w)
            addrs.frombytes(a)
            sizes.frombytes(z)
            wl = Workload("guest", s, ram_size, Records(writes, addrs, sizes), GUEST_ASSUMPTION,
                          {"source": f"real guest seed {s}: {commands:,} commands on {path}, "
                                     f"checksum {checksum:016x}"})
            out.append(Capture(s, wl, checksum, wall, per_cmd, p.pid or 0))
        done = True
    finally:  # on Ctrl-C, SIGTERM or an error here the guests are ended: none outlives the run
        for p in procs:
            if not done and p.is_alive():
                p.terminate()
            p.join()
    if errors:
        raise RuntimeError("guest capture failed:\n" + "\n".join(errors))
    return out


def guest_source(commands: int, *, vms: int, ram_size: int = 64 << 20, path: str = DEFAULT_PATH,
                 core: str | None = None, ops: int | None = None, progress: bool = True,
                 on_capture: Callable[[list[Capture]], None] | None = None) -> Callable[[int, int], Workload]:
    """An access source: VM ``vm`` of a run with seed ``s`` replays guest ``s + vm``'s records.
    Guests are captured on first use, ``vms`` at a time (the run's largest VM count), so the
    VMs of a capture run concurrently as the lab's VMs do; ``ops`` keeps each VM's first
    ``ops`` records; ``progress`` shows a bar on stderr while guests run."""
    Params(seed=0, commands=commands, ram_size=ram_size)  # refuse bad sizes now (EINVAL)
    if vms < 1:
        raise fail(errno.EINVAL, f"guest source: {vms} VMs")
    cache: dict[int, Workload] = {}

    def source(vm: int, seed: int) -> Workload:
        g = seed + vm
        if g not in cache:
            todo = [s for s in range(g, g + vms) if s not in cache]
            caps = _capture_with_bar(todo, commands, ram_size, path, core, progress)
            for c in caps:
                if ops is not None:
                    c.workload.records = c.workload.records[:ops]
                cache[c.seed] = c.workload
            if on_capture is not None:
                on_capture(caps)
        return cache[g]

    return source


def _capture_with_bar(seeds: list[int], commands: int, ram_size: int, path: str, core: str | None,
                      show: bool) -> list[Capture]:
    if not show:
        return capture(seeds, commands=commands, ram_size=ram_size, path=path, core=core)
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=(err := Console(stderr=True)), transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(f"real guests {', '.join(map(str, seeds))} on KVM ({path})",
                            total=commands * len(seeds))

        def cb(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return capture(seeds, commands=commands, ram_size=ram_size, path=path, core=core, on_progress=cb)


QUICK_COMMANDS = 25_000
DEFAULT_COMMANDS = 100_000
MAX_TOTAL_COMMANDS = 16_000_000  # ~300 bytes each while recorded and sent: ~5 GB at most


def lab_commands(args: Any) -> int:
    """The commands each guest of ``dmarw reproduce --guest`` issues."""
    return int(args.guest_commands or (QUICK_COMMANDS if args.quick else DEFAULT_COMMANDS))


def lab_source(args: Any) -> Callable[[int, int], Workload]:
    """``dmarw reproduce --guest``: the access source from the parsed arguments (``--trace``
    with ``--guest`` is refused; ``--guest-commands``, ``--ops``, ``--vms``, ``--core``)."""
    if getattr(args, "trace", None):
        raise SystemExit("--guest and --trace are two access sources: choose one")
    commands = lab_commands(args)
    if commands * max(args.vms) > MAX_TOTAL_COMMANDS:  # all guests' records are held at once
        raise SystemExit(f"--guest-commands {commands:,} on {max(args.vms)} VMs is {commands * max(args.vms):,} "
                         f"commands; at most {MAX_TOTAL_COMMANDS:,} over all guests (each is recorded in memory)")
    from rich.console import Console

    from ..lab.workload import DEFAULT_RAM

    err = Console(stderr=True)

    def said(caps: list[Capture]) -> None:
        for c in caps:
            err.print(f"real guest {c.seed} (pid {c.pid}): {commands:,} commands, checksum "
                      f"{c.checksum:016x}, {c.wall_s:.1f} s, device {c.per_command_ns / 1e3:.1f} us a "
                      f"command, {c.workload.ops:,} records")

    return guest_source(commands, vms=max(args.vms), ram_size=DEFAULT_RAM, core=args.core, ops=args.ops,
                        on_capture=said)
