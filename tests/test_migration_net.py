"""Migration between hosts (TCP on 127.0.0.1, ``dmarw incoming`` as its own process), the
control messages and key handshake, the keyed stream, and the fault cases.

Every wait is bounded: sockets and subprocesses have timeouts, so a hang fails the test.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dmarw.checksum import crc32c
from dmarw.errors import DmaError
from dmarw.migration import control
from dmarw.migration.channel import Channel, handshake_dest, handshake_source
from dmarw.migration.harness import Config, SourceGuest, attempt, build_writers, run
from dmarw.migration.source import MigrationFailed
from dmarw.migration.stream import Decoder, Encoder, StreamError
from dmarw.mm import PAGE_SIZE
from incoming_proc import Incoming

KEY = bytes(range(32))
PS = PAGE_SIZE
LAYOUT = ((0, 1 << 20),)
WAIT = 60.0


# -- control messages (sans-I/O) -------------------------------------------------------------
def test_control_messages_round_trip_in_any_chunking() -> None:
    msgs = [control.encode(control.REDY), control.done(12345, 7), control.fail("no"), control.jsonmsg(control.STAT, {"a": 1})]
    wire = b"".join(msgs)
    for step in (1, 3, 7, len(wire)):
        r = control.Reader()
        got = []
        for i in range(0, len(wire), step):
            r.receive_data(wire[i : i + step])
            while (m := r.next_message()) is not None:
                got.append(m)
        assert [t for t, _ in got] == [control.REDY, control.DONE, control.FAIL, control.STAT]
        assert control.parse_done(got[1][1]) == (12345, 7)
        assert control.parse_json(control.STAT, got[3][1]) == {"a": 1}


def test_control_reader_refuses_unknown_tags_and_oversized_lengths_before_the_payload() -> None:
    r = control.Reader()
    r.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(control.ControlError, match="unknown control message b'GET '") as ei:
        r.next_message()
    assert ei.value.errno == errno.EPROTO
    r = control.Reader()
    r.receive_data(control.HEADER.pack(control.PROV, 1 << 30))  # no payload follows: refused now
    with pytest.raises(control.ControlError, match="PROV claims 0x40000000 payload bytes, limit 0x20"):
        r.next_message()
    with pytest.raises(control.ControlError, match="DONE payload of 3 bytes"):
        control.parse_done(b"abc")
    with pytest.raises(DmaError, match="8 bytes, a shared key must be 16"):
        control.check_key(b"12345678")


def _pair_handshake(src_key: bytes, dst_key: bytes) -> tuple[bytes | BaseException, bytes | BaseException]:
    a, b = socket.socketpair()
    a.settimeout(WAIT)
    b.settimeout(WAIT)
    out: dict[str, bytes | BaseException] = {}

    def dest_side() -> None:
        try:
            out["d"] = handshake_dest(Channel(b, "source"), dst_key)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["d"] = e
        b.close()

    t = threading.Thread(target=dest_side)
    t.start()
    try:
        out["s"] = handshake_source(Channel(a, "destination"), src_key)
    except BaseException as e:  # noqa: BLE001
        out["s"] = e
    a.close()
    t.join(WAIT)
    return out["s"], out["d"]


def test_handshake_gives_both_ends_one_fresh_session_key() -> None:
    s1, d1 = _pair_handshake(KEY, KEY)
    s2, _ = _pair_handshake(KEY, KEY)
    assert isinstance(s1, bytes) and s1 == d1 and len(s1) == 32
    assert s1 != s2  # fresh nonces: a recorded session cannot be replayed


def test_handshake_with_a_wrong_key_is_refused_by_both_ends() -> None:
    s, d = _pair_handshake(KEY, bytes(32))
    assert isinstance(s, control.ControlError) and s.errno == errno.EACCES
    assert "does not hold the shared key" in str(s)
    assert isinstance(d, OSError)  # the source refused the destination's proof and said so
    assert "refused" in str(d)


# -- the keyed stream ----------------------------------------------------------------------
def _stream(key: bytes | None) -> bytes:
    enc = Encoder(PS, LAYOUT, key)
    parts = [*enc.start(), *enc.pages_frame([0, PS], bytes(range(256)) * (2 * PS // 256)), *enc.end_round()]
    parts += [*enc.state_frame("vcpu0", b"regs"), *enc.end()]
    return b"".join(bytes(p) for p in parts)


def _decode(stream: bytes, key: bytes | None) -> list[object]:
    dec = Decoder(PS, LAYOUT, key)
    dec.receive_data(stream)
    evs: list[object] = list(dec.events())
    dec.receive_data(b"")
    evs += dec.events()
    return evs


def test_keyed_stream_round_trips_and_carries_state() -> None:
    evs = _decode(_stream(KEY), KEY)
    assert [type(e).__name__ for e in evs] == ["Header", "Pages", "RoundEnd", "State", "End"]
    assert len(_stream(KEY)) == len(_stream(None)) + 5 * 16  # one 16-byte tag per frame


def test_stream_altered_in_flight_with_a_fixed_crc_is_unauthenticated() -> None:
    s = bytearray(_stream(KEY))
    # frame 1 (PAGES) starts after the preamble (12) and the HEADER frame
    head = 12 + 16 + 8 + 16 + 16
    kind, flags, seq, length, _crc = (int.from_bytes(s[head + o : head + o + n], "little") for o, n in ((0, 2), (2, 2), (4, 4), (8, 4), (12, 4)))
    assert (kind, seq) == (2, 1)
    table = 8 + 12 * 2  # round, count, 2 gpas, 2 page CRCs
    data = head + 16 + table
    s[data + 100] ^= 0xFF  # a byte of page 0 changed ...
    # ... and its page CRC and the frame CRC recomputed, as an impostor would
    s[head + 16 + 24 : head + 16 + 28] = crc32c(bytes(s[data : data + PS])).to_bytes(4, "little")
    crc = crc32c(bytes(s[head + 16 : head + 16 + table]), crc32c(bytes(s[head : head + 12])))
    s[head + 12 : head + 16] = crc.to_bytes(4, "little")
    with pytest.raises(StreamError, match="tag of frame at offset 0x44 .seq 1. does not match") as ei:
        _decode(bytes(s), KEY)
    assert ei.value.reason == "unauthenticated" and ei.value.errno == errno.EACCES


def test_unkeyed_stream_to_a_keyed_receiver_and_the_reverse_are_refused() -> None:
    with pytest.raises(StreamError, match="carries no tags, and this receiver requires the shared key") as ei:
        _decode(_stream(None), KEY)
    assert ei.value.reason == "unauthenticated"
    with pytest.raises(StreamError, match="carries tags, and this receiver has no key") as ei:
        _decode(_stream(KEY), None)
    assert ei.value.reason == "mismatch"


def test_frames_of_another_session_are_refused() -> None:
    with pytest.raises(StreamError, match="seq 0. does not match"):
        _decode(_stream(KEY), bytes(32))


# -- TCP with `dmarw incoming` as its own process ------------------------------------------

def incoming(key_file: Path) -> Incoming:
    return Incoming(key_file, timeout=30, wait=WAIT)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    p = tmp_path / "key"
    p.write_bytes(KEY)
    return p


def small(to: str, **kw: object) -> Config:
    base: dict[str, object] = {"ram": 8 << 20, "seed": 3, "ops": 2000, "plain_copy": False, "to": to, "key": KEY, "timeout": WAIT}
    base.update(kw)
    return Config(**base)  # type: ignore[arg-type]


def test_migration_over_tcp_to_a_separate_incoming_process(key_file: Path) -> None:
    inc = incoming(key_file)
    o = run(small(inc.addr, plain_copy=True))
    rc, err = inc.finish()
    assert o.ok and o.report.dest_pages == o.report.pages_sent
    assert o.plain is not None and o.plain.bytes == 8 << 20
    assert rc == 0, err
    assert "source authenticated" in err and "incoming: done" in err


def test_wrong_key_is_refused_before_any_ram_byte(key_file: Path) -> None:
    inc = incoming(key_file)
    with pytest.raises(MigrationFailed, match="does not hold the shared key") as ei:
        run(small(inc.addr, key=bytes(32)))
    assert ei.value.errno == errno.EACCES
    rc, err = inc.finish()
    assert rc == 3 and "refused" in err and "stream complete" not in err


def test_unreachable_destination_is_reported_quickly() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(MigrationFailed, match=f"127.0.0.1:{port} unreachable") as ei:
        run(small(f"127.0.0.1:{port}"))
    assert ei.value.errno == errno.ECONNREFUSED
    assert time.monotonic() - t0 < WAIT


def test_destination_killed_mid_stream_cancels_and_the_guest_runs_on_then_a_second_attempt_succeeds(key_file: Path) -> None:
    cfg = small("", ram=16 << 20)
    guest = SourceGuest(cfg.ram, cfg.seed, cfg.pinned)
    writers = build_writers(guest, cfg)
    writers.start()
    try:
        inc = incoming(key_file)
        frames = [0]

        def kill_after_a_few_frames(_n: int, _pages: int) -> None:
            frames[0] += 1
            if frames[0] == 4:
                os.kill(inc.proc.pid, signal.SIGKILL)

        cfg.to = inc.addr
        with pytest.raises(MigrationFailed, match="destination lost, migration cancelled"):
            attempt(guest, writers, cfg, on_sent=kill_after_a_few_frames)
        rc, _ = inc.finish()
        assert rc == -signal.SIGKILL
        # the source guest is alive: its writers still write when granted
        before = sum(writers.done().values())
        writers.force(8)
        assert sum(writers.done().values()) >= before + 16
        inc2 = incoming(key_file)
        cfg.to = inc2.addr
        o = attempt(guest, writers, cfg)
        rc2, err2 = inc2.finish()
        assert o.ok and rc2 == 0, err2
    finally:
        writers.stop()
        guest.close()


def test_destination_killed_in_the_final_round_resumes_the_source_guest(key_file: Path) -> None:
    cfg = small("", ram=8 << 20)
    guest = SourceGuest(cfg.ram, cfg.seed, cfg.pinned)
    writers = build_writers(guest, cfg)
    writers.start()
    try:
        inc = incoming(key_file)
        cfg.to = inc.addr

        def on_start(rnd: int, _pages: int) -> None:
            if writers.paused_once:  # the final round: the guest is paused now
                os.kill(inc.proc.pid, signal.SIGKILL)
                inc.proc.wait(WAIT)

        with pytest.raises(MigrationFailed):
            attempt(guest, writers, cfg, on_round_start=on_start)
        inc.finish()
        before = sum(writers.done().values())
        writers.force(4)  # would block forever if the writers were still paused
        assert sum(writers.done().values()) >= before + 8
    finally:
        writers.stop()
        guest.close()


# -- a source that dies or lies: the destination refuses and resumes nothing -----------------
def _fake_source(addr: str, key: bytes, frames: list[bytes], layout: tuple[tuple[int, int], ...] = LAYOUT, kill: bool = False) -> None:
    """Handshake, SPEC, then ``frames`` (built with the session key), then close/kill."""
    host, port = addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=WAIT)
    ch = Channel(sock, "destination")
    session = handshake_source(ch, key)
    ch.send(control.jsonmsg(control.SPEC, {"page_size": PS, "layout": [list(r) for r in layout]}))
    ch.recv(control.REDY)
    for f in _build(session, frames):
        sock.sendall(f)
    if kill:
        os._exit(0)  # the process ends without closing anything itself
    sock.shutdown(socket.SHUT_WR)
    try:
        ch.recv()
    except OSError:
        pass
    sock.close()


def _build(session: bytes, what: list[bytes]) -> list[bytes]:
    enc = Encoder(PS, LAYOUT, session)
    out: list[bytes] = [b"".join(bytes(p) for p in enc.start())]
    for w in what:
        if w == b"pages":
            out.append(b"".join(bytes(p) for p in enc.pages_frame([0], bytes(PS))))
        elif w == b"flip":  # one bit flipped in flight: the CRC catches it
            f = bytearray(b"".join(bytes(p) for p in enc.pages_frame([PS], bytes(PS))))
            f[28] ^= 1  # in the page table (a gpa byte)
            out.append(bytes(f))
        elif w == b"round":
            out.append(b"".join(bytes(p) for p in enc.end_round()))
        elif w == b"end":
            out.append(b"".join(bytes(p) for p in enc.end()))
    return out


@pytest.mark.parametrize(
    ("case", "frames", "layout", "expect"),
    [
        ("truncated", [b"pages", b"pages"], LAYOUT, "truncated"),
        ("corrupt", [b"pages", b"flip"], LAYOUT, "checksum of frame"),
        ("mismatch", [b"pages", b"round", b"end"], ((0, 2 << 20),), "differs from the destination's"),
    ],
)
def test_incoming_refuses_bad_streams_and_resumes_nothing(
    key_file: Path, case: str, frames: list[bytes], layout: tuple[tuple[int, int], ...], expect: str
) -> None:
    inc = incoming(key_file)
    # mismatch: the SPEC says 2 MiB, the stream's HEADER 1 MiB
    _fake_source(inc.addr, KEY, frames, layout)
    rc, err = inc.finish()
    assert rc == 3, err
    assert expect in err and "nothing resumed" in err
    assert "stream complete" not in err


def test_source_killed_mid_stream_the_destination_says_so(key_file: Path) -> None:
    inc = incoming(key_file)
    pid = os.fork()
    if pid == 0:  # the source process: a few frames, then it dies
        try:
            _fake_source(inc.addr, KEY, [b"pages", b"pages"], kill=True)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    rc, err = inc.finish()
    assert rc == 3 and "truncated" in err and "nothing resumed" in err


def test_cli_bad_input_is_one_line_and_fast(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"x" * 8)
    cases = [
        (["migrate", "--replay", "--ram", "1T"], "more than this machine can hold"),
        (["migrate", "--ram", "1T"], "--ram 0x10000000000"),  # a running guest where KVM is usable
        (["migrate", "--replay", "--ram", "12G"], "more than this machine can hold"),
        (["migrate", "--ops", "0"], "--ops 0 must be >= 1"),
        (["migrate", "--to", "127.0.0.1:1"], "--to needs --key-file"),
        (["migrate", "--to", "nowhere", "--key-file", str(short)], "8 bytes, a shared key must be 16"),
        (["incoming", "--listen", "127.0.0.1", "--key-file", str(tmp_path / "missing")], "No such file"),
    ]
    for argv, msg in cases:
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "dmarw.cli", *argv], capture_output=True, text=True, timeout=WAIT)
        took = time.monotonic() - t0
        assert p.returncode != 0 and p.stdout == "", (argv, p.stdout)
        assert msg in p.stderr and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, (argv, p.stderr)
        assert took < WAIT
    with pytest.raises(DmaError, match="is not HOST:PORT"):
        small("nowhere").check()
