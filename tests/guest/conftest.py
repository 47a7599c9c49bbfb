"""Fixtures of the guest and GPU-device suites.

Tests that run the real guest carry the ``kvm`` marker and skip, with the reason, only where
``/dev/kvm`` is unusable, the native vCPU loop or the guest image did not build; the
terminal summary says how many of them ran.  The device tests on the simulated ``Vm`` need
no KVM.
"""

from __future__ import annotations

import functools

import pytest


@functools.cache
def guest_unusable() -> str | None:
    """Why the real guest cannot run here, or None."""
    from dmarw.vmm import native_available
    from dmarw.vmm.system import system

    if not native_available():
        return "the native vCPU loop dmarw._vmm is not built"
    try:
        system()
    except OSError as e:
        return f"KVM unusable: {e}"
    from dmarw.guest import image_path

    if not image_path().exists():
        return f"the guest image {image_path()} is not built (gcc -m32, ld, objcopy at install)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    why = None
    for item in items:
        if "guest_kvm" in item.keywords:
            item.add_marker(pytest.mark.kvm)
            why = why or guest_unusable()
            if why:
                item.add_marker(pytest.mark.skip(reason=why))


_counts = {"passed": 0, "failed": 0, "skipped": 0}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "guest_kvm" not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _counts[report.outcome] = _counts.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    ran = _counts["passed"] + _counts["failed"]
    if ran or _counts["skipped"]:
        why = guest_unusable() if _counts["skipped"] else None
        tail = f" (skipped: {why})" if why else ""
        terminalreporter.write_line(
            f"dmarw.guest: {ran} real-guest KVM tests ran ({_counts['passed']} passed, "
            f"{_counts['failed']} failed), {_counts['skipped']} skipped{tail}"
        )
