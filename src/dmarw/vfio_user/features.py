"""DEVICE_FEATURE: migration (v2 state machine) and DMA logging, as the server answers them.

Supported: ``MIGRATION`` (GET, when the device has migration flags), ``MIG_DEVICE_STATE``
(GET/SET, idem), ``DMA_LOGGING_START``/``STOP`` (SET) and ``DMA_LOGGING_REPORT`` (GET).
PROBE answers whether the GET/SET it names is supported (``EINVAL`` if not).  Any other
feature is ``ENOTTY``, as the kernel answers an unknown ``VFIO_DEVICE_FEATURE``.

Replies: SET and PROBE echo the request payload byte for byte (the sample client compares
them), except that DMA_LOGGING_START reports the page size chosen; GET appends the data
and sets ``argsz``.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

from ..errors import fail, rng
from . import protocol as p

if TYPE_CHECKING:
    from .session import Session

_GET, _SET = p.FEATURE_GET, p.FEATURE_SET


def _supported(session: Session) -> dict[int, int]:
    """feature index -> the GET/SET bits it supports."""
    out = {
        p.FEATURE_DMA_LOGGING_START: _SET,
        p.FEATURE_DMA_LOGGING_STOP: _SET,
        p.FEATURE_DMA_LOGGING_REPORT: _GET,
    }
    if session.device.migration_flags & p.MIGRATION_STOP_COPY:
        out[p.FEATURE_MIGRATION] = _GET
        out[p.FEATURE_MIG_DEVICE_STATE] = _GET | _SET
    return out


def handle_feature(session: Session, f: p.Feature, body: bytes) -> tuple[bytes, list[int]]:
    supported = _supported(session)
    idx = f.feature
    if idx not in supported:
        raise fail(errno.ENOTTY, f"DEVICE_FEATURE {idx}: not supported")
    asked = f.flags & (_GET | _SET)
    if asked & ~supported[idx]:
        raise fail(errno.EINVAL, f"DEVICE_FEATURE {idx}: {'GET' if asked & _GET else 'SET'} not supported")
    if f.probe:
        return body, []
    mem = session.mem
    assert mem is not None
    dev = session.device
    if idx == p.FEATURE_MIGRATION:
        return _get_reply(f, struct.pack("<Q", dev.migration_flags & (p.MIGRATION_STOP_COPY | p.MIGRATION_P2P | p.MIGRATION_PRE_COPY)))
    if idx == p.FEATURE_MIG_DEVICE_STATE:
        if f.get:
            return _get_reply(f, struct.pack("<II", int(dev.migration.state), 0xFFFFFFFF))
        state, _fd = f.mig_state()
        dev.migration.set(state)
        return body, []
    if idx == p.FEATURE_DMA_LOGGING_START:
        page_size, ranges = f.logging_control()
        _check_ranges(ranges)
        mem.logging_start(page_size)
        return body, []
    if idx == p.FEATURE_DMA_LOGGING_STOP:
        if not mem.logging:
            raise fail(errno.EINVAL, "DMA_LOGGING_STOP: logging is not started")
        mem.logging_stop()
        return body, []
    # DMA_LOGGING_REPORT
    iova, length, page_size = f.logging_report()
    if not mem.logging:
        raise fail(errno.EINVAL, f"DMA_LOGGING_REPORT {rng(iova, length)}: logging is not started")
    if page_size <= 0 or page_size & (page_size - 1):
        raise fail(errno.EINVAL, f"DMA_LOGGING_REPORT {rng(iova, length)}: page size {page_size:#x} is not a power of two")
    if length == 0 or iova + length > 1 << 64:
        raise fail(errno.EINVAL, f"DMA_LOGGING_REPORT {rng(iova, length)}: empty or wraps")
    nbytes = (-(-length // page_size) + 63) // 64 * 8
    need = 8 + 24 + nbytes
    if need > session.server.max_msg_size - p.HEADER_SIZE:
        raise fail(errno.E2BIG, f"DMA_LOGGING_REPORT {rng(iova, length)}: a {nbytes}-byte bitmap exceeds the message size")
    head = struct.pack("<II", need, f.flags) + f.data[:24]
    if f.argsz < need:  # too small to hold it: say how much, clear nothing
        return head, []
    return head + mem.take_bitmap(iova, length, page_size), []


def _get_reply(f: p.Feature, data: bytes) -> tuple[bytes, list[int]]:
    need = 8 + len(data)
    if f.argsz < need:
        return struct.pack("<II", need, f.flags), []
    return struct.pack("<II", need, f.flags) + data, []


def _check_ranges(ranges: list[p.LoggingRange]) -> None:
    spans = sorted((r.iova, r.iova + r.length) for r in ranges)
    for (a0, a1), (b0, _b1) in zip(spans, spans[1:], strict=False):
        if b0 < a1:
            raise fail(errno.EINVAL, f"DMA_LOGGING_START: ranges {rng(a0, a1 - a0)} and {b0:#x} overlap")
