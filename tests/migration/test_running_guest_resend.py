"""A running guest (KVM) whose page is torn while pre-copy read it: the source's check of one
page comes out wrong in round 0, as if the guest wrote it between the CRC and the copy.  The
destination (a guest VM whose RAM the stream fills directly) names it in its last pre-copy
acknowledgement, the final round sends it again, and both verifications pass.  Ignoring
that acknowledgement, the destination refuses END naming the page and the guest runs on.

The torn pages are ones the guest never writes (page 0 and the parameter block), so no
later round sends them again on its own: only the acknowledgement can."""

from __future__ import annotations

import pytest

from dmarw.migration import control, source
from dmarw.migration.running import GuestConfig, run_guest_migration
from dmarw.migration.source import MigrationFailed
from pages_stream import Tear

RAM = 64 << 20


def config(seed: int) -> GuestConfig:
    return GuestConfig(ram=RAM, seed=seed, commands=1200, plain_copy=False, timeout=60.0, guest_timeout=15.0)


@pytest.mark.parametrize(("seed", "gfn"), [(0, 0x0), (1, 0xF), (2, 0x0)])
def test_running_guest_page_torn_in_precopy_is_sent_again(seed: int, gfn: int, monkeypatch: pytest.MonkeyPatch) -> None:
    tear = Tear(gfn, list(range(RAM >> 12)))
    monkeypatch.setattr(source, "crc32c_pages", tear)
    o = run_guest_migration(config(seed), on_round_start=tear.on_round_start)
    assert tear.torn == 1
    final = o.report.rounds[-1]
    assert final.final and final.resent >= 1  # this page, and any the guest really tore
    assert o.pages_ok, [hex(g) for g in o.differing[:8]]
    assert o.checksum_ok and o.ok


def test_running_guest_page_torn_and_not_sent_again_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    tear = Tear(0, list(range(RAM >> 12)))
    monkeypatch.setattr(source, "crc32c_pages", tear)
    real = control.parse_rack
    monkeypatch.setattr(source.control, "parse_rack", lambda payload: (real(payload)[0], b""))
    with pytest.raises(MigrationFailed, match=r"page\(s\) failed their check while the guest ran and were not sent again: 0x0\b"):
        run_guest_migration(config(0), on_round_start=tear.on_round_start)
    assert tear.torn == 1
