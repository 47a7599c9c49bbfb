"""Fixtures of the real-VM suites: every test here carries the ``kvm`` marker and skips,
with the reason, only where ``/dev/kvm`` is missing or unusable (or the native vCPU loop
did not build); the terminal summary says how many KVM tests ran."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmarw import AddressSpace

HERE = Path(__file__).resolve().parent


@functools.cache
def kvm_unusable() -> str | None:
    """Why KVM tests cannot run here, or None."""
    from dmarw.vmm import native_available
    from dmarw.vmm.system import system

    if not native_available():
        return "the native vCPU loop dmarw._vmm is not built"
    try:
        system()
    except OSError as e:
        return f"KVM unusable: {e}"
    from kvm_asm import missing_tools

    missing = missing_tools()
    if missing:
        return f"binutils missing ({', '.join(missing)}): cannot assemble the test guests"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kvm)
    why = kvm_unusable()
    if why:
        skip = pytest.mark.skip(reason=why)
        for item in items:
            if "kvm" in item.keywords:
                item.add_marker(skip)


_counts = {"passed": 0, "failed": 0, "skipped": 0}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "kvm" not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _counts[report.outcome] = _counts.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for plugin in terminalreporter.config.pluginmanager.get_plugins():
        if "kvm" in (getattr(plugin, "COUNTED_MARKERS", None) or ()):
            return  # the suite-wide summary (tests/conftest.py) already counts the kvm marker
    ran = _counts["passed"] + _counts["failed"]
    if ran or _counts["skipped"]:
        why = kvm_unusable()
        tail = f" (skipped: {why})" if why and _counts["skipped"] else ""
        terminalreporter.write_line(
            f"dmarw.vmm: {ran} KVM tests ran ({_counts['passed']} passed, {_counts['failed']} failed), "
            f"{_counts['skipped']} skipped{tail}"
        )


@pytest.fixture
def space() -> Iterator[AddressSpace]:
    sp = AddressSpace()
    yield sp
    sp.close()
