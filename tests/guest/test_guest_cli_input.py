"""``dmarw guest`` refuses an output it cannot write before the guest runs: one line on
stderr, no traceback, nothing printed on stdout (no run happened)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("where", ["missing/out.json", "."])
def test_unwritable_json_is_refused_before_the_run(tmp_path: Path, where: str) -> None:
    p = subprocess.run([sys.executable, "-m", "dmarw", "guest", "--json", str(tmp_path / where)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("dmarw: error: --json "), p.stderr
    assert p.stdout == "" and "Traceback" not in p.stderr
    assert list(tmp_path.iterdir()) == []
