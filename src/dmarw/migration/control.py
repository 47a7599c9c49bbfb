"""The migration's control messages, beside the page stream, encoded without any I/O.

The page stream (:mod:`.stream`) flows one way, source to destination.  Everything else the
two ends say to each other is a control message, on the same connection:

    message   4s tag, u32 length, then ``length`` payload bytes (little-endian)

| tag    | from        | payload                                                        |
|--------|-------------|----------------------------------------------------------------|
| ``HELO`` | source      | 32-byte nonce ``ns``: opens the key handshake                  |
| ``CHAL`` | destination | 32-byte nonce ``nd`` + 32-byte proof ``P(key, "dest", ns, nd)`` |
| ``PROV`` | source      | 32-byte proof ``P(key, "source", ns, nd)``                     |
| ``SPEC`` | source      | JSON: page size, RAM layout, and what the destination runs     |
| ``REDY`` | destination | empty: RAM allocated, send the stream                          |
| ``RACK`` | destination | u32 round: that round is applied; then, if any, a bitmap (u64  |
|        |             | words) over the layout's pages: those whose copy failed its    |
|        |             | check (a LIVE frame) and that are still to be sent again       |
| ``DONE`` | destination | u64 pages applied, u32 rounds: the stream was complete         |
| ``FAIL`` | either      | UTF-8 text: why the migration is refused or cancelled          |
| ``HASH`` | destination | every page's digest, in layout order                           |
| ``STAT`` | destination | JSON: what the destination measured and the guest's result     |

The handshake is mutual challenge-response over a shared key (HMAC-SHA256): each side
proves it holds the key over a nonce the other chose, before a single stream byte is
accepted; a recorded handshake cannot be replayed because both nonces are fresh.  The
stream's per-frame MAC is keyed with :func:`session_key`, bound to both nonces, so frames of
another session are refused too.

:class:`Reader` is fed bytes and yields ``(tag, payload)``; it refuses an unknown tag or an
oversized length before waiting for the payload.  No locks: one thread per end.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import struct
from typing import Any

from ..errors import DmaError

HEADER = struct.Struct("<4sI")
NONCE = 32
PROOF = hashlib.sha256().digest_size
MIN_KEY = 16
MAX_KEY = 4096

HELO, CHAL, PROV, SPEC, REDY, RACK, DONE, FAIL, HASH, STAT = (
    b"HELO",
    b"CHAL",
    b"PROV",
    b"SPEC",
    b"REDY",
    b"RACK",
    b"DONE",
    b"FAIL",
    b"HASH",
    b"STAT",
)
# the largest payload of each tag (HASH: 20 bytes per page of the largest guest, 64 GiB)
LIMITS = {
    HELO: NONCE,
    CHAL: NONCE + PROOF,
    PROV: PROOF,
    SPEC: 1 << 16,
    REDY: 0,
    RACK: 4 + (64 << 30 >> 12) // 8,
    DONE: 12,
    FAIL: 1 << 16,
    HASH: 20 * (64 << 30 >> 12),
    STAT: 1 << 20,
}
_DONE = struct.Struct("<QI")
_RACK = struct.Struct("<I")


class ControlError(DmaError):
    """A control message that is malformed, unexpected, or fails the key check."""


def encode(tag: bytes, payload: bytes = b"") -> bytes:
    """One message; ``EINVAL`` for an unknown tag or a payload over its limit."""
    if tag not in LIMITS:
        raise ControlError(errno.EINVAL, f"unknown control tag {tag!r}")
    if len(payload) > LIMITS[tag]:
        raise ControlError(errno.EINVAL, f"{tag.decode()} payload of {len(payload):#x} bytes exceeds {LIMITS[tag]:#x}")
    return HEADER.pack(tag, len(payload)) + payload


def done(pages: int, rounds: int) -> bytes:
    return encode(DONE, _DONE.pack(pages, rounds))


def parse_done(payload: bytes) -> tuple[int, int]:
    if len(payload) != _DONE.size:
        raise ControlError(errno.EBADMSG, f"DONE payload of {len(payload)} bytes, expected {_DONE.size}")
    pages, rounds = _DONE.unpack(payload)
    return int(pages), int(rounds)


def rack(rnd: int, resend: bytes = b"") -> bytes:
    """Round ``rnd`` applied; ``resend``: the bitmap of pages to send again (empty: none),
    whole u64 words (``EINVAL`` otherwise: :func:`parse_rack` would refuse it)."""
    if len(resend) % 8:
        raise ControlError(errno.EINVAL, f"RACK bitmap of {len(resend)} bytes: not whole u64 words")
    return encode(RACK, _RACK.pack(rnd) + resend)


def parse_rack(payload: bytes) -> tuple[int, bytes]:
    if len(payload) < _RACK.size or (len(payload) - _RACK.size) % 8:
        raise ControlError(errno.EBADMSG, f"RACK payload of {len(payload)} bytes: a u32 round and whole u64 bitmap words")
    return int(_RACK.unpack_from(payload)[0]), payload[_RACK.size :]


def fail(text: str) -> bytes:
    return encode(FAIL, text.encode()[: LIMITS[FAIL]])


def jsonmsg(tag: bytes, obj: dict[str, Any]) -> bytes:
    return encode(tag, json.dumps(obj, sort_keys=True).encode())


def parse_json(tag: bytes, payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload.decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise ControlError(errno.EBADMSG, f"{tag.decode()} payload is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ControlError(errno.EBADMSG, f"{tag.decode()} payload is not a JSON object")
    return obj


class Reader:
    """Splits received bytes into messages; ``receive_data(b"")`` marks the end of input."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.eof = False

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            self.eof = True
        self._buf += data

    def next_message(self) -> tuple[bytes, bytes] | None:
        """The next whole message, or None until more bytes arrive."""
        if len(self._buf) < HEADER.size:
            return None
        tag, n = HEADER.unpack_from(self._buf)
        if tag not in LIMITS:
            raise ControlError(errno.EPROTO, f"unknown control message {bytes(tag)!r}: not a dmarw migration peer")
        if n > LIMITS[tag]:
            raise ControlError(errno.EBADMSG, f"{tag.decode()} claims {n:#x} payload bytes, limit {LIMITS[tag]:#x}")
        if len(self._buf) < HEADER.size + n:
            return None
        payload = bytes(self._buf[HEADER.size : HEADER.size + n])
        del self._buf[: HEADER.size + n]
        return bytes(tag), payload

    def pending(self) -> int:
        """Bytes received but not yet returned as a message (for the stream that follows)."""
        return len(self._buf)

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


# -- the key handshake ---------------------------------------------------------------------
def check_key(key: bytes, where: str = "key") -> bytes:
    if not MIN_KEY <= len(key) <= MAX_KEY:
        raise DmaError(errno.EINVAL, f"{where}: {len(key)} bytes, a shared key must be {MIN_KEY}..{MAX_KEY} bytes")
    return key


def nonce() -> bytes:
    return os.urandom(NONCE)


def proof(key: bytes, role: bytes, ns: bytes, nd: bytes) -> bytes:
    """What ``role`` (b"source" / b"dest") sends to show it holds ``key``."""
    return hmac.new(key, b"dmarw-migrate-" + role + b"\0" + ns + nd, "sha256").digest()


def session_key(key: bytes, ns: bytes, nd: bytes) -> bytes:
    """The stream MAC's key for the session opened with nonces ``ns``/``nd``."""
    return hmac.new(key, b"dmarw-migrate-stream\0" + ns + nd, "sha256").digest()


def verify(expected: bytes, got: bytes, who: str) -> None:
    if not hmac.compare_digest(expected, got):
        raise ControlError(errno.EACCES, f"{who} failed the key check: it does not hold the shared key")
