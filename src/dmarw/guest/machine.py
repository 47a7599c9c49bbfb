"""One guest run: a :class:`~dmarw.vmm.KvmVm` with the guest program, the GPU-like device
on one of the lab's six paths, the result port, one protected-mode vCPU — and the checks.

:class:`GuestMachine` builds it (guest RAM a memfd at gpa == iova == 0, memslot 0 logging
dirty pages, the container tracking dirty pages on the vfio paths), :meth:`~GuestMachine.run`
runs the vCPU to ``hlt`` (or until :meth:`~GuestMachine.stop` from another thread), and
:meth:`~GuestMachine.report` harvests the three logs and checks them against the guest's
own record:

* the kernel's log (vCPU stores) == the pages the guest recorded storing to (vrec);
* the user-space log (``write_guest``) == the pages the device was told to write (drec) on
  the ``kvm`` path, empty on the vfio paths;
* the container's dirty bitmap == drec on the vfio paths, empty on ``kvm``.

Threads: ``run()`` is the vCPU thread; the device's engine runs in its own thread when
``threaded`` (the default), so its DMA overlaps the vCPU's stores.
"""

from __future__ import annotations

import errno
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import bitmap
from ..devices.gpu import GpuDevice
from ..devices.paths import PATH_NAMES, dma_rw_for, path_env
from ..errors import fail
from . import ResultPort, load
from .params import DREC_GPA, LOAD_GPA, MMIO_GPA, MMIO_SIZE, RESULT_PORT, VREC_GPA, Params

RUN_EXITS_MAX = 1_000_000  # unserved exits before a run is declared runaway
# While a run lasts, the interpreter's thread switch interval (default 5 ms) is shortened:
# the vCPU thread needs the GIL for every device callback while the engine thread holds it,
# and would otherwise wait up to the whole interval at each doorbell.
SWITCH_INTERVAL_S = 0.0002


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class RunReport:
    """A finished run: the guest's result, what it cost, and the checks."""

    path: str
    params: Params
    dirty: str
    threaded: bool
    checksum: int | None
    commands: int | None
    wall_s: float
    exits: dict[str, int]
    mmio_probe_cycles: float
    doorbell_cycles: float
    waits: int
    device: dict[str, Any]
    pages: dict[str, int]
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "dirty": self.dirty, "threaded": self.threaded,
            "params": {"seed": self.params.seed, "commands": self.params.commands,
                       "ram_size": self.params.ram_size, "batch": self.params.batch,
                       "writer_heavy": self.params.writer_heavy},
            "checksum": None if self.checksum is None else f"{self.checksum:#018x}",
            "commands": self.commands, "wall_s": self.wall_s, "exits": self.exits,
            "mmio_probe_cycles": self.mmio_probe_cycles, "doorbell_cycles": self.doorbell_cycles,
            "waits": self.waits, "device": self.device, "pages": self.pages,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "ok": self.ok,
        }


def _pages(bm: bytes) -> set[int]:
    return set(bitmap.from_bytes(bm))


def _diff(got: set[int], want: set[int]) -> str:
    if got == want:
        return f"{len(got)} pages"
    extra, missing = sorted(got - want), sorted(want - got)
    return (f"{len(got)} pages vs {len(want)}: extra {[hex(p << 12) for p in extra[:4]]}, "
            f"missing {[hex(p << 12) for p in missing[:4]]}")


class GuestMachine:
    """The guest and its device on ``path``; ``device_kw`` goes to :class:`GpuDevice`."""

    def __init__(self, path: str, params: Params, *, dirty: str = "bitmap", threaded: bool = True,
                 core: str | None = None, device_kw: dict[str, Any] | None = None,
                 load_image: bool = True, prefault: bool = True,
                 switch_interval: float | None = SWITCH_INTERVAL_S) -> None:
        if path not in PATH_NAMES:
            raise fail(errno.EINVAL, f"guest: path {path!r} is one of {', '.join(PATH_NAMES)}")
        self.path = path
        self.params = params
        self.dirty = dirty
        self.switch_interval = switch_interval
        self.env = path_env(path, params.ram_size, core=core, kvm={"dirty": dirty})
        try:
            vm: Any = self.env.vm  # the KvmVm
            self.vm = vm
            self.device = GpuDevice(dma_rw_for(self.env), threaded=threaded, **(device_kw or {}))
            self.port = ResultPort()
            vm.add_mmio(MMIO_GPA, MMIO_SIZE, self.device)
            vm.add_pio(RESULT_PORT, 4, self.port)
            if prefault:
                self.env.prefault()  # no first-touch host fault lands in a timed dma_rw
            if load_image:
                load(self.write_host, params)
            self.vcpu = vm.create_vcpu("protected")
            self.vcpu.rip = LOAD_GPA
            self.clear_logs()
        except BaseException:
            self.env.close()
            raise
        self.exits: dict[str, int] = {}
        self.wall_s = 0.0
        self._closed = False

    # -- memory, straight through the host mapping (no path, no log) ---------------------
    def write_host(self, gpa: int, data: bytes) -> None:
        self.env.space.write(self.env.hva + gpa, data)

    def read_host(self, gpa: int, n: int) -> bytes:
        return self.env.space.read(self.env.hva + gpa, n)

    def clear_logs(self) -> tuple[set[int], set[int], set[int]]:
        """Get and clear all three logs: (kernel, user space, container) pages."""
        k, u = self.vm.get_dirty_logs(0)
        kernel, user = _pages(k), _pages(u)
        cont = _pages(self.env.container.get_dirty_bitmap(0, self.params.ram_size))
        return kernel, user, cont

    # -- running ---------------------------------------------------------------------------
    def run(self, *, until: Callable[[], bool] | None = None) -> str:
        """Run the vCPU until ``hlt`` (returns ``"hlt"``) or a :meth:`stop` (``"intr"``);
        any other exit is an error naming it.  ``until`` is checked at each ``intr``."""
        self.device.start()
        old_switch = sys.getswitchinterval()
        if self.switch_interval is not None:
            sys.setswitchinterval(self.switch_interval)
        t0 = time.perf_counter()
        try:
            for _ in range(RUN_EXITS_MAX):
                ex = self.vcpu.run()
                self.exits[ex.reason] = self.exits.get(ex.reason, 0) + 1
                if ex.reason == "hlt":
                    return "hlt"
                if ex.reason == "intr":
                    if until is None or until():
                        return "intr"
                    continue
                raise fail(errno.EIO, f"guest on {self.path}: unexpected exit {ex}")
            raise fail(errno.EIO, f"guest on {self.path}: {RUN_EXITS_MAX} exits without hlt")
        finally:
            self.wall_s += time.perf_counter() - t0
            sys.setswitchinterval(old_switch)

    def stop(self) -> None:
        """From another thread: pause the device at a command boundary, release a held
        WAIT and kick the vCPU; ``run()`` returns ``"intr"``."""
        self.device.pause()
        self.vcpu.kick()

    def stop_after(self, commands: int) -> None:
        """Stop the run by itself after ``commands`` device commands: the device pauses at
        that boundary and kicks the vCPU; ``run()`` returns ``"intr"``."""
        self.device.stop_at(commands, self.vcpu.kick)

    def resume(self) -> None:
        self.device.resume()

    # -- save / restore --------------------------------------------------------------------
    def save(self) -> dict[str, bytes]:
        """After :meth:`stop`: vCPU, device, result port and guest RAM."""
        return {"vcpu": self.vcpu.save(), "device": self.device.save(), "port": self.port.save(),
                "ram": self.read_host(0, self.params.ram_size)}

    def restore(self, state: dict[str, bytes]) -> None:
        """Into a fresh machine (built with ``load_image=False``), paused device."""
        self.device.pause()
        self.write_host(0, state["ram"])
        self.vcpu.restore(state["vcpu"])
        self.device.restore(state["device"])
        self.port.restore(state["port"])
        self.clear_logs()

    # -- the report --------------------------------------------------------------------------
    def report(self) -> RunReport:
        """Harvest the logs and check them against the guest's record (call after ``hlt``)."""
        self.device.stop()
        p = self.params
        r = self.port.result
        kernel, user, cont = self.clear_logs()
        vrec = _pages(self.read_host(VREC_GPA, p.record_bytes))
        drec = _pages(self.read_host(DREC_GPA, p.record_bytes))
        checks = []
        try:
            r.check()
            checks.append(Check("guest finished", r.commands == p.commands,
                                f"{r.commands} commands, checksum {r.checksum:#018x}"))
        except Exception as e:  # GuestFault: reported as a failed check, not raised
            checks.append(Check("guest finished", False, str(e)))
        dev_ok = not self.device.regs.status & 2
        checks.append(Check("device without error", dev_ok, self.device.last_error or "status ok"))
        checks.append(Check("kernel log == guest's vCPU record", kernel == vrec, _diff(kernel, vrec)))
        want_user = drec if self.path == "kvm" else set()
        checks.append(Check("user-space log == device writes (kvm path)", user == want_user,
                            _diff(user, want_user)))
        want_cont = set() if self.path == "kvm" else drec
        checks.append(Check("container bitmap == device writes (dma_rw)", cont == want_cont,
                            _diff(cont, want_cont)))
        stats = dict(self.vcpu.stats)
        exits = dict(self.exits)
        exits["mmio"] = exits.get("mmio", 0) + stats.get("mmio", 0)
        exits["io"] = exits.get("io", 0) + stats.get("pio", 0)
        if stats.get("ring_full"):
            exits["dirty-ring-full"] = stats["ring_full"]
        return RunReport(
            path=self.path, params=p, dirty=self.dirty, threaded=self.device.threaded,
            checksum=r.checksum, commands=r.commands, wall_s=self.wall_s, exits=exits,
            mmio_probe_cycles=r.probe_cycles / r.probes if r.probes else float("nan"),
            doorbell_cycles=r.doorbell_cycles / r.doorbells if r.doorbells else float("nan"),
            waits=r.waits, device=self.device.stats.as_dict(),
            pages={"kernel": len(kernel), "user": len(user), "container": len(cont),
                   "vrec": len(vrec), "drec": len(drec)},
            checks=checks,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.device.stop()
        self.env.close()

    def __enter__(self) -> GuestMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_guest(path: str, params: Params, **kw: Any) -> RunReport:
    """Build, run to ``hlt``, report, close."""
    with GuestMachine(path, params, **kw) as m:
        m.run()
        return m.report()
