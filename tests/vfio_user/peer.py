"""The vfio-user peer: libvfio-user built once per test session in a scratch folder.

The source is ``<repo>/../shared/peers/libvfio-user`` (an unmodified copy that nobody on this
project wrote), or the folder named by ``$DMARW_PEER_LIBVFIO_USER``.  It is copied to
``$DMARW_PEER_CACHE`` (default ``/tmp/dmarw-peer``), under a folder keyed by a hash of the
source's files, and built there with meson + ninja; a later session with the same source
finds the build and reuses it.  A file lock serialises concurrent builders.

``peer_build`` (session fixture) gives a :class:`PeerBuild`.  Where the source or the build
tools (meson, ninja, pkg-config, json-c, cmocka; ``make peer-deps`` installs them) truly
cannot be had, it skips, saying which is missing; a build that fails with the tools present
is a test failure, not a skip.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE_ENV = "DMARW_PEER_LIBVFIO_USER"
CACHE_ENV = "DMARW_PEER_CACHE"
BUILD_TIMEOUT = 600.0
TOOLS = ("meson", "ninja", "pkg-config")
PKG_MODULES = ("json-c", "cmocka")


class PeerUnavailable(Exception):
    """The peer cannot be had here (no source, or no build tools): its tests skip."""


@dataclass(frozen=True)
class PeerBuild:
    """A built libvfio-user: its sample programs and the source key it was built from."""

    root: Path
    key: str

    @property
    def server(self) -> Path:
        return self.root / "build" / "samples" / "server"

    @property
    def client(self) -> Path:
        return self.root / "build" / "samples" / "client"


def _candidates() -> list[Path]:
    """``<repo>/../shared/peers/libvfio-user``; from a git worktree, also beside the main one."""
    found = [REPO.parent / "shared" / "peers" / "libvfio-user"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        common = subprocess.run(
            ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
            cwd=REPO, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        if common:
            found.append(Path(common).parent.parent / "shared" / "peers" / "libvfio-user")
    return found


def peer_source() -> Path:
    """The libvfio-user source folder, or :class:`PeerUnavailable` saying where it looked."""
    env = os.environ.get(SOURCE_ENV)
    tried = [Path(env)] if env else _candidates()
    for src in tried:
        if (src / "meson.build").is_file() and (src / "samples" / "client.c").is_file():
            return src
    where = ", ".join(map(str, tried))
    how = f"from ${SOURCE_ENV}" if env else f"set ${SOURCE_ENV} to override"
    raise PeerUnavailable(f"libvfio-user source not found at {where} ({how})")


def source_key(src: Path) -> str:
    """A hash of every file's relative path and contents (the copy carries no git history)."""
    h = hashlib.sha256()
    for path in sorted(p for p in src.rglob("*") if p.is_file() and ".git" not in p.parts):
        h.update(str(path.relative_to(src)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def missing_tools() -> list[str]:
    """The build tools absent here (empty when the peer can be built)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if "pkg-config" not in missing:
        for mod in PKG_MODULES:
            ok = subprocess.run(["pkg-config", "--exists", mod], capture_output=True).returncode
            if ok != 0:
                missing.append(f"{mod} (pkg-config)")
    else:
        missing.extend(PKG_MODULES)
    return missing


def _writable(tree: Path) -> None:
    for p in [tree, *tree.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def build(src: Path | None = None) -> PeerBuild:
    """Build (or find already built) the peer; :class:`PeerUnavailable` if it cannot be had."""
    src = src if src is not None else peer_source()
    missing = missing_tools()
    if missing:
        raise PeerUnavailable(
            "libvfio-user build tools missing: " + ", ".join(missing) + " (run `make peer-deps`)"
        )
    key = source_key(src)
    cache = Path(os.environ.get(CACHE_ENV, "/tmp/dmarw-peer"))
    cache.mkdir(parents=True, exist_ok=True)
    done = PeerBuild(cache / f"libvfio-user-{key}", key)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.server.is_file() and done.client.is_file():
            return done
        work = cache / f".build-{key}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work, symlinks=True)
        _writable(work)
        for cmd in (["meson", "setup", "build"], ["ninja", "-C", "build"]):
            r = subprocess.run(
                cmd, cwd=work, capture_output=True, text=True, timeout=BUILD_TIMEOUT
            )
            if r.returncode != 0:
                raise RuntimeError(
                    f"libvfio-user: {' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}"
                    f"\n{r.stderr[-3000:]}"
                )
        shutil.rmtree(done.root, ignore_errors=True)
        work.rename(done.root)
    return done


@pytest.fixture(scope="session")
def peer_build() -> PeerBuild:
    """The built peer; skips, saying why, where its source or build tools cannot be had."""
    try:
        return build()
    except PeerUnavailable as e:
        pytest.skip(f"PEER UNAVAILABLE: {e}")


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Wait until the UNIX socket ``path`` exists (or the server's process died).

    Existence, not a probing connect: libvfio-user's sample server takes the first
    connection as its one client, so a probe would use it up.  Clients retry a refused
    connect for the moment between bind and listen.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {path}")
        if path.exists():
            return
        time.sleep(0.02)
    raise TimeoutError(f"no server socket at {path} after {timeout:.0f} s")


@contextlib.contextmanager
def running(cmd: list[str], *, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` in its own process group, output to ``log``; killed (group) on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

