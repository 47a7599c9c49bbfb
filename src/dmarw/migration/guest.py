"""A running guest as the two ends of a migration: the guest program on a ``KvmVm`` with the
GPU-like device (:class:`dmarw.guest.machine.GuestMachine`).

Source (:class:`SourceMachine`): the vCPU runs on its own thread and the device serves its
ring on the engine thread, both during pre-copy.  :meth:`SourceMachine.pause` is the stop
of stop-and-copy: the device pauses at a command boundary (a held WAIT store is released),
the vCPU is kicked out of ``KVM_RUN`` and its thread parks.  :meth:`SourceMachine.state`
then gives the vCPU (``vcpu.save()``), the device (registers, ring position, the engine's
running CRC; commands still pending are the ring span head..tail, in guest RAM), the result
port, and whether the guest had already halted.  :meth:`SourceMachine.resume` restarts both
after a failed attempt: the guest keeps running.

Auto-converge (:meth:`SourceMachine.set_throttle`): a ticker thread kicks the vCPU every
:data:`SLICE_S`; at each kick the vCPU thread stays out of the guest for
``share / (1 - share)`` of a slice, so ``share`` of its time is taken away, as QEMU's CPU
throttle does.

Destination (:class:`DestMachine`): a ``KvmVm`` with the same layout whose RAM the stream
fills; :meth:`DestMachine.restore` loads the states, :meth:`DestMachine.run` resumes the
device and the vCPU and runs the guest to its end; the result is its checksum.

Locks: the machine's own (device condition, VM lock); here only plain flags written by the
controlling thread and read by the vCPU thread between runs.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import DmaError
from ..guest import Params
from ..guest.machine import GuestMachine
from ..vmm import DEFAULT_DIRTY

SLICE_S = 0.01  # the throttle's time slice (QEMU's CPU_THROTTLE_TIMESLICE_NS is 10 ms)
PATH = "vfio-external-user"  # the device's way to guest RAM: the container, so its log sees it


@dataclass(frozen=True)
class GuestSpec:
    """Which guest runs, identically on the source, the destination and the unmigrated run."""

    ram: int
    seed: int
    commands: int
    batch: int = 16
    writer_heavy: bool = False
    dirty: str = DEFAULT_DIRTY
    path: str = PATH
    device_process: bool = False  # the device in a ``dmarw serve`` process (:mod:`.remote`)

    def params(self) -> Params:
        return Params(seed=self.seed, commands=self.commands, ram_size=self.ram, batch=self.batch,
                      writer_heavy=self.writer_heavy)

    def as_json(self) -> dict[str, Any]:
        return {"kind": "gpu", **asdict(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GuestSpec:
        try:
            return cls(ram=int(d["ram"]), seed=int(d["seed"]), commands=int(d["commands"]),
                       batch=int(d["batch"]), writer_heavy=bool(d["writer_heavy"]),
                       dirty=str(d["dirty"]), path=str(d["path"]),
                       device_process=bool(d.get("device_process", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise DmaError(errno.EBADMSG, f"guest spec {d!r}: {e}") from None


def reference_checksum(spec: GuestSpec) -> int:
    """The checksum of an unmigrated run of the same guest and seed (nothing is harvested
    in it, so the dirty mode is the plainest)."""
    with GuestMachine(spec.path, spec.params(), dirty="bitmap") as m:
        m.run()
        return m.port.result.check()


class SourceMachine:
    """The guest running on the source; see the module docstring."""

    def __init__(self, spec: GuestSpec, *, device_bypass: bool = False) -> None:
        self.spec = spec
        writer: list[Callable[[int, bytes], None]] = []
        kw = {"bypass": lambda addr, data: writer[0](addr, data)} if device_bypass else None
        self.m = GuestMachine(spec.path, spec.params(), dirty=spec.dirty, device_kw=kw)
        writer.append(self.m.write_host)  # a device that writes the raw host mapping
        self.vm: Any = self.m.vm
        self.container = self.m.env.container
        self._stop = False
        self._share = 0.0
        self._thread: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        self._done = threading.Event()
        self._wake = threading.Event()  # set to end a throttle wait at once (pause, close)
        self.outcome: str | None = None  # "hlt" once the guest ended on this side
        self.error: BaseException | None = None
        self.throttled_s = 0.0
        self.commands_at_stop = 0
        self.remote: Any = None  # the RemoteGpu once attached

    def attach_device(self) -> None:
        """With ``spec.device_process``: the device moves to its own server process (call
        after any fork: the client has a thread)."""
        if self.spec.device_process and self.remote is None:
            from .remote import attach

            self.remote = attach(self.m)

    def device_log(self) -> set[int]:
        """The pages the device in its own process wrote since the last call."""
        return set() if self.remote is None else self.remote.dirty_pages()

    # -- the vCPU thread -------------------------------------------------------------------
    def start(self) -> None:
        """Start (or, after :meth:`pause`, restart) the vCPU thread; the device's engine
        thread starts with the first run."""
        self._stop = False
        self._wake.clear()
        if self.outcome == "hlt":  # it ended here already: nothing to restart
            return
        self._thread = threading.Thread(target=self._vcpu, name="dmarw-vcpu0", daemon=True)
        self._thread.start()
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="dmarw-throttle", daemon=True)
            self._ticker.start()

    def _vcpu(self) -> None:
        try:
            self.outcome = self.m.run(until=self._until)
        except BaseException as e:  # reported by check()
            self.error = e

    def _until(self) -> bool:
        """At each kick: stop when asked; otherwise sit out the throttle's share."""
        if self._stop:
            return True
        share = self._share
        if share > 0:
            t0 = time.monotonic()
            # the throttle itself: this vCPU is kept out of the guest; pause() cuts it short
            self._wake.wait(SLICE_S * share / (1.0 - share))
            self.throttled_s += time.monotonic() - t0
        return self._stop

    def _tick(self) -> None:
        while not self._done.wait(SLICE_S):
            if self._share > 0 and not self._stop and self.running:
                try:
                    self.m.vcpu.kick()
                except OSError:
                    return

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def commands(self) -> int:
        """The guest's commands the device has served so far."""
        return int(self.m.device.regs.commands)

    def wait_under_way(self, commands: int, timeout: float = 30.0) -> None:
        """Return once the device has served ``commands`` of the guest's commands (what is
        migrated is a guest at work), or the guest stopped, or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while self.running and self.commands < commands and time.monotonic() < deadline:
            assert self._thread is not None
            self._thread.join(0.005)

    def set_throttle(self, share: float) -> None:
        self._share = min(max(share, 0.0), 0.99)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    # -- stop-and-copy ----------------------------------------------------------------------
    def pause(self) -> None:
        """Device paused at a command boundary, vCPU out of the guest, its thread ended."""
        self._stop = True
        self._wake.set()  # a vCPU sitting out its throttle share stops now, not at the slice's end
        m = self.m
        m.device.release_waiters()  # a vCPU held in a WAIT store returns to the guest ...
        m.vcpu.kick()  # ... and leaves it at once, while the device finishes its command
        m.device.pause()
        t = self._thread
        if t is not None:
            t.join(30.0)
            if t.is_alive():
                raise DmaError(errno.ETIMEDOUT, "vcpu0 did not stop within 30 s of its kick")
        self.commands_at_stop = self.commands
        self.check()

    def resume(self) -> None:
        """After a failed migration: the device and the vCPU carry on."""
        self.m.resume()
        self.start()

    def state(self) -> list[tuple[str, bytes]]:
        halted = self.outcome == "hlt"
        meta = {"halted": halted, "commands_at_stop": self.commands_at_stop}
        return [
            ("vcpu0", self.m.vcpu.save()),
            ("gpu", self.m.device.save()),
            ("result-port", self.m.port.save()),
            ("machine", json.dumps(meta).encode()),
        ]

    def finish(self, timeout: float = 600.0) -> int:
        """Let the guest run to its end here (after a cancelled migration); its checksum."""
        t = self._thread
        if t is not None:
            t.join(timeout)
        self.check()
        return self.m.port.result.check()

    def close(self) -> None:
        self._done.set()
        self._stop = True
        self._wake.set()
        if self.running:
            try:
                self.m.stop()
            except OSError:
                pass
            assert self._thread is not None
            self._thread.join(30.0)
        if self._ticker is not None:
            self._ticker.join(1.0)
        self.m.close()


class DestMachine:
    """The destination's VM: built before the stream, restored and run after it."""

    def __init__(self, spec: GuestSpec) -> None:
        self.spec = spec
        # the dirty mode is the source's choice for its harvests; nothing here is harvested
        self.m = GuestMachine(spec.path, spec.params(), dirty="bitmap", load_image=False)
        if spec.device_process:
            from .remote import attach

            try:
                attach(self.m)  # restore() loads its state with RESUMING + MIG_DATA_WRITE
            except BaseException:
                self.m.close()
                raise
        self.ram = (self.m.env.space, [self.m.env.hva])
        self.halted = False
        self.m.device.pause()
        self.m.device.start()  # the engine thread exists before the stream, paused: resume only wakes it

    def restore(self, states: dict[str, bytes]) -> dict[str, Any]:
        missing = [n for n in ("vcpu0", "gpu", "result-port", "machine") if n not in states]
        if missing:
            raise DmaError(errno.EPROTO, f"the stream carried no state for {', '.join(missing)}")
        t0 = time.perf_counter()
        m = self.m
        m.vcpu.restore(states["vcpu0"])
        m.device.restore(states["gpu"])
        m.port.restore(states["result-port"])
        meta = json.loads(states["machine"])
        self.halted = bool(meta.get("halted"))
        return {"restore_seconds": time.perf_counter() - t0, "commands_at_stop": meta.get("commands_at_stop")}

    def run(self, timeout: float = 300.0) -> dict[str, Any]:
        """Resume and run to the guest's end (at most ``timeout`` s); its result, or the
        error that ended it (a guest whose memory lost pages may crash or hang)."""
        m = self.m
        t0 = time.perf_counter()
        m.device.resume()
        resume_s = time.perf_counter() - t0
        out: dict[str, Any] = {"resume_seconds": resume_s}
        expired = threading.Event()
        done = threading.Event()

        def watchdog() -> None:
            if not done.wait(timeout):
                expired.set()
                m.stop()

        dog = threading.Thread(target=watchdog, name="dmarw-guest-watchdog", daemon=True)
        dog.start()
        try:
            if not self.halted:
                m.run(until=expired.is_set)
            if expired.is_set():
                raise DmaError(errno.ETIMEDOUT, f"the guest did not finish within {timeout:g} s")
            out["checksum"] = m.port.result.check()
            out["commands"] = m.port.result.commands
        except Exception as e:  # a damaged guest: reported, not raised
            out["error"] = f"{type(e).__name__}: {e}"
        finally:
            done.set()
            dog.join()
        out["guest_seconds"] = time.perf_counter() - t0
        out["device_commands"] = m.device.regs.commands
        return out

    def close(self) -> None:
        self.m.close()
