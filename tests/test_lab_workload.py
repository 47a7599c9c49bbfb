"""Workload generation and trace files: proportions, bounds, exact round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmarw import DmaError
from dmarw.lab.workload import PAGE, Workload, generate


@pytest.fixture(scope="module")
def big() -> Workload:
    return generate("glmark2", ops=100_000, seed=7)


def test_profile_proportions_on_a_large_sample(big: Workload) -> None:
    c = big.counts()
    assert c["ops"] == 100_000
    assert abs(c["reads"] / c["ops"] - 0.63) <= 0.01
    assert abs(c["page_reads"] / c["reads"] - 0.48) <= 0.01
    reads = big.reads()
    sub = [s for a, s in reads if not (s == PAGE and a % PAGE == 0)]
    assert all(s < PAGE for s in sub)  # the other reads are under a page
    assert len(sub) + c["page_reads"] == c["reads"]
    assert all(s < PAGE for _, s in big.writes())
    assert len(big.writes()) == c["writes"]


def test_records_stay_inside_guest_ram(big: Workload) -> None:
    for op, addr, size in big.records:
        assert op in ("r", "w")
        assert addr >= 0 and size > 0 and addr + size <= big.ram_size


def test_generation_is_seeded() -> None:
    assert generate(ops=2000, seed=3) == generate(ops=2000, seed=3)
    assert generate(ops=2000, seed=3) != generate(ops=2000, seed=4)


@settings(max_examples=15, deadline=None)
@given(ops=st.integers(1, 300), seed=st.integers(0, 2**32), pages=st.integers(16, 4096))
def test_trace_round_trips_exactly(tmp_path_factory: pytest.TempPathFactory, ops: int, seed: int, pages: int) -> None:
    w = generate(ops=ops, seed=seed, ram_size=pages * PAGE)
    path = tmp_path_factory.mktemp("trace") / "w.trace"
    w.save(str(path))
    back = Workload.load(str(path))
    assert back == w
    assert list(back.records) == list(w.records)
    assert back.assumption == w.assumption


RAM_EMPTY = 16 * PAGE


def test_hand_written_trace_and_bad_lines(tmp_path: Path) -> None:
    p = tmp_path / "mine.trace"
    p.write_text("dmarw-trace 1\n# my device\nr 0x1000 4096\nw 0x2008 8\n")
    w = Workload.load(str(p))
    assert list(w.records) == [("r", 0x1000, 4096), ("w", 0x2008, 8)]
    assert w.ram_size == 0x3000 and w.profile == "trace"
    p.write_text("dmarw-trace 1\nr 0x1000\n")
    with pytest.raises(DmaError):
        Workload.load(str(p))
    p.write_text("not a trace\n")
    with pytest.raises(DmaError):
        Workload.load(str(p))
    generate(ops=0, ram_size=RAM_EMPTY).save(str(p))  # a trace without records cannot be replayed
    with pytest.raises(DmaError, match="no records"):
        Workload.load(str(p))
    p.write_text("dmarw-trace 1\nops 3\nr 0x0 8\n")
    with pytest.raises(DmaError):  # truncated
        Workload.load(str(p))


def test_bad_arguments_are_dma_errors() -> None:
    with pytest.raises(DmaError):
        generate("quake", ops=10)
    with pytest.raises(DmaError):
        generate(ops=10, ram_size=4097)
