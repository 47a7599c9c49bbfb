"""vfio-user wire protocol, sans-I/O: bytes and fds in, typed messages out, and back.

No sockets here (the ``h11`` habit): :class:`Connection` frames a byte stream into
:class:`Message` objects (header + body + the fds that came with it), :func:`decode_request`
/ :func:`decode_reply` turn a message into one of the typed dataclasses of
:mod:`.messages`, and :func:`encode_request` / :func:`encode_reply` do the reverse.  The
layout is QEMU's ``docs/interop/vfio-user.rst``: host-endian (little on every machine we
run on), packed, a 16-byte header before every message.

Every rule violation raises :class:`ProtocolError`, a :class:`~dmarw.DmaError` carrying the
errno to put in the error reply.  ``fatal`` errors break the framing (the stream cannot be
resynchronised): the server replies if it can and then drops the connection.

Fds: a :class:`Message` owns the fds received with its header; whoever consumes the message
keeps the ones it uses and closes the rest (:meth:`Message.close_fds`).  This package never
closes an fd itself.
"""

from __future__ import annotations

import errno
from typing import Any

from .messages import *  # noqa: F403
from .messages import (
    DeviceInfo,
    DmaAccess,
    DmaMap,
    DmaRead,
    DmaUnmap,
    DmaWrite,
    Empty,
    Feature,
    IoFdsReply,
    IoFdsRequest,
    IrqInfo,
    MigData,
    MigDataRead,
    MigDataWrite,
    Payload,
    RegionAccess,
    RegionInfo,
    RegionRead,
    RegionWrite,
    Reset,
    SetIrqs,
    Version,
    WriteMulti,
    WriteMultiDone,
    _atleast,
    _fds,
)
from .wire import *  # noqa: F403
from .wire import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_MSG_FDS,
    DEFAULT_PGSIZES,
    F_NO_REPLY,
    F_TYPE_COMMAND,
    F_TYPE_REPLY,
    VERSION_MAJOR,
    VERSION_MINOR,
    Command,
    Message,
    _name,
    _need,
    frame,
    perr,
)

REQUESTS: dict[int, type[Payload]] = {
    Command.VERSION: Version,
    Command.DMA_MAP: DmaMap,
    Command.DMA_UNMAP: DmaUnmap,
    Command.DEVICE_GET_INFO: DeviceInfo,
    Command.DEVICE_GET_REGION_INFO: RegionInfo,
    Command.DEVICE_GET_REGION_IO_FDS: IoFdsRequest,
    Command.DEVICE_GET_IRQ_INFO: IrqInfo,
    Command.DEVICE_SET_IRQS: SetIrqs,
    Command.REGION_READ: RegionRead,
    Command.REGION_WRITE: RegionWrite,
    Command.DMA_READ: DmaRead,
    Command.DMA_WRITE: DmaWrite,
    Command.DEVICE_RESET: Reset,
    Command.REGION_WRITE_MULTI: WriteMulti,
    Command.DEVICE_FEATURE: Feature,
    Command.MIG_DATA_READ: MigDataRead,
    Command.MIG_DATA_WRITE: MigDataWrite,
}


def decode_request(msg: Message) -> Payload:
    """The typed request in a command message (``ProtocolError`` on any violation)."""
    h = msg.header
    _need(not h.is_reply, f"msg {h.msg_id:#x}: a reply where a command was expected")
    cls = REQUESTS.get(h.cmd)
    if cls is None:
        raise perr(errno.ENOSYS, f"msg {h.msg_id:#x}: unknown {_name(h.cmd)}")
    return cls.decode(msg.body, msg.fds)


def decode_reply(msg: Message) -> Payload:
    """The typed reply in a reply message (an error reply raises its errno)."""
    h = msg.header
    _need(h.is_reply, f"msg {h.msg_id:#x}: a command where a reply was expected")
    if h.is_error:
        raise perr(h.error or errno.EINVAL, f"{_name(h.cmd)} (msg {h.msg_id:#x}) failed")
    body, fds = msg.body, msg.fds
    cmd = h.cmd
    if cmd == Command.DEVICE_GET_REGION_INFO:
        return RegionInfo.decode_reply(body, fds)
    if cmd == Command.DEVICE_GET_REGION_IO_FDS:
        return IoFdsReply.decode(body, fds)
    _fds(Payload, fds, 0, 0)
    if cmd in (Command.DMA_MAP, Command.DEVICE_SET_IRQS, Command.DEVICE_RESET, Command.MIG_DATA_WRITE) and not body:
        return Empty(cmd)
    if cmd == Command.VERSION:
        return Version.decode(body)
    if cmd == Command.DMA_UNMAP:
        return DmaUnmap.decode(body) if len(body) >= 24 else Empty(cmd)
    if cmd == Command.DEVICE_GET_INFO:
        return DeviceInfo.decode(body)
    if cmd == Command.DEVICE_GET_IRQ_INFO:
        return IrqInfo.decode(body)
    if cmd in (Command.REGION_READ, Command.REGION_WRITE):
        return RegionAccess.decode(body)
    if cmd in (Command.DMA_READ, Command.DMA_WRITE):
        return DmaAccess.decode(body)
    if cmd == Command.REGION_WRITE_MULTI:
        return WriteMultiDone.decode(body)
    if cmd == Command.DEVICE_FEATURE:
        _atleast(Feature, body, 8)
        argsz, flags = Feature.FMT.unpack_from(body)
        return Feature(flags, body[8:], argsz)
    if cmd == Command.MIG_DATA_READ:
        m = MigData.decode(body)
        _need(m.size <= len(m.data), f"MIG_DATA_READ reply: size {m.size} but {len(m.data)} data bytes")
        return MigData(m.size, m.data[: m.size], m.argsz)
    raise perr(errno.EINVAL, f"msg {h.msg_id:#x}: unexpected reply body for {_name(cmd)}")


def encode_request(msg_id: int, payload: Payload, *, no_reply: bool = False) -> tuple[bytes, list[int]]:
    """The command message for ``payload``: (bytes, fds)."""
    body, fds = payload.encode()
    return frame(msg_id, payload.CMD, body, flags=F_TYPE_COMMAND | (F_NO_REPLY if no_reply else 0)), fds


def encode_reply(msg_id: int, cmd: int, payload: Payload | bytes | None = None) -> tuple[bytes, list[int]]:
    """The reply message to command ``cmd``: (bytes, fds)."""
    fds: list[int] = []
    if payload is None:
        body = b""
    elif isinstance(payload, bytes | bytearray):
        body = bytes(payload)
    else:
        body, fds = payload.encode()
    return frame(msg_id, cmd, body, flags=F_TYPE_REPLY), fds


def negotiate(client: Version, server_caps: dict[str, Any]) -> tuple[Version, dict[str, Any]]:
    """The server's VERSION reply to ``client`` and the session's agreed limits.

    Major must be ours (``EINVAL``/``ENOTSUP`` otherwise); minor the lower of the two; the
    reply's capabilities are the server's (``twin_socket`` is not offered); the session
    uses the client's ``max_msg_fds`` / ``max_data_xfer_size`` for what it sends the client.
    """
    _need(client.major == VERSION_MAJOR, f"VERSION: major {client.major} is not {VERSION_MAJOR}", errno.ENOTSUP)
    caps = client.capabilities
    session = {
        "client_max_msg_fds": caps.get("max_msg_fds", DEFAULT_MAX_MSG_FDS),
        "client_max_data_xfer_size": caps.get("max_data_xfer_size", DEFAULT_MAX_DATA_XFER_SIZE),
        "pgsizes": caps.get("pgsizes", DEFAULT_PGSIZES),
        "write_multiple": caps.get("write_multiple", False),
    }
    ours = {k: v for k, v in server_caps.items() if k != "twin_socket"}
    return Version(VERSION_MAJOR, min(client.minor, VERSION_MINOR), ours), session
