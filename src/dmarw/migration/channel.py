"""Control messages over a socket: the I/O half of :mod:`.control`, and the key handshake.

:class:`Channel` sends and receives whole control messages on a connected socket; a peer
that hangs up becomes ``DmaError(EPIPE)`` naming what was awaited.  Bytes the peer sent
after the last message (the start of the page stream) stay in :attr:`Channel.reader` for
the stream decoder.  :func:`handshake_source` / :func:`handshake_dest` run the mutual
challenge-response and return the session key.  :func:`tune` gives every migration socket
(and the plain copy's) the same deep buffers; :func:`fork_peer` forks a local peer process
on a socketpair.  One thread per channel; no locks.
"""

from __future__ import annotations

import errno
import multiprocessing
import signal
import socket
from collections.abc import Callable
from multiprocessing.process import BaseProcess

from ..errors import DmaError
from . import control

SOCKET_BUFFER = 4 << 20  # asked of SO_SNDBUF/SO_RCVBUF on every migration socket (capped by the kernel)


def tune(sock: socket.socket) -> None:
    """Give a migration socket (or a plain copy's) deep buffers, so a 4 MiB frame moves
    without the receiver waking up for every piece (best effort: the kernel caps the size),
    and on TCP turn Nagle off: the small control replies and the last frames of the
    stop-and-copy would otherwise wait for a delayed ACK (40-85 ms of downtime, measured)."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _peer_main(target: Callable[..., None], sock: socket.socket, other: socket.socket, args: tuple[object, ...]) -> None:
    other.close()  # the parent's end, inherited: kept open, EOF would never come
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it ends the stream
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not dmarw's handler: no second "terminated"
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    target(sock, *args)


def fork_peer(
    target: Callable[..., None], *args: object, name: str, pair: tuple[socket.socket, socket.socket] | None = None
) -> tuple[BaseProcess, socket.socket]:
    """A tuned socketpair (or ``pair``: this end, its end) and a forked process running
    ``target(its_end, *args)``; returns the process and this end.  SIGINT and SIGTERM stay blocked across the fork, so a Ctrl-C
    to the process group never lands in the child before it ignores SIGINT (the parent
    handles it once it is unblocked again).  Fork before starting any thread."""
    ours, theirs = pair or socket.socketpair()
    for sock in (ours, theirs):
        tune(sock)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        proc = multiprocessing.get_context("fork").Process(
            target=_peer_main, args=(target, theirs, ours, args), name=name, daemon=True
        )
        proc.start()
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return proc, ours


class Channel:
    def __init__(self, sock: socket.socket, peer: str = "peer") -> None:
        self.sock = sock
        self.peer = peer
        self.reader = control.Reader()

    def send(self, msg: bytes) -> None:
        try:
            self.sock.sendall(msg)
        except TimeoutError:
            raise DmaError(errno.ETIMEDOUT, f"{self.peer} stopped reading (timed out)") from None
        except OSError as e:
            raise DmaError(errno.EPIPE, f"{self.peer} hung up: {e.strerror or e}") from None

    def recv(self, want: bytes | tuple[bytes, ...] | None = None) -> tuple[bytes, bytes]:
        """The next message; a ``FAIL`` (when not wanted) raises its text as ``EPROTO``."""
        while True:
            msg = self.reader.next_message()
            if msg is not None:
                break
            if self.reader.eof:
                raise DmaError(errno.EPIPE, f"{self.peer} hung up (connection closed while awaiting {_names(want)})")
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise DmaError(errno.ETIMEDOUT, f"{self.peer} did not answer in time (awaiting {_names(want)})") from None
            except OSError as e:
                raise DmaError(errno.EPIPE, f"{self.peer} hung up: {e.strerror or e}") from None
            self.reader.receive_data(data)
        tag, payload = msg
        if want is not None:
            wanted = (want,) if isinstance(want, bytes) else want
            if tag == control.FAIL and control.FAIL not in wanted:
                raise DmaError(errno.EPROTO, f"{self.peer} refused: {payload.decode(errors='replace')}")
            if tag not in wanted:
                raise control.ControlError(errno.EPROTO, f"{self.peer} sent {tag.decode()} while {_names(want)} was expected")
        return tag, payload


def _names(want: bytes | tuple[bytes, ...] | None) -> str:
    if want is None:
        return "a message"
    wanted = (want,) if isinstance(want, bytes) else want
    return "/".join(w.decode() for w in wanted)


def handshake_source(ch: Channel, key: bytes) -> bytes:
    """The source's half: HELO, check the destination's proof, PROV; the session key."""
    ns = control.nonce()
    ch.send(control.encode(control.HELO, ns))
    _, p = ch.recv(control.CHAL)
    if len(p) != control.NONCE + control.PROOF:
        raise control.ControlError(errno.EBADMSG, f"CHAL of {len(p)} bytes")
    nd, theirs = p[: control.NONCE], p[control.NONCE :]
    try:
        control.verify(control.proof(key, b"dest", ns, nd), theirs, ch.peer)
    except control.ControlError as e:
        try:
            ch.send(control.fail("the source refused you: " + e.detail))
        except DmaError:
            pass
        raise
    ch.send(control.encode(control.PROV, control.proof(key, b"source", ns, nd)))
    return control.session_key(key, ns, nd)


def handshake_dest(ch: Channel, key: bytes) -> bytes:
    """The destination's half: answer HELO with a challenge, check PROV; the session key.

    A peer that fails is told so (``FAIL``) and the error raised; nothing of its stream has
    been read."""
    _, ns = ch.recv(control.HELO)
    if len(ns) != control.NONCE:
        raise control.ControlError(errno.EBADMSG, f"HELO of {len(ns)} bytes")
    nd = control.nonce()
    ch.send(control.encode(control.CHAL, nd + control.proof(key, b"dest", ns, nd)))
    _, theirs = ch.recv(control.PROV)
    try:
        control.verify(control.proof(key, b"source", ns, nd), theirs, ch.peer)
    except control.ControlError as e:
        try:
            ch.send(control.fail(str(e)))
        except DmaError:
            pass
        raise
    return control.session_key(key, ns, nd)
