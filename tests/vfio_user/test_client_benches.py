"""The vfio-user benchmarks run (one short round) and report every case; no timing asserted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peer
import pytest

peer_build = peer.peer_build  # the session fixture (this folder has no conftest)

pytestmark = pytest.mark.timeout(120)



def test_dma_bench_covers_both_paths_and_sizes(load_bench: Any, tmp_path: Path) -> None:
    bench = load_bench("vfio_user_dma")
    out = tmp_path / "dma.json"
    assert bench.main(["--rounds", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {(r["op"], r["size"]) for r in doc["rows"]} == {(o, s) for o in ("read", "write") for s in (4096, 65536)}
    assert all(r["fd_ns"] > 0 and r["msg_ns"] > 0 for r in doc["rows"])


@pytest.mark.peer
def test_rtt_bench_times_both_servers(load_bench: Any, tmp_path: Path, peer_build: object) -> None:
    bench = load_bench("vfio_user_rtt")
    out = tmp_path / "rtt.json"
    assert bench.main(["--rounds", "1", "--writes", "20", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["client"] for r in doc["rows"]] == ["client", "raw"]
    assert all(r["ratio"] is not None and r["ratio"] > 0 for r in doc["rows"])
