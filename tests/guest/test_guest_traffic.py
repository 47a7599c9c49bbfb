"""The lab's access source from real guests: two guests captured at once (each its own
process and KvmVm) give their device's exact access stream; ``reproduce --guest`` runs the
lab on it.  About 15 s."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from guest_skip import MARKS

from dmarw.guest.machine import run_guest
from dmarw.guest.params import CMD_SIZE, RING_ENTRIES, RING_GPA, Params
from dmarw.guest.traffic import capture, guest_source, lab_source
from dmarw.lab import reproduce as R

pytestmark = MARKS

RAM = 4 << 20


def test_capture_two_guests_at_once_records_the_device_stream() -> None:
    caps = capture([3, 4], commands=150, ram_size=RAM)
    assert [c.seed for c in caps] == [3, 4]
    assert caps[0].pid != caps[1].pid
    assert caps[0].checksum != caps[1].checksum
    alone = run_guest("kvm", Params(seed=3, commands=150, ram_size=RAM), device_kw={"record": True})
    assert caps[0].checksum == alone.checksum
    wl = caps[0].workload
    # the commands' accesses are the guest's, the same in every run; how many ring fetches
    # serve them depends on how doorbells and the engine interleave
    ring = range(RING_GPA, RING_GPA + RING_ENTRIES * CMD_SIZE)
    cmds = [r for r in wl.records if r[1] not in ring]
    assert len(cmds) == alone.device["reads"] + alone.device["writes"] + alone.device["fences"]
    assert wl.ops - len(cmds) >= alone.params.commands // alone.params.batch // 2
    assert all(a + s <= RAM for _, a, s in wl.records)
    assert "real guest seed 3" in wl.meta["source"]


def test_source_captures_once_per_seed() -> None:
    seen: list[list[int]] = []
    src = guest_source(100, vms=2, ram_size=RAM, progress=False, ops=50,
                       on_capture=lambda caps: seen.append([c.seed for c in caps]))
    a, b = src(0, 7), src(1, 7)
    assert src(0, 8) is b  # guest 8 was captured with 7, as VM 1
    assert seen == [[7, 8]]
    assert a.ops == b.ops == 50 and a.records != b.records


def test_lab_source_refuses_trace_and_guest() -> None:
    args = argparse.Namespace(trace="x.trace", guest=True, guest_commands=None, quick=True, vms=[1],
                              core=None, ops=None)
    with pytest.raises(SystemExit, match="choose one"):
        lab_source(args)


def test_reproduce_on_guest_traffic() -> None:
    opts = R.Options(quick=True, paths=["kvm", "vfio-mutex", "vfio-rwsem"], vms=[1, 2], sweep=False,
                     access=guest_source(400, vms=2, ram_size=RAM, progress=False))
    doc = R.reproduce(opts)
    assert R.validate(doc) == []
    assert doc["workload"]["profile"] == "guest"
    assert doc["runs"]["vfio-mutex/2vm"]["dirty_pages"][0] > 0
    assert {c["holds"] for c in doc["conclusions"]} <= {True, False, None}


def test_reproduce_guest_json_says_the_guest_ran(tmp_path: Path) -> None:
    # the options said profile glmark2 and 1,000,000 ops per VM: neither ran
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "dmarw", "reproduce", "--guest", "--guest-commands", "300", "--vms", "1",
                        "--paths", "kvm,vfio-mutex", "--no-sweep", "--rounds", "4", "--json", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert R.validate(doc) == []
    o = doc["options"]
    assert (o["source"], o["profile"], o["ops"], o["guest_commands"]) == ("guest", "guest", None, 300)
    assert doc["workload"]["profile"] == "guest"
    assert doc["runs"]["kvm/1vm"]["ops_per_vm"] == doc["workload"]["ops"] > 300  # ring fetches and fences too
