"""The real-VM benchmarks run end to end at a tiny size (their figures are not checked:
timing lives in the benchmarks)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest


def load_bench(name: str) -> Any:
    """bench/<name>.py as a module (tests/conftest.py's helper, which this directory's
    conftest shadows on the import path)."""
    root = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("dmarw_tests_root_conftest", root)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.load_bench(name)


def test_vmm_mmio_bench_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mmio.json"
    assert load_bench("vmm_mmio").main(["--exits", "200", "--rounds", "1", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert set(d["ratio_to_bare"]) == {"bare", "device", "python-ioctl"}
    assert "device callback / bare exit" in capsys.readouterr().out


def test_vmm_harvest_bench_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "harvest.json"
    assert load_bench("vmm_harvest").main(["--size-mib", "64", "--rounds", "1", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["fastest_at_1pct"] in ("bitmap", "clear", "ring")
    assert "fastest at 1 %" in capsys.readouterr().out


def test_bench_arguments_are_checked() -> None:
    with pytest.raises(SystemExit):
        load_bench("vmm_mmio").main(["--exits", "0"])
    with pytest.raises(SystemExit):
        load_bench("vmm_harvest").main(["--size-mib", "100000"])
