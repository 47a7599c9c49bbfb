"""``dmarw migrate`` / ``dmarw incoming`` bad numbers as a careless user types them: each is
one line on stderr, no traceback, a non-zero exit, refused before any RAM is set up."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from terminal import sigint_default

FAST = 15.0  # seconds: an interpreter start and the checks, never a migration


def dmarw(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "dmarw", *args], capture_output=True, text=True, timeout=60)
    return p, time.monotonic() - t0


@pytest.fixture
def key(tmp_path: Path) -> str:
    k = tmp_path / "key"
    k.write_bytes(b"k" * 32)
    return str(k)


@pytest.mark.parametrize("value", ["nan", "inf", "1e300", "-1", "0"])
@pytest.mark.parametrize("command", ["migrate", "incoming"])
def test_timeout_must_be_finite_and_positive(command: str, value: str, key: str) -> None:
    where = ["--to", "127.0.0.1:1"] if command == "migrate" else ["--listen", "127.0.0.1:0"]
    p, took = dmarw(command, *where, "--key-file", key, "--timeout", value)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("dmarw: error: argument --timeout:") and "seconds" in lines[0]
    assert "listening" not in p.stderr and took < FAST


@pytest.mark.parametrize("flag", ["--vcpu-rate", "--dma-rate"])
@pytest.mark.parametrize("value", ["nan", "1e300", "-1"])
def test_write_rates_are_bounded(flag: str, value: str) -> None:
    p, took = dmarw("migrate", "--replay", "--ram", "16M", flag, value)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"dmarw: error: argument {flag}:"), p.stderr
    assert p.stdout == "" and took < FAST


@pytest.mark.parametrize("mode", ["--replay", "--guest"])
@pytest.mark.parametrize("value", ["0", "512K", "fast"])
def test_a_bandwidth_cap_under_1_mib_s_or_not_a_size_is_one_line(mode: str, value: str) -> None:
    p, took = dmarw("migrate", mode, "--ram", "16M", "--max-bandwidth", value)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("dmarw: error: argument --max-bandwidth:"), p.stderr
    assert p.stdout == "" and took < FAST


@pytest.mark.parametrize("value", ["-1", "20000", "99999"])
def test_precopy_commands_outside_the_guests_run_is_one_line(value: str) -> None:
    p, took = dmarw("migrate", "--guest", "--ram", "16M", "--precopy-commands", value)
    lines = p.stderr.strip().splitlines()
    if "needs KVM" in p.stderr:
        pytest.skip(f"--guest refused first: {p.stderr.strip()}")
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"--precopy-commands {value} must be in [0, --commands 20000)" in lines[0]
    assert p.stdout == "" and took < FAST


def test_precopy_commands_is_refused_with_replay() -> None:
    p, took = dmarw("migrate", "--replay", "--ram", "16M", "--precopy-commands", "8")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and "--precopy-commands: only with a running guest" in lines[0], p.stderr
    assert p.stdout == "" and took < FAST


@pytest.mark.parametrize("control", ["device_bypass", "no_vfio_log", "no_kvm_log", None])
@pytest.mark.parametrize("asked", [None, 0, 5])
def test_pre_copy_holds_for_device_work_under_a_control_unless_told(control: str | None, asked: int | None) -> None:
    from dmarw.migration.running import CONTROL_HOLD_BATCHES, GuestConfig

    cfg = GuestConfig(batch=8, precopy_commands=asked, **({control: True} if control else {}))
    want = asked if asked is not None else (CONTROL_HOLD_BATCHES * 8 if control else 0)
    assert cfg.controls == (control is not None) and cfg.hold() == want


@pytest.mark.parametrize("mode", ["--replay", "--guest"])
def test_huge_ops_is_refused_before_generating(mode: str) -> None:
    # it was a MemoryError traceback after seconds of generating records
    p, took = dmarw("migrate", mode, "--ops", str(10**12))
    lines = p.stderr.strip().splitlines()
    if mode == "--guest" and "needs KVM" in p.stderr:
        pytest.skip(f"--guest refused first: {p.stderr.strip()}")
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "--ops 1,000,000,000,000 is more than 40,000,000" in lines[0]
    assert p.stdout == "" and took < FAST


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated")], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_the_process_group_is_one_line(sig: int, code: int, word: str) -> None:
    # as a terminal sends it: to dmarw and its forked plain-copy receiver / destination alike.
    # A child printed its own "terminated" or a BrokenPipeError traceback.
    proc = subprocess.Popen([sys.executable, "-m", "dmarw", "migrate", "--replay", "--ram", "256M", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=sigint_default)
    deadline = time.monotonic() + 60
    while not _children(proc.pid) and time.monotonic() < deadline and proc.poll() is None:
        try:  # a wait on the process itself, not a sleep
            proc.wait(timeout=0.02)
        except subprocess.TimeoutExpired:
            pass
    assert _children(proc.pid), "no child process started"
    os.killpg(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code and err.strip() == f"dmarw: {word}", (proc.returncode, err)


def test_plain_copy_receiver_whose_sender_left_exits_quietly(capfd: pytest.CaptureFixture[str]) -> None:
    from dmarw.migration import baseline

    ours, theirs = socket.socketpair()
    ours.close()  # the sender is gone before the receiver says it is ready
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=baseline._receiver, args=(theirs, 1 << 20))
    p.start()
    theirs.close()
    p.join(30)
    assert p.exitcode == 1
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("mode", ["--replay", "--guest"])
def test_rounds_table_fits_80_columns(mode: str) -> None:
    from dmarw.migration.guest_cli import kvm_unusable

    if mode == "--guest" and kvm_unusable():
        pytest.skip(f"--guest needs KVM: {kvm_unusable()}")
    size = ["--commands", "500"] if mode == "--guest" else ["--ops", "2000"]
    p = subprocess.run([sys.executable, "-m", "dmarw", "migrate", mode, "--ram", "16M", *size,
                        "--no-progress"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("pre-copy rounds"))
    end = next(i for i, line in enumerate(lines) if line.startswith("total:"))
    table = lines[start:end]
    assert any(line.lstrip().startswith("final") for line in table), table
    rows = [line for line in table[2:] if line.strip()]
    assert all(line.split()[0] in {"final", *map(str, range(64))} for line in rows), table  # one line per row
    assert all(len(line) <= 80 and "…" not in line for line in table), table


def test_an_unreachable_destination_is_one_line(key: str) -> None:
    p, _ = dmarw("migrate", "--replay", "--ram", "16M", "--to", "127.0.0.1:1", "--key-file", key)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 3 and p.stderr.count("\n") == 1 and "unreachable" in lines[0], p.stderr


@pytest.mark.parametrize(("argv", "needle"), [
    (["--replay", "--commands", "5", "--dirty", "ring"], "--commands, --dirty: only with a running guest"),
    (["--replay", "--writer-heavy"], "--writer-heavy: only with a running guest"),
    (["--guest", "--core", "python", "--pinned", "3"], "--pinned, --core: only with --replay"),
    (["--guest", "--vcpu-rate", "1"], "--vcpu-rate: only with --replay"),
])
def test_a_flag_of_the_other_mode_is_refused_not_ignored(argv: list[str], needle: str) -> None:
    # each was silently ignored: --core python on a running guest ran the default core
    from dmarw.migration.guest_cli import kvm_unusable

    if "--guest" in argv and kvm_unusable():
        pytest.skip(f"--guest needs KVM: {kvm_unusable()}")
    p, took = dmarw("migrate", "--ram", "16M", *argv)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and needle in lines[0], p.stderr
    assert p.stdout == "" and took < FAST


@pytest.mark.parametrize("argv", [["incoming", "--listen", "nosuch.invalid:5000"],
                                  ["migrate", "--guest", "--to", "nosuch.invalid:5000"],
                                  ["migrate", "--replay", "--to", "nosuch.invalid:5000"]],
                         ids=["incoming", "migrate-guest", "migrate-replay"])
def test_a_host_that_does_not_resolve_is_one_line_naming_it(argv: list[str], key: str) -> None:
    # it was "[Errno -2] Unknown error -2" (getaddrinfo's code taken for an errno), and
    # migrate said so only after the unmigrated run and the guest's set-up
    p, took = dmarw(*argv, "--key-file", key)
    lines = p.stderr.strip().splitlines()
    if "needs KVM" in p.stderr:
        pytest.skip(f"--guest refused first: {p.stderr.strip()}")
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    flag = argv[-2]
    assert lines[0].startswith("dmarw: error: [Errno 6] No such device or address: "), lines[0]
    assert f"{flag} nosuch.invalid:5000: cannot resolve host nosuch.invalid (" in lines[0], lines[0]
    assert "Unknown error" not in lines[0] and "listening" not in p.stderr
    assert p.stdout == "" and took < FAST  # refused before the run's first line: nothing measured
