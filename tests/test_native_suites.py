"""The stateful model suite and the threaded suite again, on the native core.

``test_native.py`` re-runs the type1, kvm and vfio suites; this file does the same for the
hypothesis reference-model machines (``test_model``) and the races (``test_threads``): both
build ``Container``/``Vm`` from their module globals, which the fixture below swaps for the
native classes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("dmarw._native")

import test_model  # noqa: E402
import test_threads  # noqa: E402
from dmarw.native import NativeContainer, NativeVm  # noqa: E402
from test_model import *  # noqa: E402,F403  (the model machines, run again on the native core)
from test_threads import *  # noqa: E402,F403  (the threaded suite, run again on the native core)


@pytest.fixture(autouse=True)
def _native_core(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for mod in (test_model, test_threads):
        monkeypatch.setattr(mod, "Container", NativeContainer)
        monkeypatch.setattr(mod, "Vm", NativeVm)
    yield


def test_the_borrowed_suites_build_native_objects() -> None:
    """Guards the swap above: a renamed global would silently test the Python core again."""
    assert test_model.Container is NativeContainer and test_model.Vm is NativeVm
    assert test_threads.Container is NativeContainer and test_threads.Vm is NativeVm
    space = test_threads.AddressSpace()
    try:
        assert isinstance(test_threads.Container(lock="rcu"), NativeContainer)
    finally:
        space.close()
