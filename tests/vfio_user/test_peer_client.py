"""libvfio-user's ``samples/client`` (a peer nobody here wrote) against ``dmarw serve``.

The client runs its whole script against ``dmarw serve --once --device sample``: version
negotiation, region and IRQ info, config space, DMA maps with fds, the device's DMA by
messages, DMA logging, and the device's migration to a second dmarw server.  For that
migration the client forks; the parent execs ``$(dirname argv0)/server -v <sock>_migrated``
and the child carries on as the client.  So the client is copied into a folder beside a
``server`` wrapper that starts the destination ``dmarw serve --once`` and then reaps the
forked client (its child after the exec), recording both exit statuses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import peer
import pytest

peer_build = peer.peer_build  # the session fixture (this folder has no conftest)

pytestmark = [pytest.mark.peer, pytest.mark.timeout(180)]

CLI = "import sys; from dmarw.cli import main; sys.exit(main())"


def _serve(sock: Path) -> list[str]:
    return [sys.executable, "-c", CLI, "serve", "--once", "--device", "sample", str(sock)]


WRAPPER = '''\
#!{python}
"""Started by libvfio-user's client as its migration destination: `server -v SOCKET`."""
import json, os, signal, subprocess, sys

signal.alarm(150)  # never outlive the test
sock = sys.argv[-1]
with open(sock + ".dest.log", "wb") as log:
    rc = subprocess.call({serve!r}[:-1] + [sock], stdout=log, stderr=subprocess.STDOUT)
client = None
while True:  # the client the peer forked before it exec'd us is our child now
    try:
        _pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    client = os.waitstatus_to_exitcode(status)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "result.json"), "w") as f:
    json.dump({{"destination": rc, "client": client}}, f)
sys.exit(rc)
'''


def test_sample_client_runs_to_completion_against_dmarw(peer_build: peer.PeerBuild, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    client = bindir / "client"
    shutil.copy2(peer_build.client, client)
    wrapper = bindir / "server"
    wrapper.write_text(WRAPPER.format(python=sys.executable, serve=_serve(Path("X"))))
    wrapper.chmod(0o755)
    sock = tmp_path / "vu.sock"

    with peer.running(_serve(sock), log=tmp_path / "source.log") as source:
        peer.wait_for_socket(sock, source, timeout=30)
        with peer.running([str(client), str(sock)], log=tmp_path / "client.log") as run:
            try:
                run.wait(timeout=150)
            except subprocess.TimeoutExpired:
                pytest.fail("libvfio-user's client did not finish in 150 s:\n" + _logs(tmp_path))
        source_rc = source.wait(timeout=30)

    result_file = bindir / "result.json"
    assert result_file.exists(), "the migration destination never ran:\n" + _logs(tmp_path)
    result = json.loads(result_file.read_text())
    assert result["client"] == 0, "libvfio-user's client failed:\n" + _logs(tmp_path)
    assert result["destination"] == 0, "the destination dmarw server failed:\n" + _logs(tmp_path)
    assert source_rc == 0, "the source dmarw server failed:\n" + _logs(tmp_path)
    out = (tmp_path / "client.log").read_text()
    assert "INTx triggered" in out and "starting destination server" in out


def _logs(tmp_path: Path) -> str:
    parts = []
    for name in ("client.log", "source.log", "vu.sock_migrated.dest.log"):
        p = tmp_path / name
        if p.exists():
            parts.append(f"--- {name}\n" + p.read_text()[-4000:])
    return "\n".join(parts)
