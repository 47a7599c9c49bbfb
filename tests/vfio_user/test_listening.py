"""``listening.live``: a live server's socket file is told from a stale one, without a
connection to the live server where the kernel can say (sock_diag), by a connect where not."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest

from dmarw.errors import DmaError
from dmarw.vfio_user import listening
from dmarw.vfio_user.sample import SampleDevice
from dmarw.vfio_user.server import Server


def _bound(path: Path, *, listen: bool) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    if listen:
        s.listen(1)
    return s


def test_a_listener_is_found_without_a_connection(tmp_path: Path) -> None:
    with _bound(tmp_path / "s", listen=True) as srv:
        assert listening.live(tmp_path / "s")
        srv.setblocking(False)
        with pytest.raises(BlockingIOError):
            srv.accept()  # nothing was queued for it: the kernel answered


@pytest.mark.parametrize("kernel", ["sock_diag", "connect"])
def test_stale_and_live_told_apart(tmp_path: Path, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if kernel == "connect":  # no unix_diag, or the server in another network namespace
        def cannot(timeout: float = 0) -> set[tuple[int, int]]:
            raise OSError(errno.ENOENT, "no unix_diag")
        monkeypatch.setattr(listening, "listening_files", cannot)
    _bound(tmp_path / "stale", listen=False).close()
    assert not listening.live(tmp_path / "stale")
    with _bound(tmp_path / "live", listen=True):
        assert listening.live(tmp_path / "live")
    assert not listening.live(tmp_path / "live")  # closed: stale now


def test_server_refuses_a_live_socket_with_eaddrinuse(tmp_path: Path) -> None:
    path = tmp_path / "vu.sock"
    with Server(path, SampleDevice()):
        with pytest.raises(DmaError, match="a server is listening there already") as ei:
            Server(path, SampleDevice()).listen()
        assert ei.value.errno == errno.EADDRINUSE and str(path) in str(ei.value)
        assert path.exists()
    assert not path.exists()
