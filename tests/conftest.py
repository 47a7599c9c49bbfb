"""Shared fixtures: every behavioural suite runs against each lock strategy and mm-ref mode."""

from __future__ import annotations

import itertools

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
