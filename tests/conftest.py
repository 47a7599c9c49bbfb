"""Shared fixtures: every behavioural suite runs against each lock strategy and mm-ref mode."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

LOCKS = ("mutex", "rwsem", "rcu")
MM_REFS = ("get_task_mm", "mmget_not_zero")
CONTAINER_KINDS = [
    pytest.param({"lock": lock, "mm_ref": mm}, id=f"{lock}-{mm}")
    for lock, mm in itertools.product(LOCKS, MM_REFS)
]


@pytest.fixture(params=CONTAINER_KINDS)
def container_kwargs(request: pytest.FixtureRequest) -> dict[str, str]:
    """Keyword arguments for ``Container(**container_kwargs)``: one per strategy × mm-ref."""
    return dict(request.param)


def load_bench(name: str) -> Any:
    """Import ``bench/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", src)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod
