"""``dmarw attach SOCKET``: the device report, its exit status, and bad input."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import peer
import pytest

from dmarw.vfio_user import protocol as P

peer_build = peer.peer_build  # the session fixture (this folder has no conftest)

pytestmark = pytest.mark.timeout(60)


def attach(*args: str) -> subprocess.CompletedProcess[str]:
    cli = "import sys; from dmarw.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", cli, "attach", *args],
                          capture_output=True, text=True, timeout=30)


def _one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.mark.peer
def test_attach_reports_the_sample_server(peer_build: peer.PeerBuild, tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    with peer.running([str(peer_build.server), "-v", str(sock)], log=tmp_path / "log") as srv:
        peer.wait_for_socket(sock, srv, timeout=20)
        r = attach(str(sock))
        assert r.returncode == 0, r.stderr
        assert srv.wait(timeout=10) == 0  # the sample serves one client, then exits 0
    assert all(len(line) <= 80 for line in r.stdout.splitlines())
    assert "PCI dead:beef subsystem cafe:babe" in r.stdout
    assert "0x0+0x1000, 0x2000+0x1000" in r.stdout  # BAR1's sparse mmap areas
    assert "every query answered" in r.stdout
    log = (tmp_path / "log").read_text()
    assert "DMA region" in log or "dma" in log.lower()  # the server saw the DMA_MAP


@pytest.mark.peer
def test_attach_json(peer_build: peer.PeerBuild, tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    with peer.running([str(peer_build.server), "-v", str(sock)], log=tmp_path / "log") as srv:
        peer.wait_for_socket(sock, srv, timeout=20)
        r = attach(str(sock), "--json", "--dma-size", "0x2000")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["errors"] == []
    assert doc["pci"]["vendor"] == 0xDEAD and doc["pci"]["device"] == 0xBEEF
    assert doc["dma"] == {"iova": 0, "size": 0x2000, "fd": True}
    assert [g["index"] for g in doc["regions"]] == list(range(9))
    assert doc["regions"][1]["mmap_areas"] == [[0, 0x1000], [0x2000, 0x1000]]
    assert [q["count"] for q in doc["irqs"]] == [1, 0, 0, 1, 1]


class _PartialServer(threading.Thread):
    """A server that negotiates and answers device info, then refuses region 3's info."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(20)

    def run(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(20)
        framer = P.Connection()
        with conn:
            while True:
                data, anc, _f, _a = conn.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 8))
                framer.receive_data(data, [])
                while (m := framer.next_message()) is not None:
                    h = m.header
                    if h.cmd == P.Command.VERSION:
                        out = P.encode_reply(h.msg_id, h.cmd, P.Version(0, 2, {"max_msg_fds": 8}))[0]
                    elif h.cmd == P.Command.DEVICE_GET_INFO:
                        out = P.encode_reply(h.msg_id, h.cmd, P.DeviceInfo(16, P.DEVICE_FLAGS_PCI, 9, 5))[0]
                    elif h.cmd == P.Command.DEVICE_GET_REGION_INFO and m.body[8] != 3:
                        out = P.encode_reply(h.msg_id, h.cmd, P.RegionInfo(m.body[8], 32, 3, 0, 0x1000).encode()[0])[0]
                    elif h.cmd in (P.Command.DMA_MAP, P.Command.DMA_UNMAP):
                        out = P.encode_reply(h.msg_id, h.cmd, m.body if h.cmd == P.Command.DMA_UNMAP else b"")[0]
                    else:
                        out = P.error_reply(h.msg_id, h.cmd, 22)
                    conn.sendall(out)
                if not data:
                    return


def test_attach_exits_nonzero_when_a_query_goes_unanswered(tmp_path: Path) -> None:
    sock = tmp_path / "partial.sock"
    srv = _PartialServer(sock)
    srv.start()
    r = attach(str(sock))
    srv.join(timeout=20)
    assert r.returncode == 1
    assert "NOT ANSWERED: DEVICE_GET_REGION_INFO 3" in r.stdout
    assert "NOT ANSWERED: DEVICE_GET_IRQ_INFO 0" in r.stdout


def test_attach_bad_input_is_one_line(tmp_path: Path) -> None:
    assert "No such file" in _one_line_error(attach(str(tmp_path / "absent.sock")))
    (tmp_path / "plain").write_text("x")
    assert "not a UNIX socket" in _one_line_error(attach(str(tmp_path / "plain")))
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(dead))
    s.close()  # the socket file stays, nobody listens
    assert "dead.sock" in _one_line_error(attach(str(dead)))


@pytest.mark.parametrize("args", [["--dma-size", "5"], ["--dma-size", str(1 << 40)],
                                  ["--timeout", "0"], ["--timeout", "x"]])
def test_attach_bad_arguments(tmp_path: Path, args: list[str]) -> None:
    r = attach(str(tmp_path / "s.sock"), *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.parametrize("device, ids", [("sample", "dead:beef subsystem cafe:babe"),
                                         ("gpu", "4744:5550 subsystem 4744:5550")])
def test_attach_reports_dmarw_serve(tmp_path: Path, device: str, ids: str) -> None:
    sock = tmp_path / f"{device}.sock"
    cli = "import sys; from dmarw.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", cli, "serve", "--once", "--device", device, str(sock)]
    with peer.running(cmd, log=tmp_path / "log") as srv:
        peer.wait_for_socket(sock, srv, timeout=30)
        r = attach(str(sock), "--json")
        assert srv.wait(timeout=20) == 0, (tmp_path / "log").read_text()
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["dma"]["fd"]
    p = doc["pci"]
    assert f"{p['vendor']:04x}:{p['device']:04x} subsystem {p['subsystem_vendor']:04x}:{p['subsystem']:04x}" == ids
