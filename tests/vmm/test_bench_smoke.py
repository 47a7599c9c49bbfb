"""The real-VM benchmarks run end to end at a tiny size (their figures are not checked:
timing lives in the benchmarks)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench(name: str) -> Any:
    """bench/<name>.py as a module, by path (``from conftest import load_bench`` would find
    whichever test directory's conftest.py is first on the import path)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


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
