"""Whether a server listens on a UNIX socket file, asked without disturbing it.

:func:`live` asks the kernel first (``NETLINK_SOCK_DIAG``: the listening UNIX sockets and
the inode of the file each is bound to), so a server found there sees nothing of the
question; a one-client server (``dmarw serve --once``, libvfio-user's) would take a probing
connection for its client.  Where the kernel cannot say (no ``unix_diag``, or the server
is in another network namespace) a ``connect`` decides: refused means nobody listens.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from ..errors import fail

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10
_UDIAG_SHOW_VFS, _UNIX_DIAG_VFS = 0x2, 1
_NLMSG = struct.Struct("=IHHII")  # struct nlmsghdr
_REQ = struct.Struct("=BBHIIIII")  # struct unix_diag_req
_MSG_SIZE = 16  # struct unix_diag_msg
_ATTR = struct.Struct("=HH")  # struct nlattr
_VFS = struct.Struct("=II")  # struct unix_diag_vfs: the bound file's inode and device


def _align(n: int) -> int:
    return (n + 3) & ~3


def listening_files(timeout: float = 2.0) -> set[tuple[int, int]]:
    """(kernel device, inode) of the file every listening UNIX socket of this network
    namespace is bound to; ``OSError`` where the kernel cannot say."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(timeout)
        req = _REQ.pack(socket.AF_UNIX, 0, 0, 1 << _TCP_LISTEN, 0, _UDIAG_SHOW_VFS, 0xFFFFFFFF, 0xFFFFFFFF)
        nl.send(_NLMSG.pack(_NLMSG.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + req)
        found: set[tuple[int, int]] = set()
        while True:
            data = nl.recv(1 << 16)
            off = 0
            while off + _NLMSG.size <= len(data):
                length, kind = _NLMSG.unpack_from(data, off)[:2]
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + _NLMSG.size)
                    raise OSError(-err, os.strerror(-err))
                at, end = off + _NLMSG.size + _MSG_SIZE, off + length
                while at + _ATTR.size <= end:
                    alen, atype = _ATTR.unpack_from(data, at)
                    if atype == _UNIX_DIAG_VFS and alen >= _ATTR.size + _VFS.size:
                        ino, dev = _VFS.unpack_from(data, at + _ATTR.size)
                        found.add((dev, ino))
                    at += _align(max(alen, _ATTR.size))
                off += _align(max(length, _NLMSG.size))
            if not data:
                return found


def live(path: str | os.PathLike[str]) -> bool:
    """True when a server listens on the socket file ``path``; False when nobody does (a
    stale file); ``DmaError`` with the errno when neither can be told (no permission)."""
    st = os.stat(path)
    kernel_dev = (os.major(st.st_dev) << 20) | os.minor(st.st_dev)  # the kernel's own dev_t
    try:
        if (kernel_dev, st.st_ino & 0xFFFFFFFF) in listening_files():
            return True
    except OSError:
        pass  # the kernel cannot say: the connect below does
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(os.fspath(path))
        except ConnectionRefusedError:
            return False
        except FileNotFoundError:
            return False  # gone meanwhile
        except BlockingIOError:
            return True  # listening, its backlog full: busy, not stale
        except OSError as e:
            raise fail(e.errno or errno.EACCES, f"{path}: cannot tell whether a server listens there: "
                       f"{e.strerror}") from None
    return True
