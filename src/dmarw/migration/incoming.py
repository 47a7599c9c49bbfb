"""The destination end of a migration between hosts: ``dmarw incoming --listen HOST:PORT``.

One migration per run, as QEMU's ``-incoming``: listen, accept one source, run the key
handshake (:func:`.channel.handshake_dest`: a peer without the key is refused before it
can send a byte of guest RAM), receive ``SPEC`` (the RAM layout and what runs there),
allocate that RAM (refused up front when the machine has not enough available memory),
say ``REDY``, receive the keyed stream, reply ``DONE`` or ``FAIL``, then send every page's
digest (``HASH``).  When the spec names a guest, it is restored from the stream's state and
run to its end here, and its result goes back in ``STAT``; a stream that is not complete
never resumes anything.

Every wait has a timeout, so a source that vanishes without closing its socket still ends
the run.  One thread; no locks.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable
from typing import Any

from ..errors import DmaError
from . import control
from .channel import Channel, handshake_dest, tune
from .dest import Destination
from .stream import Layout, StreamError, check_layout


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → (host, port); EINVAL naming the text."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise DmaError(errno.EINVAL, f"{what} {text!r} is not HOST:PORT (e.g. 127.0.0.1:4444)")
    return host, int(port)


def resolve(host: str, port: int, what: str) -> None:
    """Look ``host`` up now, so that a name that does not resolve is refused before any work:
    ``DmaError`` naming it (getaddrinfo's codes are not errnos: a temporary failure is
    ``EAGAIN``, any other ``ENXIO``)."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        err = errno.EAGAIN if e.errno == socket.EAI_AGAIN else errno.ENXIO
        raise DmaError(err, f"{what}: cannot resolve host {host} ({e.strerror})") from None


def mem_available() -> int:
    """Bytes the machine can still give without swapping (``MemAvailable``)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def check_ram(ram: int, what: str = "--ram", copies: int = 1) -> None:
    """Refuse guest RAM the machine cannot hold (``copies`` of it at once): ``ENOMEM``
    naming the sizes."""
    avail = mem_available()
    if ram * copies > avail * 3 // 4:
        twice = f" x {copies} copies (source and destination)" if copies > 1 else ""
        raise DmaError(
            errno.ENOMEM,
            f"{what} ({ram / (1 << 30):.1f} GiB){twice} is more than this machine can hold: "
            f"{avail / (1 << 30):.1f} GiB available, at most 3/4 of it may be guest RAM",
        )


def read_key(path: str) -> bytes:
    """The shared key file's bytes, used as they are (at least 16)."""
    try:
        with open(path, "rb") as f:
            key = f.read(control.MAX_KEY + 1)
    except OSError as e:
        raise DmaError(e.errno or errno.ENOENT, f"--key-file {path}: {e.strerror}") from None
    return control.check_key(key, f"--key-file {path}")


def listen(host: str, port: int) -> socket.socket:
    resolve(host, port, f"--listen {host}:{port}")
    try:
        srv = socket.create_server((host, port), reuse_port=False)
    except OSError as e:
        raise DmaError(e.errno or errno.EADDRINUSE, f"--listen {host}:{port}: {e.strerror}") from None
    return srv


def serve_connection(
    sock: socket.socket,
    key: bytes | None,
    *,
    log: Callable[[str], None] = lambda _m: None,
) -> int:
    """One incoming migration on a connected socket; the exit code (0 only when complete).

    With a guest in the spec, its VM is built before ``REDY`` and the stream fills its RAM;
    only a complete stream is restored, and only then does the guest run (after ``HASH``)."""
    ch = Channel(sock, "source")
    mac_key = None
    machine: Any = None
    try:
        if key is not None:
            mac_key = handshake_dest(ch, key)  # an impostor is refused here: no RAM yet
            log("source authenticated")
        _, raw = ch.recv(control.SPEC)
        spec = control.parse_json(control.SPEC, raw)
        page_size, layout = _spec_layout(spec)
        check_ram(sum(s for _, s in layout), "incoming guest RAM")
        guest = spec.get("guest")
        if isinstance(guest, dict):
            from .guest import DestMachine, GuestSpec

            gspec = GuestSpec.from_json(guest)
            if ((0, gspec.ram),) != layout:
                raise DmaError(errno.EINVAL, f"guest of {gspec.ram:#x} bytes does not match the layout {layout}")
            machine = DestMachine(gspec)
            log(f"guest VM ready: {gspec.ram >> 20} MiB, seed {gspec.seed}, {gspec.commands} commands")
    except (DmaError, OSError) as e:
        log(f"refused: {e}")
        try:
            ch.send(control.fail(str(e)))
        except OSError:
            pass
        if machine is not None:
            machine.close()
        return 1
    dest = Destination(page_size, layout, mac_key, ram=machine.ram if machine is not None else None)
    dest.on_round = lambda rnd: ch.send(control.rack(rnd, dest.resend_bitmap()))  # the source stops the guest after the last
    try:
        try:
            ch.send(control.encode(control.REDY))
            t0, c0 = time.perf_counter(), time.process_time()
            dest.receive(sock, ch.reader.take_rest())
            recv_s, recv_cpu = time.perf_counter() - t0, time.process_time() - c0
        except (StreamError, OSError) as e:
            log(f"migration failed, nothing resumed: {e}")
            try:
                ch.send(control.fail(str(e)))
            except OSError:
                pass
            return 1
        try:
            stat: dict[str, Any] = {"receive_seconds": recv_s, "receive_cpu_seconds": recv_cpu}
            if machine is not None:
                stat.update(machine.restore(dest.states))
            ch.send(control.done(dest.pages_applied, dest.rounds))
            ch.send(control.encode(control.HASH, dest.digests()))  # at switchover, before it runs
            log(f"stream complete: {dest.pages_applied} pages in {dest.rounds} rounds, {recv_s:.3f} s")
            if machine is not None:
                stat.update(machine.run(float(spec.get("guest_timeout", 300.0))))
                if "error" in stat:
                    log(f"guest resumed but did not finish: {stat['error']}")
                else:
                    log(f"guest resumed and ran to its end: checksum {stat['checksum']:#018x}")
            ch.send(control.jsonmsg(control.STAT, stat))
        except (DmaError, OSError) as e:
            log(f"after the stream: {e}")
            try:
                ch.send(control.fail(str(e)))
            except OSError:
                pass
            return 1
    finally:
        dest.close()
        if machine is not None:
            machine.close()
    return 0


def _spec_layout(spec: dict[str, Any]) -> tuple[int, Layout]:
    try:
        page_size = int(spec["page_size"])
        layout = tuple((int(g), int(s)) for g, s in spec["layout"])
    except (KeyError, TypeError, ValueError) as e:
        raise control.ControlError(errno.EBADMSG, f"SPEC without a valid page size and layout: {e}") from None
    check_layout(page_size, layout)
    return page_size, layout


def serve(listen_on: str, key: bytes, *, timeout: float, log: Callable[[str], None]) -> int:
    """``dmarw incoming``: accept one source on ``listen_on`` and serve it."""
    host, port = parse_hostport(listen_on, "--listen")
    srv = listen(host, port)
    with srv:
        h, p = srv.getsockname()[:2]
        log(f"listening on {h}:{p}")
        srv.settimeout(timeout)
        try:
            sock, peer = srv.accept()
        except TimeoutError:
            raise DmaError(errno.ETIMEDOUT, f"no source connected to {h}:{p} within {timeout:g} s") from None
    with sock:
        tune(sock)
        sock.settimeout(timeout)
        log(f"connection from {peer[0]}:{peer[1]}")
        return serve_connection(sock, key, log=log)
