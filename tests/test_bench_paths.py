"""bench/paths.py: every lab path is the real one, reads what every other wrote, writes JSON."""

from __future__ import annotations

from typing import Any


def test_bench_paths_runs_every_path_and_writes_json(tmp_path: Any, load_bench: Any) -> None:
    """A tiny run of bench/paths.py: every path reads what every other wrote; JSON schema."""
    import json

    mod = load_bench("paths")
    out = tmp_path / "paths.json"
    assert mod.main(["--rounds", "3", "--passes", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"cycles_source", "timer_overhead_ns", "loop_overhead_ns"} <= set(data["meta"])
    got = {(r["path"], r["op"], r["size"]) for r in data["results"]}
    assert got == {(p, o, s) for p in mod.PATHS for o in mod.OPS for s in mod.SIZES}
    for r in data["results"]:
        assert len(r["samples_ns"]) == 3
        if r["path"] == "kvm":
            assert r["ratio_to_kvm"] == 1.0
