"""The running-guest migration suites: every test here carries the ``kvm`` marker and skips,
with the reason, only where KVM, the native vCPU loop or the built guest is missing; the
terminal summary says how many ran.  The fixture ``incoming`` gives a test ``dmarw incoming``
processes and reaps each when the test ends."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from guest_runs import KEY

from incoming_proc import Incoming

HERE = Path(__file__).resolve().parent
INCOMING_WAIT = 90.0  # for a destination's exit once its source is done
INCOMING_ACCEPT = 60.0  # its --timeout: for a source to connect, then for each message
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


@pytest.fixture(scope="session")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared key, in the file both ends are given (``--key-file``)."""
    p = tmp_path_factory.mktemp("migration-key") / "key"
    p.write_bytes(KEY)
    return p


class _Spare:
    """The next test's ``dmarw incoming``, started while this test runs, so that its Python
    start-up overlaps a migration instead of preceding one; used only while young enough
    that its wait for a source (``INCOMING_ACCEPT`` s) is far from over."""

    def __init__(self, key_file: Path) -> None:
        self.key_file = key_file
        self.next: Incoming | None = None

    def start(self, env: dict[str, str] | None, listen_later: bool = False) -> Incoming:
        return Incoming(self.key_file, timeout=INCOMING_ACCEPT, wait=INCOMING_WAIT, env=env, listen_later=listen_later)

    def take(self) -> Incoming:
        inc, self.next = self.next, None
        if inc is None or inc.proc.poll() is not None or time.monotonic() - inc.started > INCOMING_ACCEPT / 3:
            if inc is not None:
                inc.close()
            inc = self.start(None)
        self.next = self.start(None, listen_later=True)
        return inc

    def close(self) -> None:
        if self.next is not None:
            self.next.close()
            self.next = None


@pytest.fixture(scope="session")
def _spare_incoming(key_file: Path) -> Iterator[_Spare]:
    spare = _Spare(key_file)
    yield spare
    spare.close()


@pytest.fixture
def incoming(_spare_incoming: _Spare) -> Iterator[Callable[..., Incoming]]:
    """``incoming(**env)``: a ``dmarw incoming`` (one migration each) listening on
    127.0.0.1 with the shared key file, ``env`` added to its environment.  Every one this
    test was given is killed unless it has exited, and reaped, when the test ends, passed or
    failed; the one started for the next test is reaped at the end of the session."""
    given: list[Incoming] = []

    def start(**env: str) -> Incoming:
        inc = _spare_incoming.start(env) if env else _spare_incoming.take()
        given.append(inc)
        return inc

    yield start
    for inc in given:
        inc.close()
