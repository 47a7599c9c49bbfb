"""The real guest on KVM with the GPU-like device: it builds from source; on each of the six
paths the checksum equals the Python model's and the dirty sets equal the guest's own
record; the three dirty modes agree; a lost device write and a device bypassing dma_rw are
caught; a run saved mid-way and restored into a new VM ends with the same checksum; the
CLI.  4 MiB guests, 200-300 commands: about 10 s here (this machine's KVM emulates 32-bit
guest code)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dmarw.devices.paths import PATH_NAMES
from dmarw.guest import build, image, image_path
from dmarw.guest.machine import GuestMachine, run_guest
from dmarw.guest.model import model_run
from dmarw.guest.params import Params

pytestmark = pytest.mark.guest_kvm

P = Params(seed=11, commands=200, ram_size=4 << 20, batch=16)


@pytest.fixture(scope="module")
def reference() -> int:
    return model_run(P).checksum


def test_guest_builds_from_source_reproducibly(tmp_path: Path) -> None:
    out = build.build(tmp_path)
    assert out.read_bytes() == image() == image_path().read_bytes()
    assert build.LOAD_GPA + len(image()) <= build.LIMIT_GPA


def test_guest_build_reports_compiler_errors(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "guest.c").write_text("this is not C;\n")
    (src / "guest.ld").write_text((Path(build.__file__).parent / "guest.ld").read_text())
    with pytest.raises(build.GuestBuildError, match="guest.c"):
        build.build(tmp_path / "out", src)


@pytest.mark.parametrize("path", PATH_NAMES)
def test_each_path_checksum_and_dirty_sets(path: str, reference: int) -> None:
    r = run_guest(path, P)
    assert r.checksum == reference
    assert r.commands == P.commands
    failed = [(c.name, c.detail) for c in r.checks if not c.ok]
    assert not failed
    assert r.pages["kernel"] == r.pages["vrec"] > 0
    if path == "kvm":
        assert r.pages["user"] == r.pages["drec"] > 0 and r.pages["container"] == 0
    else:
        assert r.pages["container"] == r.pages["drec"] > 0 and r.pages["user"] == 0
    assert r.exits["hlt"] == 1 and r.exits["mmio"] > P.commands // P.batch


@pytest.mark.parametrize("dirty", ["clear", "ring"])
def test_dirty_modes_agree(dirty: str, reference: int) -> None:
    r = run_guest("vfio-rcu", P, dirty=dirty)
    assert r.checksum == reference and r.ok, [c for c in r.checks if not c.ok]


def test_inline_device_and_writer_heavy_guest() -> None:
    p = Params(seed=2, commands=120, ram_size=4 << 20, writer_heavy=3)
    r = run_guest("vfio-mutex", p, threaded=False)
    assert r.checksum == model_run(p).checksum and r.ok
    light = run_guest("vfio-mutex", Params(seed=2, commands=120, ram_size=4 << 20), threaded=False)
    assert r.pages["vrec"] > light.pages["vrec"]


def test_lost_device_write_is_detected(reference: int) -> None:
    r = run_guest("vfio-external-user", P, device_kw={"drop_write": 10})
    assert r.checksum is not None and r.checksum != reference


def test_device_bypassing_dma_rw_is_detected(reference: int) -> None:
    with GuestMachine("vfio-mutex", P, device_kw={}) as m:
        m.device._bypass = lambda addr, data: m.write_host(addr, data)
        m.run()
        r = m.report()
    assert r.checksum == reference  # the bytes arrived, so only the dirty check can see it
    bad = [c.name for c in r.checks if not c.ok]
    assert bad == ["container bitmap == device writes (dma_rw)"]


@pytest.mark.parametrize("threaded", [True, False], ids=["threaded", "inline"])
def test_save_restore_mid_run_same_checksum(threaded: bool, reference: int) -> None:
    with GuestMachine("vfio-rwsem", P, threaded=threaded) as m:
        m.stop_after(P.commands // 2)
        assert m.run() == "intr"
        m.device.pause()
        state = m.save()
        done = m.device.regs.commands
    assert 0 < done < P.commands
    with GuestMachine("vfio-rwsem", P, threaded=threaded, load_image=False) as m2:
        m2.restore(state)
        m2.resume()
        assert m2.run() == "hlt"
        r = m2.report()
    assert r.checksum == reference and r.commands == P.commands


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    main = "import sys; from dmarw.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", main, "guest", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_runs_checks_and_writes_json(tmp_path: Path, reference: int) -> None:
    out = tmp_path / "g.json"
    p = _cli("--path", "kvm", "--ram", "4M", "--commands", "200", "--seed", "11", "--json", str(out))
    assert p.returncode == 0, p.stderr
    assert "all checks hold" in p.stdout
    assert max(len(line) for line in p.stdout.splitlines()) <= 80
    doc = json.loads(out.read_text())
    assert doc["schema"] == "dmarw-guest/1" and doc["ok"]
    assert doc["runs"][0]["checksum"] == f"{reference:#018x}"


@pytest.mark.parametrize("args, text", [
    (["--ram", "3"], "ram"),
    (["--ram", "lots"], "size"),
    (["--commands", "0"], "commands"),
    (["--batch", "65"], "batch"),
    (["--path", "nope"], "invalid choice"),
])
def test_cli_bad_input_one_line(args: list[str], text: str) -> None:
    p = _cli(*args)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert text in lines[-1]
