"""Shared fixtures.

* ``core``: the contract suites under ``tests/contract/`` run once per available core
  ("python" always, "native" when ``dmarw._native`` is built; if it is not, the native runs
  are skipped with the import error as the reason).  A suite never names a class of a core:
  it builds its objects through :func:`new_container` / :func:`new_vm` / :func:`new_group`
  (or the fixtures ``make_container`` / ``make_vm`` / ``make_group`` bound to ``core``), so
  this file is the one place that knows how a core's objects are made.
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
from collections.abc import Callable, Iterable
from typing import Any

import pytest

import dmarw
import dmarw.core

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


# -- the cores ------------------------------------------------------------------------------


def _native_missing() -> str | None:
    """Why the native core cannot run here, or None when it can."""
    try:
        import dmarw.native  # noqa: F401  (raises when only the C sources are there)
    except ImportError as e:
        return f"the native core dmarw._native is not built ({e}); run `pip install -e .` with a C compiler"
    return None


NATIVE_MISSING = _native_missing()
CORES = [
    pytest.param("python", id="python"),
    pytest.param(
        "native",
        id="native",
        marks=pytest.mark.skipif(NATIVE_MISSING is not None, reason=str(NATIVE_MISSING)),
    ),
]


def new_container(core: str, **kwargs: Any) -> dmarw.Container:
    """A container of ``core`` (``lock=``, ``mm_ref=``, ``pgsize=`` as the API takes them)."""
    return dmarw.core.container(core, **kwargs)


def new_vm(space: dmarw.AddressSpace, core: str) -> dmarw.Vm:
    """A VM of ``core`` over ``space``."""
    return dmarw.core.vm(space, core)


def new_group(name: str, core: str) -> dmarw.Group:
    """A VFIO group of ``core``."""
    return dmarw.Group(name, core=core)


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


# -- the dirty bitmaps ----------------------------------------------------------------------

BITMAP_PAGES = 1 << 15  # pages of the fixed-size (native) bitmap: more than any test marks


def new_bitmap(kind: str, pages: Iterable[int] = ()) -> Any:
    """A dirty bitmap of ``kind`` holding ``pages``."""
    from dmarw.bitmap import NO_DIRTY, DirtyBitmap, NoDirty

    if kind == "DirtyBitmap":
        return DirtyBitmap(pages)
    if kind == "NoDirty":
        assert not list(pages)
        return NoDirty()
    if kind == "NO_DIRTY":
        assert not list(pages)
        return NO_DIRTY
    if kind == "native":
        from dmarw.native import NativeDirtyBitmap

        return NativeDirtyBitmap(BITMAP_PAGES, pages)
    raise AssertionError(kind)


def _native_param(value: str) -> Any:
    return pytest.param(
        value,
        id=value,
        marks=pytest.mark.skipif(NATIVE_MISSING is not None, reason=str(NATIVE_MISSING)),
    )


BITMAP_KINDS = [
    pytest.param("DirtyBitmap", id="DirtyBitmap"),
    pytest.param("NoDirty", id="NoDirty"),
    pytest.param("NO_DIRTY", id="NO_DIRTY"),
    _native_param("native"),
]
TRACKING_BITMAP_KINDS = [BITMAP_KINDS[0], BITMAP_KINDS[3]]


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


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    marks = [m for m in COUNTED_MARKERS if m in report.keywords]
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
