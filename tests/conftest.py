"""Shared fixtures.

* ``core``: the contract suites under ``tests/contract/`` run once per available core
  ("python" always, "native" when ``dmarw._native`` is built; if it is not, the native runs
  are skipped with the import error as the reason).  A suite never names a class of a core:
  it builds its objects through the fixtures ``make_container`` / ``make_vm`` /
  ``make_group`` bound to ``core`` (or ``cores.new_container`` / ``new_vm`` / ``new_group``
  where a fixture cannot reach), so ``tests/cores.py`` is the one place that knows how a
  core's objects are made.
* ``container_kwargs``: one per lock strategy × mm-ref mode.
* ``bitmap_kind`` / ``make_bitmap``: every dirty bitmap implementation.
* Markers of tests that need something of the machine (registered in ``pyproject.toml``):
  ``kvm`` (needs ``/dev/kvm``) and ``peer`` (needs the libvfio-user build).  Mark such a test
  ``@pytest.mark.kvm`` / ``@pytest.mark.peer`` (add a marker name to :data:`COUNTED_MARKERS`
  and to pyproject to have it counted too); at the end of the run one line per marker says
  how many ran, passed and were skipped, with the skip reasons.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import pytest

import dmarw

LOCKS = ("mutex", "rwsem", "rcu")
MM_REFS = ("get_task_mm", "mmget_not_zero")
CONTAINER_KINDS = [
    pytest.param({"lock": lock, "mm_ref": mm}, id=f"{lock}-{mm}")
    for lock, mm in itertools.product(LOCKS, MM_REFS)
]


@pytest.fixture(params=CONTAINER_KINDS)
def container_kwargs(request: pytest.FixtureRequest) -> dict[str, str]:
    """Keyword arguments for ``make_container(**container_kwargs)``: one per strategy × mm-ref."""
    return dict(request.param)


# -- the cores (the helpers live in tests/cores.py) ----------------------------------------
from cores import BITMAP_KINDS, CORES, new_bitmap, new_container, new_group, new_vm  # noqa: E402


@pytest.fixture(params=CORES)
def core(request: pytest.FixtureRequest) -> str:
    """The core under test: every contract suite runs once per available core."""
    return str(request.param)


@pytest.fixture
def make_container(core: str) -> Callable[..., dmarw.Container]:
    """``make_container(**kwargs)``: a container of the core under test."""
    return lambda **kwargs: new_container(core, **kwargs)


@pytest.fixture
def make_vm(core: str) -> Callable[[dmarw.AddressSpace], dmarw.Vm]:
    """``make_vm(space)``: a VM of the core under test."""
    return lambda space: new_vm(space, core)


@pytest.fixture
def make_group(core: str) -> Callable[[str], dmarw.Group]:
    """``make_group(name)``: a group of the core under test."""
    return lambda name: new_group(name, core)


@pytest.fixture(params=BITMAP_KINDS)
def bitmap_kind(request: pytest.FixtureRequest) -> str:
    """Each dirty bitmap implementation: the Python one, tracking off (two ways), the native
    atomic one."""
    return str(request.param)


@pytest.fixture
def make_bitmap(bitmap_kind: str) -> Callable[[], Any]:
    """``make_bitmap()``: an empty bitmap of the kind under test."""
    return lambda: new_bitmap(bitmap_kind)


# -- benchmarks as modules ------------------------------------------------------------------


def _load_bench(name: str) -> Any:
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


@pytest.fixture
def load_bench() -> Callable[[str], Any]:
    """``load_bench(name)``: bench/<name>.py as a module (a fixture: a sub-folder's own
    conftest.py shadows this one's module name on the import path)."""
    return _load_bench


# -- markers of tests that need the machine: counted at the end of the run -------------------

#: marker name -> what the marked tests need (the summary line says it); add new ones here
#: and in pyproject.toml's ``[tool.pytest.ini_options] markers``.
COUNTED_MARKERS: dict[str, str] = {
    "kvm": "/dev/kvm",
    "peer": "the libvfio-user build",
}

_outcomes: dict[str, dict[str, str]] = defaultdict(dict)  # marker -> nodeid -> outcome
_skip_reasons: dict[str, Counter[str]] = defaultdict(Counter)


_marked: dict[str, list[str]] = {}  # nodeid -> the counted markers it carries


@pytest.hookimpl(trylast=True)  # after the folders' own hooks have added their markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Note each test's counted markers by marker, not keyword (a keyword match would also
    take a folder or checkout named ``kvm``)."""
    for item in items:
        names = {m.name for m in item.iter_markers()}
        _marked[item.nodeid] = [m for m in COUNTED_MARKERS if m in names]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    marks = _marked.get(report.nodeid, [])
    if not marks:
        return
    outcome: str | None = None
    reason = ""
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else ("failed" if report.failed else "passed")
    elif report.skipped:
        outcome = "skipped"
        if isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2]).removeprefix("Skipped: ")
    elif report.failed:
        outcome = "failed"
    elif report.when == "call":
        outcome = "passed"
    if outcome is None:
        return
    for m in marks:
        seen = _outcomes[m]
        if seen.get(report.nodeid) in ("failed", "skipped"):
            continue  # a teardown error after a failure is still one test
        seen[report.nodeid] = outcome
        if outcome == "skipped":
            _skip_reasons[m][reason] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line per counted marker: how many such tests ran, passed, were skipped and why."""
    lines = []
    for m, needs in COUNTED_MARKERS.items():
        got = Counter(_outcomes.get(m, {}).values())
        ran = got["passed"] + got["failed"] + got["xfailed"]
        line = (
            f"{m} tests (need {needs}): {ran} ran, {got['passed']} passed, "
            f"{got['failed']} failed, {got['skipped']} skipped"
        )
        if got["xfailed"]:
            line += f", {got['xfailed']} xfailed"
        if _skip_reasons.get(m):
            line += " (" + "; ".join(f"{n}x {r}" for r, n in _skip_reasons[m].items()) + ")"
        lines.append(line)
    terminalreporter.write_sep("-", "tests that need the machine")
    for line in lines:
        terminalreporter.write_line(line)
