"""``dmarw serve``: one client with --once, Ctrl-C, and bad arguments (one line, no traceback)."""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmarw.vfio_user import protocol as p
from terminal import sigint_default


def _serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dmarw.cli", "serve", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default,
    )


def _wait_socket(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the server did not create its socket"
        time.sleep(0.02)


def _call(s: socket.socket, conn: p.Connection, payload: p.Payload, msg_id: int) -> p.Payload:
    data, _ = p.encode_request(msg_id, payload)
    s.sendall(data)
    while (m := conn.next_message()) is None:
        conn.receive_data(s.recv(1 << 16))
    return p.decode_reply(m)


def _sample_client(path: Path) -> None:
    """A good client of the sample device: version, device info, its config IDs; then it goes."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        conn = p.Connection()
        v = _call(s, conn, p.Version(0, 2, {"max_msg_fds": 8, "max_data_xfer_size": 1024}), 1)
        assert isinstance(v, p.Version) and v.capabilities["max_msg_fds"] == 8
        info = _call(s, conn, p.DeviceInfo(), 2)
        assert isinstance(info, p.DeviceInfo) and info.num_regions == 9
        cfg = _call(s, conn, p.RegionRead(p.CONFIG_REGION, 0, 4), 3)
        assert isinstance(cfg, p.RegionAccess) and struct.unpack("<HH", cfg.data) == (0xDEAD, 0xBEEF)


def test_serve_once_exits_zero_after_a_good_client(tmp_path: Path) -> None:
    path = tmp_path / "vu.sock"
    proc = _serve("--device", "sample", "--once", str(path))
    try:
        _wait_socket(path, proc)
        _sample_client(path)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert not path.exists()


def test_serve_once_exits_nonzero_after_a_broken_client(tmp_path: Path) -> None:
    path = tmp_path / "vu.sock"
    proc = _serve("--device", "sample", "--once", str(path))
    try:
        _wait_socket(path, proc)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        s.sendall(struct.pack("<HHIII", 1, 1, 8, 0, 0))  # size below the header
        assert s.recv(64)  # the error reply, then the hang-up
        s.close()
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 1, err


def test_ctrl_c_is_one_line_130_and_removes_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "vu.sock"
    proc = _serve("--device", "sample", str(path))
    try:
        _wait_socket(path, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 130
    lines = err.strip().splitlines()
    assert lines[-1] == "dmarw serve: interrupted" and "Traceback" not in err
    assert not path.exists()


def test_sigterm_is_one_line_143_and_removes_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "vu.sock"
    proc = _serve("--device", "gpu", str(path))
    try:
        _wait_socket(path, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "dmarw serve: terminated"
    assert not path.exists()


@pytest.mark.parametrize("where", ["missing-dir", "regular-file", "too-long"])
def test_bad_socket_path_is_one_line(tmp_path: Path, where: str) -> None:
    if where == "missing-dir":
        path = tmp_path / "nope" / "vu.sock"
    elif where == "regular-file":
        path = tmp_path / "file"
        path.write_text("not a socket")
    else:
        path = tmp_path / ("x" * 120)
    proc = subprocess.run([sys.executable, "-m", "dmarw.cli", "serve", "--device", "sample", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert str(path)[:20] in proc.stderr
    if where == "regular-file":
        assert path.read_text() == "not a socket"  # untouched


def test_unknown_device_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "dmarw.cli", "serve", "--device", "nosuch", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_a_live_servers_socket_is_refused_and_left_serving(tmp_path: Path) -> None:
    # the second server unlinked the first one's socket and bound its own in its place
    path = tmp_path / "vu.sock"
    first = _serve("--device", "sample", "--once", str(path))
    try:
        _wait_socket(path, first)
        second = subprocess.run([sys.executable, "-m", "dmarw.cli", "serve", "--device", "gpu", str(path)],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        line = _one_line(second)
        assert line.startswith("dmarw: error: [Errno 98] Address already in use: ") and str(path) in line, line
        _sample_client(path)  # the first server's socket still (sample, not gpu), its --once client yet to come
        _, err = first.communicate(timeout=20)
    finally:
        first.kill()
    assert first.returncode == 0, err


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "vu.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a server that died
    with pytest.raises(ConnectionRefusedError):
        socket.socket(socket.AF_UNIX).connect(str(path))
    proc = _serve("--device", "sample", str(path))
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith(f"dmarw serve: sample device on {path}")
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))  # the new server's socket in its place
        s.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert not path.exists()
