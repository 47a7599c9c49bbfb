"""``dmarw`` as a user runs it (``python -m dmarw`` in a subprocess): every mistake is one
line on stderr, no traceback, a non-zero exit, and no output file; each case fails before
any measuring.  Ctrl-C on a real run ends it with one line, exit 130, and nothing left."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmarw import __version__
from terminal import sigint_default


def dmarw(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
          pre: str = "") -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "dmarw", *args]
    if pre:  # run a line of Python first (e.g. to hide the native core), then the CLI
        cmd = [sys.executable, "-c", f"{pre}; import sys, runpy; sys.argv = ['dmarw', *{list(args)!r}]; "
               "runpy.run_module('dmarw', run_name='__main__')"]
    full = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full, cwd=cwd, timeout=60)


def one_line_error(p: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code, (p.returncode, p.stderr)
    assert len(lines) == 1 and lines[0].startswith("dmarw: error: "), p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    t = tmp_path / "ok.trace"
    t.write_text("dmarw-trace 1\nram_size 0x10000\nr 0x1000 8\nw 0x2000 4\n")
    return t


CASES = [
    ("missing trace", ["reproduce", "--trace", "/nonexistent/t.trace"], 1, ["/nonexistent/t.trace"]),
    ("trace is a folder", ["reproduce", "--trace", "/tmp"], 1, ["/tmp", "folder"]),
    ("json into a missing folder", ["reproduce", "--json", "{tmp}/no/r.json"], 1, ["no such folder"]),
    ("plot into a missing folder", ["reproduce", "--plot", "{tmp}/no/r.png"], 1, ["--plot"]),
    ("json is a folder", ["reproduce", "--json", "{tmp}"], 1, ["folder"]),
    ("empty path list", ["reproduce", "--paths", ",,"], 2, ["names no path"]),
    ("unknown path", ["reproduce", "--paths", "kvm,nope"], 2, ["nope"]),
    ("zero VMs", ["reproduce", "--vms", "0"], 2, ["1..16"]),
    ("too few rounds", ["reproduce", "--rounds", "2"], 2, ["at least 4"]),
    ("zero ops", ["reproduce", "--ops", "0"], 2, ["positive"]),
    ("ops past the machine", ["reproduce", "--ops", "40000000", "--vms", "1,16"], 1, ["at most 80,000,000"]),
    ("ops not a number", ["bench", "--ops", "lots"], 2, ["lots"]),
    ("bench trace missing", ["bench", "--trace", "/nonexistent"], 1, ["/nonexistent"]),
    ("bench json folder missing", ["bench", "--json", "{tmp}/no/b.json"], 1, ["no such folder"]),
    ("workload into a missing folder", ["workload", "--ops", "10", "-o", "{tmp}/no/w.trace"], 1, ["no such folder"]),
    ("workload huge RAM", ["workload", "--ops", "10", "--ram-size", str(1 << 40), "-o", "{tmp}/w.trace"], 1,
     ["0x10000000000"]),
    ("unknown subcommand", ["frobnicate"], 2, ["frobnicate"]),
    ("no subcommand", [], 2, []),
]


@pytest.mark.parametrize(("name", "args", "code", "needles"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(tmp_path: Path, name: str, args: list[str], code: int, needles: list[str]) -> None:
    before = set(tmp_path.rglob("*"))
    p = dmarw(*(a.replace("{tmp}", str(tmp_path)) for a in args), cwd=tmp_path)
    one_line_error(p, code, *needles)
    assert set(tmp_path.rglob("*")) == before  # no output file


BAD_TRACES = [
    ("hello", "hello\n", "ok.trace:1: not a dmarw-trace"),
    ("unknown header line", "dmarw-trace 1\nx 0x1000 8\n", ":2: unknown line 'x 0x1000 8'"),
    ("junk word", "dmarw-trace 1\nr 0x0 8\nhello\n", ":3: unknown line 'hello' after the records"),
    ("bad record", "dmarw-trace 1\nr 0x1000\n", ":2: bad record"),
    ("header only", "dmarw-trace 1\nprofile glmark2\nram_size 0x10000\n", "no records"),
    ("empty", "", "empty file"),
    ("outside RAM", "dmarw-trace 1\nram_size 0x4000\nr 0x1000 8\nw 0x3ff8 16\n", ":4: record 0x3ff8+0x10 ends past"),
    ("huge RAM", "dmarw-trace 1\nram_size 0x10000000000\nr 0x0 8\n", "ram_size 0x10000000000"),
    ("larger than the lab's buffer", "dmarw-trace 1\nr 0x0 1000000\n", ":2: record 0x0+0xf4240 is larger"),
    ("zero size", "dmarw-trace 1\nr 0x0 0\n", "out of range"),
    ("wrong ops count", "dmarw-trace 1\nops 3\nr 0x0 8\n", "header says 3 ops"),
]


@pytest.mark.parametrize(("name", "text", "needle"), BAD_TRACES, ids=[c[0] for c in BAD_TRACES])
def test_bad_trace_is_refused_with_its_line(tmp_path: Path, name: str, text: str, needle: str) -> None:
    t = tmp_path / "ok.trace"
    t.write_text(text)
    for cmd in (["reproduce", "--json", str(tmp_path / "r.json")], ["bench", "--json", str(tmp_path / "r.json")]):
        p = dmarw(*cmd, "--trace", str(t))
        one_line_error(p, 1, needle)
        assert not (tmp_path / "r.json").exists()


def test_binary_trace_is_refused(tmp_path: Path) -> None:
    t = tmp_path / "bin.trace"
    t.write_bytes(b"dmarw-trace 1\n\xff\xfe\x00garbage\n")
    one_line_error(dmarw("bench", "--trace", str(t)), 1, "bin.trace:2: binary content")
    t.write_bytes(b"dmarw-trace 1\nr 0x0 8\n\xc3\x28\n")
    one_line_error(dmarw("bench", "--trace", str(t)), 1, "bin.trace:3: binary content (not UTF-8")


def test_unknown_core_variable_is_one_line() -> None:
    for args in (["reproduce", "--no-sweep"], ["bench"], ["tour"]):
        one_line_error(dmarw(*args, env={"DMARW_CORE": "bogus"}), 1, "DMARW_CORE='bogus'")


def test_missing_native_core_when_asked_for() -> None:
    p = dmarw("bench", "--core", "native", pre="import sys; sys.modules['dmarw._native'] = None")
    one_line_error(p, 1, "native core")


def test_version_help_and_module_entry() -> None:
    p = dmarw("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"dmarw {__version__}"
    top = dmarw("--help")
    assert top.returncode == 0
    for cmd in ("reproduce", "bench", "workload", "demo", "tour"):
        assert cmd in top.stdout
        h = dmarw(cmd, "--help")
        assert h.returncode == 0 and "usage: dmarw " + cmd in h.stdout
        lines = h.stdout.splitlines()
        for i, ln in enumerate(lines):  # every flag has help: on its line or indented on the next
            if ln.startswith("  -"):
                nxt = lines[i + 1] if i + 1 < len(lines) else ""
                same = re.search(r"\S\s{2,}\S", ln.strip())
                assert same or (nxt.startswith(" " * 8) and not nxt.strip().startswith("-")), (cmd, ln)


def test_plot_writes_exactly_the_named_file(tmp_path: Path) -> None:
    from dmarw.lab.plot import plot

    doc_path = tmp_path / "r.json"
    p = dmarw("reproduce", "--ops", "400", "--rounds", "4", "--paths", "kvm,vfio-mutex,vfio-rwsem", "--vms", "1",
              "--no-sweep", "--core", "python", "--json", str(doc_path), "--plot", str(tmp_path / "out"),
              env={"COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    # laid out for 80 columns: no table line wider, no cell cut, tables (3) and (5) split in two
    table_lines = [ln for ln in p.stdout.splitlines() if ln[:1] in "┏┃┡│└"]
    assert table_lines and max(len(ln) for ln in table_lines) <= 80 and "…" not in p.stdout
    assert "— 2020 thread" in p.stdout and "— ours, this run" in p.stdout
    assert f"wrote {tmp_path / 'out'}" in " ".join(p.stdout.split())
    assert (tmp_path / "out").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "out.png").exists()
    import json

    plot(json.loads(doc_path.read_text()), str(tmp_path / "again.svg"))  # the name is kept whatever the suffix
    assert (tmp_path / "again.svg").read_bytes()[:4] == b"\x89PNG"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _shm_maps(pid: int) -> set[str]:
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return set()
    return {ln.split(None, 5)[5].removesuffix(" (deleted)") for ln in lines
            if len(ln.split(None, 5)) == 6 and ln.split(None, 5)[5].startswith("/dev/shm/")}


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_ends_a_real_run_cleanly(tmp_path: Path, sig: int, code: int, word: str) -> None:
    cmd = [sys.executable, "-m", "dmarw", "reproduce", "--no-sweep", "--ops", "300000", "--vms", "1", "--core", "python",
           "--json", str(tmp_path / "r.json")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    kids: list[int] = []
    shm: set[str] = set()
    deadline = time.monotonic() + 60
    while not kids and time.monotonic() < deadline and proc.poll() is None:  # wait for a VM process to exist
        kids = _children(proc.pid)
        for k in kids:
            shm |= _shm_maps(k)
        if not kids:
            try:  # a wait on the process itself, not a sleep
                proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
    assert kids, "no VM process started"
    shm |= _shm_maps(proc.pid)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip() == f"dmarw: {word}" and "Traceback" not in out
    for k in kids:  # no VM process left (gone, not even a zombie of ours)
        assert not Path(f"/proc/{k}").exists() or "Z" in Path(f"/proc/{k}/stat").read_text().split()[2]
    for path in shm:
        assert not os.path.exists(path), path
    assert not (tmp_path / "r.json").exists()
