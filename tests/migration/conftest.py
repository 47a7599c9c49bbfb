"""The running-guest migration suites: every test here carries the ``kvm`` marker and skips,
with the reason, only where KVM, the native vCPU loop or the built guest is missing; the
terminal summary says how many ran."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_counts = {"passed": 0, "failed": 0, "skipped": 0}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from dmarw.migration.guest_cli import kvm_unusable

    mine = [i for i in items if HERE in Path(str(i.fspath)).parents]
    for item in mine:
        item.add_marker(pytest.mark.kvm)
    why = kvm_unusable()
    if why:
        for item in mine:
            item.add_marker(pytest.mark.skip(reason=f"running-guest migration needs KVM: {why}"))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if HERE not in Path(report.fspath).resolve().parents:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _counts[report.outcome] = _counts.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    ran = _counts["passed"] + _counts["failed"]
    if ran or _counts["skipped"]:
        terminalreporter.write_line(
            f"dmarw.migration: {ran} running-guest (KVM) tests ran ({_counts['passed']} passed, "
            f"{_counts['failed']} failed), {_counts['skipped']} skipped"
        )
