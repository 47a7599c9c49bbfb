"""Tiny end-to-end runs of the lab: every path on 1 and 2 VM processes, the sweep,
the reproduce JSON schema and the CLI.  Behaviour only: no timing is asserted."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from dmarw.cli import main
from dmarw.lab import reproduce as R
from dmarw.lab import runner
from dmarw.lab.paths import PATHS, VmEnv, resolve_core
from dmarw.lab.workload import Workload, generate

RAM = 1 << 20
CORES = ["python"] + (["native"] if resolve_core() == "native" else [])


def tiny(seed: int, ops: int = 300) -> Workload:
    return generate("glmark2", ops=ops, seed=seed, ram_size=RAM)


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("vms", [1, 2])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_runs_end_to_end(path: str, vms: int, core: str) -> None:
    wls = [tiny(i) for i in range(vms)]
    seen: list[tuple[int, int]] = []
    r = runner.run(path, wls, lock_ops=100, warmup=20, core=core, on_progress=lambda d, t: seen.append((d, t)))
    assert r.path == path and r.vms == vms
    assert r.reads == sum(w.counts()["reads"] for w in wls)
    assert r.writes == sum(w.counts()["writes"] for w in wls)
    assert len(r.per_vm) == vms and len({v["pid"] for v in r.per_vm}) == vms  # one process per VM
    # every VM logged exactly the pages its writes touched, in the path's own dirty log
    for w, pages in zip(wls, r.dirty_pages, strict=True):
        touched = {p for a, s in w.writes() for p in range(a >> 12, ((a + s - 1) >> 12) + 1)}
        assert pages == len(touched)
    names = {row["name"] for row in r.locks}
    if PATHS[path].kind == "percall":
        assert {"vfio.group_lock", "group.mutex", "iommu.lock"} <= names
        assert (r.lock("vfio.group_lock") or {})["per_op"] == pytest.approx(1.0)
    elif PATHS[path].kind == "external":
        assert "vfio.group_lock" not in names  # the handle skips the group steps
    else:
        assert "kvm.srcu" in names
    assert ("task_lock" in names) == (PATHS[path].mm_ref == "get_task_mm" and PATHS[path].kind != "kvm")
    assert seen and seen[-1][0] == seen[-1][1]  # progress reached the end
    json.dumps(r.to_json())


def test_paths_move_the_bytes() -> None:
    """Each path's access functions really read and write guest memory."""
    for path in PATHS:
        env = VmEnv(path, RAM, name=f"t-{path}")
        try:
            acc = env.access()
            assert not isinstance(acc.rw, functools.partial) or not acc.rw.keywords  # positional only
            read, write = acc.pair()
            write(0x3000, memoryview(b"dmarw-lab"))
            buf = bytearray(9)
            read(0x3000, memoryview(buf))
            assert bytes(buf) == b"dmarw-lab"
            assert env.vm.read_guest(0x3000, 9) == b"dmarw-lab"  # the same guest RAM
            assert env.dirty_pages() == 1
        finally:
            env.close()


@pytest.mark.skipif(resolve_core() != "native", reason="the native core is not selected")
def test_native_replayers_move_the_bytes_through_each_path() -> None:
    """On the native core each path's C replay (what the lab times) really writes and reads
    guest memory through that path, and per-call replays take the group locks per record."""
    from array import array

    from dmarw import lockstat

    for path in PATHS:
        env = VmEnv(path, RAM, name=f"t-native-{path}", core="native")
        try:
            replay = env.replayer()
            buf = bytearray(b"native-lab" + bytes(4086))
            ticks = array("Q", bytes(16))
            with lockstat.collect() as stats:
                rc, rn, wc, wn = replay(array("B", [1, 0]), array("Q", [0x5000, 0x5000]), array("I", [10, 10]), buf, ticks)
            assert (rn, wn) == (1, 1) and rc + wc == sum(ticks)
            assert env.vm.read_guest(0x5000, 10) == b"native-lab"
            assert env.dirty_pages() == 1
            counts = stats.counts()
            assert counts.get("vfio.group_lock", 0) == (2 if PATHS[path].kind == "percall" else 0), path
        finally:
            env.close()


def test_a_failing_vm_is_reported_not_hung() -> None:
    bad = Workload("trace", 0, RAM, generate(ops=10, ram_size=RAM).records)
    bad.ram_size = 4096 * 4  # records lie outside this guest: the path fails with EFAULT/EINVAL
    with pytest.raises(RuntimeError, match="VM 0"):
        runner.run("vfio-mutex", [bad, tiny(1)], warmup=0)


def test_sweep_rows_and_crossover_shape() -> None:
    sw = runner.sweep(sizes=(8, 4096, 3 * 4096), reps=25, ram_size=RAM)
    assert [r["size"] for r in sw["rows"]] == [8, 4096, 3 * 4096]
    for row in sw["rows"]:
        for k in ("kvm_ns", "vfio_ns", "diff_cycles", "kvm_read_ns", "vfio_write_ns"):
            assert isinstance(row[k], float)
    assert sw["crossover_bytes"] in (None, 8, 4096, 3 * 4096)


def test_reproduce_json_schema(tmp_path: Path) -> None:
    opts = R.Options(ops=200, seed=3, vms=(1, 2), sweep=True, sweep_reps=25, lock_ops=50, core="python", rounds=4)
    out = tmp_path / "r.json"
    png = tmp_path / "r.png"
    from rich.console import Console

    con = Console(file=open(tmp_path / "out.txt", "w"), width=150)  # noqa: SIM115
    doc = R.reproduce(opts, str(out), str(png), con)
    con.file.close()
    text = (tmp_path / "out.txt").read_text()
    assert R.validate(doc) == []
    back = json.loads(out.read_text())
    assert R.validate(back) == []
    assert back["schema"] == R.SCHEMA
    assert set(back["runs"]) == {f"{p}/{v}vm" for p in PATHS for v in (1, 2)}
    assert back["workload"]["ops"] == 200 and back["workload"]["seed"] == 3
    assert back["repeat"]["seeds"] == [4]
    assert back["options"]["rounds"] == 4
    assert (back["options"]["source"], back["options"]["profile"], back["options"]["ops"]) == ("profile", "glmark2", 200)
    run = back["runs"]["vfio-mutex/2vm"]
    assert run["vms"] == 2 and len(run["per_vm"]) == 8 and {v["round"] for v in run["per_vm"]} == {0, 1, 2, 3}
    assert len(run["rounds"]) == 4 and all(r["avg_ns"] > 0 for r in run["rounds"])
    assert run["reads"] + run["writes"] == 2 * 200  # the rounds together run each VM's whole workload
    assert [t["id"] for t in back["tables"]] == [str(i) for i in range(1, 9)]
    assert len(back["conclusions"]) >= 13
    assert all(c["verdict"] != "not measured" and c["intervals"] for c in back["conclusions"])
    for i in range(1, 9):
        assert f"({i})" in text
    flat = " ".join(text.split())
    assert sum(flat.count(s) for s in ("HOLDS", "DOES NOT HOLD", "WITHIN NOISE")) >= 14
    assert "Traceback" not in text
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a document missing pieces is refused
    broken = dict(back)
    del broken["machine"]
    broken["tables"] = broken["tables"][:7]
    assert len(R.validate(broken)) >= 2


def test_reproduce_subset_marks_missing_verdicts(tmp_path: Path) -> None:
    from rich.console import Console

    opts = R.Options(ops=150, vms=(1,), paths=("kvm", "vfio-external-user"), sweep=False, lock_ops=50, core="python",
                     rounds=4)
    con = Console(file=open(tmp_path / "o.txt", "w"), width=150)  # noqa: SIM115
    doc = R.reproduce(opts, None, None, con)
    con.file.close()
    assert R.validate(doc) == []
    states = {c["id"]: c["verdict"] for c in doc["conclusions"]}
    assert states["C4"] == states["C13"] == "not measured"  # and said so


def test_reproduce_json_options_say_a_trace_ran_uncut(tmp_path: Path) -> None:
    # they said the default profile and 1,000,000 ops per VM whatever the trace held
    trace, out = tmp_path / "t.trace", tmp_path / "r.json"
    assert main(["workload", "--ops", "300", "--seed", "2", "--ram-size", str(RAM), "-o", str(trace)]) == 0
    assert main(["reproduce", "--trace", str(trace), "--vms", "1", "--paths", "kvm,vfio-mutex", "--no-sweep",
                 "--rounds", "4", "--core", "python", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert R.validate(doc) == []
    o = doc["options"]
    assert (o["source"], o["trace"], o["ops"], o["profile"]) == ("trace", str(trace), None, "glmark2")
    assert doc["workload"]["ops"] == doc["runs"]["kvm/1vm"]["ops_per_vm"] == 300
    del o["source"]
    assert R.validate(doc) == ["options.source missing"]


def test_cli_workload_and_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "g.trace"
    assert main(["workload", "--ops", "400", "--seed", "5", "--ram-size", str(RAM), "-o", str(trace)]) == 0
    w = Workload.load(str(trace))
    assert w == generate(ops=400, seed=5, ram_size=RAM)
    out = tmp_path / "b.json"
    assert main(["bench", "--path", "vfio-rcu", "--vms", "2", "--trace", str(trace), "--core", "python",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "vfio-rcu" in text and "kvm" in text and "iommu.rcu" in text
    doc = json.loads(out.read_text())
    assert set(doc["runs"]) == {"kvm", "vfio-rcu"} and doc["runs"]["vfio-rcu"]["vms"] == 2


def test_cli_rejects_bad_options() -> None:
    with pytest.raises(SystemExit):
        main(["reproduce", "--paths", "kvm,nope"])
    with pytest.raises(SystemExit):
        main(["reproduce", "--vms", "0"])
