"""The destination: its own guest RAM, filled from a validated stream, then verified.

:class:`Destination` owns an :class:`~dmarw.mm.AddressSpace` with one memfd mapping per RAM
region of the expected layout (or uses a VM's).  An unkeyed stream's page contents are
received straight into that RAM (the decoder's sink), then checked there; a keyed stream's
land in the decoder's buffer first and reach RAM only once their tag has proved them sent
by the key holder.  A page whose check failed in a ``LIVE`` frame is *outstanding*: named in
the next round acknowledgement, cleared when a good copy comes, and an error at END if it
is still outstanding then.  Memory stays marked incomplete (``complete`` False, ``error``
set) unless a valid END arrived; nothing that reads it runs before.

:func:`serve` is the destination process's main: receive from a socket, then answer on the
same socket with a reply message (``DONE`` + pages, or ``FAIL`` + the error) and, after
``DONE``, the digest of every page.  :func:`start` forks that process.  No locks: one thread.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess

from ..errors import DmaError
from ..mm import AddressSpace
from . import control
from .channel import Channel, fork_peer
from .stream import NEED_DATA, Decoder, End, Header, Layout, Pages, RoundEnd, State, StreamError

RECV_CHUNK = 4 << 20
DIGEST = "sha1"
DIGEST_SIZE = hashlib.new(DIGEST).digest_size


MADV_POPULATE_WRITE = 23  # Linux >= 5.14; Python 3.11's mmap module does not name it


def prefault(space: AddressSpace, hva: int, size: int) -> None:
    """Allocate and map guest RAM before it is used, as a VMM does before an incoming
    migration: ``fallocate`` the memfd, then populate the page tables (best effort)."""
    region, off = space.region(hva, size)
    if region.fd is not None:
        os.posix_fallocate(region.fd, off, size)
    try:
        region.map.madvise(MADV_POPULATE_WRITE, off, size)
    except OSError:  # older kernel: pages fault in on first touch instead
        pass


def page_digests(space: AddressSpace, hvas: list[tuple[int, int]], page_size: int) -> bytes:
    """The concatenated digest of every page of ``hvas`` ((hva, size) in layout order)."""
    out = bytearray()
    for hva, size in hvas:
        region, off = space.region(hva, size)
        with memoryview(region.map) as mv:
            for o in range(off, off + size, page_size):
                out += hashlib.new(DIGEST, mv[o : o + page_size]).digest()
    return bytes(out)


class Destination:
    """Guest RAM receiving a migration; ``complete`` only after a valid END."""

    def __init__(
        self,
        page_size: int,
        layout: Layout,
        mac_key: bytes | None = None,
        ram: tuple[AddressSpace, list[int]] | None = None,
    ) -> None:
        """``ram``: an existing address space and the hva of each region (a VM's RAM,
        already prepared), instead of new memfd mappings owned by this object."""
        self.page_size = page_size
        self.layout = tuple(layout)
        self._owns = ram is None
        self.space = AddressSpace() if ram is None else ram[0]
        self._hvas: list[tuple[int, int, int]] = []  # (gpa, size, hva)
        for i, (gpa, size) in enumerate(self.layout):
            if ram is None:
                hva = self.space.mmap(size, backing="memfd")
                prefault(self.space, hva, size)
            else:
                hva = ram[1][i]
            self._hvas.append((gpa, size, hva))
        self.decoder = Decoder(page_size, self.layout, mac_key, sink=None if mac_key is not None else self._sink)
        self.outstanding: set[int] = set()  # gpas whose LIVE copy failed its check
        self.complete = False
        self.error: StreamError | None = None
        self.pages_applied = 0
        self.rounds = 0
        self.states: dict[str, bytes] = {}
        self.on_round: Callable[[int], None] | None = None  # a round's pages are all applied

    @property
    def npages(self) -> int:
        return sum(s for _, s in self.layout) // self.page_size

    def _hva(self, gpa: int) -> tuple[int, int]:
        """The hva of ``gpa`` and the gpa where its region ends."""
        for g, s, h in self._hvas:
            if g <= gpa < g + s:
                return h + gpa - g, g + s
        raise DmaError(errno.EFAULT, f"destination: gpa {gpa:#x} outside the layout")

    def _sink(self, gpa: int, n: int) -> memoryview:
        """Where ``n`` bytes of page contents at ``gpa`` go: this RAM (one region)."""
        hva, region_end = self._hva(gpa)
        if gpa + n > region_end:
            raise DmaError(errno.EFAULT, f"destination: gpa {gpa:#x}+{n:#x} crosses the end of its region")
        region, off = self.space.region(hva, n)
        with memoryview(region.map) as whole:
            return whole[off : off + n]

    def resend_bitmap(self) -> bytes:
        """The outstanding pages as a bitmap over the layout's pages (u64 words; empty if none)."""
        if not self.outstanding:
            return b""
        bits = bytearray((self.npages + 63) // 64 * 8)
        at = 0
        for g, s in self.layout:
            for gpa in self.outstanding:
                if g <= gpa < g + s:
                    k = at + (gpa - g) // self.page_size
                    bits[k >> 3] |= 1 << (k & 7)
            at += s // self.page_size
        return bytes(bits)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Decode ``data`` (``b""``: end of input) and apply every complete, valid frame."""
        try:
            self.decoder.receive_data(data)
        except StreamError as e:
            self.error = e
            self.complete = False
            raise
        self._drain()

    def _drain(self) -> None:
        """Apply every complete, valid frame the decoder holds."""
        try:
            while True:
                ev = self.decoder.next_event()
                if ev is NEED_DATA:
                    return
                self._apply(ev)  # type: ignore[arg-type]
        except StreamError as e:
            self.error = e
            self.complete = False
            raise

    def _apply(self, ev: Header | Pages | RoundEnd | End | State) -> None:
        if isinstance(ev, Pages):
            if ev.data is not None:
                self._write(ev.gpas, ev.data)
            if self.outstanding:  # a good copy clears a page (few are outstanding: ask each)
                covered = ev.gpas if isinstance(ev.gpas, range) else set(ev.gpas)
                self.outstanding.difference_update([g for g in self.outstanding if g in covered])
            self.outstanding.update(ev.bad)
            self.pages_applied += len(ev.gpas)
        elif isinstance(ev, RoundEnd):
            self.rounds += 1
            if self.on_round is not None:
                self.on_round(ev.round)
        elif isinstance(ev, State):
            self.states[ev.name] = ev.blob
        elif isinstance(ev, End):
            if self.outstanding:
                bad = sorted(self.outstanding)
                raise StreamError(
                    "corrupt",
                    f"{len(bad)} page(s) failed their check while the guest ran and were not sent again: "
                    + ", ".join(f"{g:#x}" for g in bad[:8]) + (", ..." if len(bad) > 8 else ""),
                )
            self.complete = True

    def _write(self, gpas: Sequence[int], contents: memoryview) -> None:
        """Copy checked page contents (a keyed stream's) into RAM, one write per run."""
        ps = self.page_size
        i = 0
        with memoryview(contents) as data:
            hva, region_end = self._hva(gpas[0])
            last = gpas[0] + (len(gpas) - 1) * ps  # the range below has len(gpas) items at most
            one = isinstance(gpas, range) or tuple(gpas) == tuple(range(gpas[0], last + 1, ps))
            if gpas[-1] == last and last + ps <= region_end and one:
                self.space.write(hva, data)  # the usual frame: one run, one write
                i = len(gpas)
            while i < len(gpas):  # one write per run of consecutive pages in one region
                hva, region_end = self._hva(gpas[i])
                j = i + 1
                while j < len(gpas) and gpas[j] == gpas[j - 1] + ps and gpas[j] < region_end:
                    j += 1
                with data[i * ps : j * ps] as run:
                    self.space.write(hva, run)
                i = j

    def receive(self, sock: socket.socket, first: bytes = b"") -> None:
        """Read the whole stream from ``sock`` (until END, or EOF which must follow END);
        ``first``: stream bytes already read with the control messages."""
        if first:
            self.feed(first)
        while not self.complete:
            try:  # wait for the rest of the next frame at once, straight into the decoder
                n = self.decoder.receive_into(
                    lambda room: sock.recv_into(room, len(room), socket.MSG_WAITALL), min(RECV_CHUNK, self.decoder.wanted())
                )
            except TimeoutError:
                raise StreamError("truncated", f"the source sent nothing for {sock.gettimeout()} s at offset {self.decoder.offset:#x}") from None
            except StreamError as e:
                self.error = e
                self.complete = False
                raise
            except OSError as e:  # reset by a source that died: the same as a cut stream
                n = 0
                self.error = StreamError("truncated", f"connection lost at offset {self.decoder.offset:#x} ({e.strerror or e})")
                self.feed(b"")
            else:
                self._drain()  # n == 0: the decoder saw the end of input
            if n == 0:
                break
        if not self.complete:  # EOF without END is refused by the decoder; be explicit anyway
            raise self.error or StreamError("truncated", "input ended before END")

    def digests(self) -> bytes:
        return page_digests(self.space, [(h, s) for _, s, h in self._hvas], self.page_size)

    def read(self, gpa: int, n: int) -> bytes:
        return self.space.read(self._hva(gpa)[0], n)

    def close(self) -> None:
        self.decoder.release()  # views of the RAM a cut frame was filling
        if self._owns:
            self.space.close()


# -- the destination process ---------------------------------------------------------------
def serve(sock: socket.socket, page_size: int, layout: Layout, mac_key: bytes | None = None, ch: Channel | None = None) -> int:
    """Destination main: ``REDY`` once its RAM exists; receive; reply ``DONE``/``FAIL``;
    then send every page's digest (``HASH``)."""
    ch = ch or Channel(sock, "source")
    dest = Destination(page_size, layout, mac_key)
    dest.on_round = lambda rnd: ch.send(control.rack(rnd, dest.resend_bitmap()))
    try:
        ch.send(control.encode(control.REDY))
        dest.receive(sock, ch.reader.take_rest())
    except (StreamError, OSError) as e:
        try:
            ch.send(control.fail(str(e)))
        except OSError:
            pass
        return 1
    try:
        ch.send(control.done(dest.pages_applied, dest.rounds))
        ch.send(control.encode(control.HASH, dest.digests()))
    except OSError:
        return 1
    return 0


def _child(sock: socket.socket, page_size: int, layout: Layout) -> None:
    rc = serve(sock, page_size, layout)
    sock.close()
    raise SystemExit(rc)


def start(
    page_size: int, layout: Layout, target: Callable[..., None] = _child
) -> tuple[BaseProcess, socket.socket]:
    """Fork the destination process, wait until its RAM is ready; returns it and the
    source's end of a socketpair.

    Fork before starting any thread in the caller (a forked child inherits only the calling
    thread, and a lock held by another thread would stay held).
    """
    proc, ours = fork_peer(target, page_size, layout, name="dmarw-migrate-dest")
    try:
        Channel(ours, "destination").recv(control.REDY)
    except BaseException:
        ours.close()
        proc.join()
        raise
    return proc, ours
