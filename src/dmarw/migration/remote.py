"""The GPU-like device in its own process for a migrating guest: ``dmarw serve --device gpu
--once`` on a temporary socket, attached to the guest's ``KvmVm`` with
:class:`~dmarw.vfio_user.remote.RemoteDevice` in place of the in-process device.

:func:`attach` swaps the device of a built :class:`~dmarw.guest.machine.GuestMachine`: the
in-process device's window is removed (its engine never started) and ``m.device`` becomes a
:class:`RemoteGpu`, which offers what the migration's machines ask of a device.  The
server's engine runs inline in each doorbell's REGION_WRITE, so once the vCPU is out of
``KVM_RUN`` the device is quiet: pausing is the kick, and the state is STOP_COPY data read
with MIG_DATA (:meth:`RemoteGpu.save`); the destination loads it with RESUMING +
MIG_DATA_WRITE (:meth:`RemoteGpu.restore`).  The pages the device wrote come from the
server's DMA logging report (:meth:`RemoteGpu.dirty_pages`), not from this process's logs.

The server is a child process (its own session: a Ctrl-C reaches this process, which ends
it); :meth:`RemoteGpu.stop` detaches, waits for it to exit and makes sure its socket is
gone, on every path.  Attach only after any ``fork`` of this process: the client has a
thread and a socket a forked child must not share.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..devices.gpu import REG_COMMANDS, REG_STATUS
from ..errors import fail
from ..guest.params import MMIO_GPA, MMIO_SIZE
from ..vfio_user import protocol as P
from ..vfio_user.remote import RemoteDevice

START_S = 30.0  # the server's socket appears within this
EXIT_S = 10.0  # the server exits within this once its client is gone
SERVE = "import sys; from dmarw.cli import main; sys.exit(main())"


class ServerProcess:
    """``dmarw serve --device gpu --once`` on a fresh socket in the temporary directory."""

    def __init__(self, timeout: float = START_S) -> None:
        # the server binds under a temporary name and renames it, and removes it when it
        # exits, even when its client was killed: no directory of ours to leave behind
        self.socket = os.path.join(tempfile.gettempdir(), f"dmarw-gpu-{os.getpid()}-{secrets.token_hex(6)}.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVE, "serve", "--once", "--device", "gpu", self.socket],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                start_new_session=True)
            deadline = time.monotonic() + timeout
            while not os.path.exists(self.socket):
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
                    raise fail(errno.ECHILD, f"dmarw serve exited with {self.proc.returncode}: {err}")
                if time.monotonic() > deadline:
                    raise fail(errno.ETIMEDOUT, f"dmarw serve: no socket {self.socket} within {timeout:g} s")
                time.sleep(0.01)  # polling for the socket file, not imitating a cost
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def close(self, timeout: float = EXIT_S) -> int | None:
        """Wait for the server to exit (kill it after ``timeout``), remove the socket; its
        exit status (negative: killed by that signal).  Ctrl-C and SIGTERM wait until it
        is done (a second signal would otherwise cut the cleanup short)."""
        p = self.proc
        self.proc = None
        with signals_deferred():
            return self._end(p, timeout)

    def _end(self, p: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
        rc = None
        if p is not None:
            try:
                rc = p.wait(timeout)
            except subprocess.TimeoutExpired:  # SIGTERM: it removes its socket; then SIGKILL
                p.terminate()
                try:
                    rc = p.wait(2.0)
                except subprocess.TimeoutExpired:
                    p.kill()
                    rc = p.wait()
            finally:
                if p.stderr is not None:
                    p.stderr.close()
        try:
            os.unlink(self.socket)  # only when the server could not remove it (SIGKILL)
        except FileNotFoundError:
            pass
        return rc


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM blocked in the calling thread while the body runs (Python runs
    handlers in the main thread only, so elsewhere this changes nothing); a signal that
    came meanwhile is handled on leaving."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _Regs:
    def __init__(self, dev: RemoteDevice) -> None:
        self._dev = dev

    @property
    def commands(self) -> int:
        return self._dev.mmio_read(REG_COMMANDS, 4)

    @property
    def status(self) -> int:
        return self._dev.mmio_read(REG_STATUS, 4)


class RemoteGpu:
    """The device of a :class:`~dmarw.guest.machine.GuestMachine` when it runs in a
    ``dmarw serve`` process; see the module docstring."""

    threaded = False

    def __init__(self, vm: Any, *, timeout: float = START_S) -> None:
        self.server = ServerProcess(timeout)
        try:
            self.remote = RemoteDevice(vm, self.server.socket, gpa=MMIO_GPA, timeout=timeout)
        except BaseException:
            self.server.close(0.0)
            raise
        self.regs = _Regs(self.remote)
        self.last_error: str | None = None
        self._stopped = False  # the server's device in STOP (after save)
        self._closed = False
        self.server_rc: int | None = None

    # what the migration machines call on their device
    def start(self) -> None:
        """The engine is the server's, inline: nothing to start."""

    def pause(self) -> None:
        """Nothing runs on the server once the vCPU is out of the guest."""

    def release_waiters(self) -> None:
        """A WAIT store never holds the server (its engine is inline)."""

    def resume(self) -> None:
        if self._stopped:  # a failed attempt after save: the device runs again
            self.remote.client.set_mig_state(P.MigState.RUNNING)
            self._stopped = False

    def dirty_pages(self) -> set[int]:
        """Guest pages the server's device wrote since the last call (DMA logging REPORT)."""
        return self.remote.dirty_pages()

    def save(self) -> bytes:
        """STOP_COPY data read with MIG_DATA; the server's device is left in STOP."""
        state = self.remote.save()
        self._stopped = True
        return state

    def restore(self, state: bytes) -> None:
        """RESUMING + MIG_DATA_WRITE, then RUNNING."""
        self.remote.restore(state, run=True)

    def stop(self) -> None:
        """Detach, then the server exits (``--once``) and its socket is removed."""
        if self._closed:
            return
        self._closed = True
        detached = False
        with signals_deferred():  # a Ctrl-C, or the SIGTERM that follows it, waits for this
            try:
                if self.remote.client.connected:
                    self.remote.close()
                    detached = True
            except OSError:
                pass
            finally:
                self.server_rc = self.server.close(EXIT_S if detached else 0.5)


def attach(m: Any) -> RemoteGpu:
    """Replace the in-process device of the built machine ``m`` by the device in a
    ``dmarw serve`` process; returns it (also ``m.device``)."""
    m.vm.remove_mmio(MMIO_GPA)
    try:
        dev = RemoteGpu(m.vm)
    except BaseException:
        m.vm.add_mmio(MMIO_GPA, MMIO_SIZE, m.device)  # the in-process window back
        raise
    m.device = dev
    return dev
