"""vfio-user REGION_WRITE round trip: dmarw's server vs libvfio-user's sample server.

Both servers serve the sample device (``dmarw serve --device sample`` and libvfio-user's
``samples/server``, built from ``../shared/peers/libvfio-user`` by the test suite's peer
builder) in their own processes; the same client writes 4 bytes to BAR1 at 0x1000 (a page
outside the mmap areas, so every write is a message) and waits for the reply.  Two
clients, each used against both servers: ``dmarw.vfio_user.Client`` (replies matched
by id, the waiting caller reading its own) and a raw blocking loop (one sendall + one recv
per write, the least a client can add).  Rounds interleave the servers; medians per round trip and the ratio
dmarw / libvfio-user (target <= 2x).

Run: ``.venv/bin/python bench/vfio_user_rtt.py [--rounds N] [--writes N] [--json FILE]``
(~5 s).  Without the peer (no source or build tools) it says so and times dmarw alone.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

from rich.console import Console
from rich.table import Table

from dmarw.vfio_user import Client
from dmarw.vfio_user import protocol as P

REPO = Path(__file__).resolve().parent.parent
CLI = "import sys; from dmarw.cli import main; sys.exit(main())"
OFFSET, BAR1 = 0x1000, 1


def _peer_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dmarw_peer", REPO / "tests" / "vfio_user" / "peer.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _server(peer: ModuleType, cmd: list[str], sock: Path, log: Path) -> Iterator[None]:
    with peer.running(cmd, log=log) as proc:
        peer.wait_for_socket(sock, proc, timeout=30)
        yield


def _time_client(c: Client, n: int) -> float:
    data = b"\x01\x02\x03\x04"
    t0 = time.perf_counter_ns()
    for _ in range(n):
        c.region_write(BAR1, OFFSET, data)
    return (time.perf_counter_ns() - t0) / n


def _raw_rtt(path: Path, n: int) -> tuple[Callable[[], float], socket.socket]:
    """Connect, negotiate by hand; a function timing ``n`` blocking round trips, the socket."""
    deadline = time.monotonic() + 30
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            break
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    s.settimeout(30)
    hdr = struct.Struct("<HHIII")

    def call(mid: int, cmd: int, body: bytes) -> bytes:
        s.sendall(hdr.pack(mid, cmd, 16 + len(body), 0, 0) + body)
        head = _recv(s, 16)
        rid, rcmd, size, flags, err = hdr.unpack(head)
        rest = _recv(s, size - 16)
        if rid != mid or flags & P.F_ERROR:
            raise RuntimeError(f"raw client: reply {rid}/{mid} cmd {rcmd} error {err}")
        return rest

    ver, _ = P.Version(0, 2, {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20}).encode()
    call(0, P.Command.VERSION, ver)
    body = struct.pack("<QII", OFFSET, BAR1, 4) + b"\x01\x02\x03\x04"

    def run() -> float:
        t0 = time.perf_counter_ns()
        for i in range(n):
            call(1 + (i & 0x7FFF), P.Command.REGION_WRITE, body)
        return (time.perf_counter_ns() - t0) / n

    return run, s


def _recv(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed")
        buf += chunk
    return bytes(buf)


def measure(rounds: int, writes: int) -> tuple[dict[str, list[float]], str]:
    peer = _peer_module()
    servers: dict[str, Callable[[Path], list[str]]] = {
        "dmarw": lambda sock: [sys.executable, "-c", CLI, "serve", "--once", "--device", "sample", str(sock)],
    }
    note = ""
    try:
        build = peer.build()
        servers["libvfio-user"] = lambda sock: [str(build.server), str(sock)]
    except peer.PeerUnavailable as e:
        note = f"libvfio-user's sample server unavailable ({e}): dmarw measured alone"
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        clients: dict[str, Client] = {}
        raws: dict[str, Callable[[], float]] = {}
        for name, cmd in servers.items():
            for kind in ("client", "raw"):
                sock = Path(tmp) / f"{name}-{kind}.sock"
                stack.enter_context(_server(peer, cmd(sock), sock, Path(tmp) / f"{name}-{kind}.log"))
                if kind == "client":
                    clients[name] = stack.enter_context(Client(sock, timeout=30))
                else:
                    raws[name], raw_sock = _raw_rtt(sock, writes)
                    stack.callback(raw_sock.close)
        for name in servers:  # warm up
            _time_client(clients[name], 50)
            raws[name]()
        for r in range(rounds):
            print(f"\rround {r + 1}/{rounds}", end="", file=sys.stderr, flush=True)
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                samples.setdefault(f"client/{name}", []).append(_time_client(clients[name], writes))
                samples.setdefault(f"raw/{name}", []).append(raws[name]())
        print(file=sys.stderr)
    return samples, note


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--writes", type=int, default=300, help="round trips per sample (default 300)")
    ap.add_argument("--json", metavar="FILE", help="also write every sample to FILE")
    args = ap.parse_args(argv)
    if not 1 <= args.rounds <= 1000 or not 1 <= args.writes <= 100_000:
        ap.error("--rounds must be in 1..1000 and --writes in 1..100000")
    samples, note = measure(args.rounds, args.writes)
    console = Console(width=80)
    t = Table(title="REGION_WRITE round trip, 4 bytes (median us)")
    for col in ("client", "dmarw", "libvfio-user", "dmarw / libvfio-user"):
        t.add_column(col, justify="right")
    rows = []
    for kind in ("client", "raw"):
        d = statistics.median(samples[f"{kind}/dmarw"])
        lv = statistics.median(samples[f"{kind}/libvfio-user"]) if f"{kind}/libvfio-user" in samples else None
        rows.append({"client": kind, "dmarw_ns": d, "libvfio_user_ns": lv, "ratio": d / lv if lv else None})
        label = "dmarw Client" if kind == "client" else "raw blocking loop"
        t.add_row(label, f"{d / 1e3:,.1f}", "-" if lv is None else f"{lv / 1e3:,.1f}",
                  "-" if lv is None else f"{d / lv:,.2f}x")
    console.print(t)
    console.print(f"{args.rounds} rounds x {args.writes} writes per server and client, "
                  "servers interleaved; target dmarw / libvfio-user <= 2x.")
    if note:
        console.print(note)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "samples": samples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
