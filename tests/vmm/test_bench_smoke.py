"""The real-VM benchmarks run end to end at a tiny size (their figures are not checked:
timing lives in the benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


def test_vmm_mmio_bench_runs(load_bench: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mmio.json"
    assert load_bench("vmm_mmio").main(["--exits", "200", "--rounds", "1", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert set(d["ratio_to_bare"]) == {"bare", "device", "python-ioctl"}
    assert "device callback / bare exit" in capsys.readouterr().out


def test_vmm_harvest_bench_runs(load_bench: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "harvest.json"
    assert load_bench("vmm_harvest").main(["--size-mib", "64", "--rounds", "1", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["fastest_at_1pct"] in ("bitmap", "clear", "ring")
    assert "fastest at 1 %" in capsys.readouterr().out


def test_bench_arguments_are_checked(load_bench: Any) -> None:
    with pytest.raises(SystemExit):
        load_bench("vmm_mmio").main(["--exits", "0"])
    with pytest.raises(SystemExit):
        load_bench("vmm_harvest").main(["--size-mib", "100000"])
