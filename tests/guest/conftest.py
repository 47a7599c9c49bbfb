"""The guest suites' KVM count: the summary says how many real-guest tests ran (they carry
the ``kvm`` mark and skip with the reason where KVM is unusable: see ``guest_skip.py``),
unless the suite-wide summary of tests/conftest.py already counts the ``kvm`` marker.
Runtest hooks of a conftest see only the tests below it, so this counts tests/guest."""

from __future__ import annotations

import pytest

_counts = {"passed": 0, "failed": 0, "skipped": 0}
_why: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "kvm" not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _counts[report.outcome] = _counts.get(report.outcome, 0) + 1
        if report.outcome == "skipped" and not _why and isinstance(report.longrepr, tuple):
            _why.append(str(report.longrepr[2]))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for plugin in terminalreporter.config.pluginmanager.get_plugins():
        if "kvm" in (getattr(plugin, "COUNTED_MARKERS", None) or ()):
            return
    ran = _counts["passed"] + _counts["failed"]
    if ran or _counts["skipped"]:
        tail = f" ({_why[0]})" if _why else ""
        terminalreporter.write_line(
            f"dmarw.guest: {ran} real-guest KVM tests ran ({_counts['passed']} passed, "
            f"{_counts['failed']} failed), {_counts['skipped']} skipped{tail}"
        )
