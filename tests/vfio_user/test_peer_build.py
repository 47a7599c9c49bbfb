"""The peer (libvfio-user) builds in a scratch folder and its sample server comes up."""

from __future__ import annotations

from pathlib import Path

import peer
import pytest

peer_build = peer.peer_build  # the session fixture (this folder has no conftest)



def test_missing_source_is_unavailable_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(peer.SOURCE_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(peer.PeerUnavailable, match="source not found"):
        peer.peer_source()


def test_source_key_follows_contents(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("1")
    k1 = peer.source_key(tmp_path)
    (tmp_path / "a").write_text("2")
    assert peer.source_key(tmp_path) != k1


@pytest.mark.peer
def test_peer_builds_and_its_server_listens(peer_build: peer.PeerBuild, tmp_path: Path) -> None:
    assert peer_build.server.is_file() and peer_build.client.is_file()
    sock = tmp_path / "s.sock"
    with peer.running([str(peer_build.server), "-v", str(sock)], log=tmp_path / "log") as proc:
        peer.wait_for_socket(sock, proc, timeout=20)
        assert proc.poll() is None
