"""A device in its own process, attached to a :class:`~dmarw.vmm.KvmVm` over vfio-user.

:class:`RemoteDevice` is the VMM half: a :class:`~dmarw.vfio_user.Client` connected to the
server, the VM's memslots offered to it by DMA_MAP with their memfds (iova == gpa, so the
server's device reaches guest RAM directly, through its own container), and an MMIO
device for ``KvmVm.add_mmio`` whose loads and stores become REGION_READ / REGION_WRITE of
one of the server's regions (by default BAR0).

Dirty pages the device wrote come from the server's DMA logging (REPORT per mapping) plus
the pages its DMA_WRITE messages wrote here (none when every mapping has an fd); device
state moves with MIG_DATA (:meth:`save` / :meth:`restore`).  These are what a live
migration of the VM needs on top of KVM's own dirty log.

Threads: ``mmio_read``/``mmio_write`` are called from the vCPU thread, which also answers
the server's DMA messages that arrive while it waits; a Client call is safe from any thread.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from ..errors import fail, rng
from . import protocol as P
from .client import Client


class RemoteDevice:
    """The server at ``path`` attached to ``vm`` at ``gpa`` (region ``index``)."""

    def __init__(self, vm: Any, path: str | os.PathLike[str], *, gpa: int, index: int = P.BAR0,
                 timeout: float = 10.0, logging: bool = True, post: bool = False,
                 page_size: int = 4096) -> None:
        self.vm = vm
        self.index = index
        self.post = post
        self.page_size = page_size
        self.timeout = timeout
        self.want_logging = logging
        self.gpa = gpa
        self.client, self.size = self._open(path)
        self.logging = logging
        try:
            vm.add_mmio(gpa, self.size, self)
        except BaseException:
            self._detach(self.client)
            raise

    def _open(self, path: str | os.PathLike[str]) -> tuple[Client, int]:
        """Connect, check the region, offer every memslot (iova == gpa, with its memfd),
        start DMA logging; the client and the region's size."""
        c = Client(path, timeout=self.timeout)
        try:
            info = c.region_info(self.index)
            if not info.size or not info.flags & (P.REGION_FLAG_READ | P.REGION_FLAG_WRITE):
                raise fail(errno.ENODEV, f"region {self.index} of {os.fspath(path)} is not an I/O region")
            if hasattr(self, "size") and info.size != self.size:
                raise fail(errno.EINVAL, f"region {self.index} of {os.fspath(path)} is {info.size:#x} "
                           f"bytes, the attached window {self.size:#x}")
            for s in self.vm.memslots():
                c.dma_map(s.gpa, s.size, self.vm.space, s.hva, with_fd=True,
                          prot=P.DMA_READ_FLAG | (0 if s.readonly else P.DMA_WRITE_FLAG))
            if self.want_logging:
                c.dma_logging_start(page_size=self.page_size)
        except BaseException:
            c.close()
            raise
        return c, info.size

    # -- the MMIO transport (vCPU thread) --------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.client.region_read(self.index, offset, size), "little")

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self.client.region_write(self.index, offset, data, post=self.post)

    # -- what migration needs ------------------------------------------------------------------
    def dirty_pages(self) -> set[int]:
        """Guest page numbers the device wrote since the last call (reports clear them)."""
        if not self.logging:
            raise fail(errno.EINVAL, "dirty_pages: DMA logging was not started")
        pages: set[int] = set()
        for iova, size, with_fd in self.client.mappings():
            if with_fd:
                pages |= self.client.dma_logging_report(iova, size, self.page_size)
        unit = self.client.dirty_pgsize  # message-written pages are counted in the server's unit
        pages |= {p * unit // self.page_size for p in self.client.take_message_dirty()}
        return pages

    def save(self) -> bytes:
        """Stop the device and return its state (STOP_COPY data; PRE_COPY data first if the
        device has that phase: the stream is both, in order)."""
        flags = self.client.migration_flags()
        if not flags & P.MIGRATION_STOP_COPY:
            raise fail(errno.ENOTSUP, "the device does not migrate (no STOP_COPY)")
        pre = b""
        if flags & P.MIGRATION_PRE_COPY:
            self.client.set_mig_state(P.MigState.PRE_COPY)
            pre = self.client.mig_drain()
        self.client.set_mig_state(P.MigState.STOP_COPY)
        stop = self.client.mig_drain()
        self.client.set_mig_state(P.MigState.STOP)
        return pre + stop

    def restore(self, state: bytes, *, run: bool = True) -> None:
        self.client.load_state(state, run=run)

    def migrate_to(self, path: str | os.PathLike[str]) -> int:
        """Move the device to the server at ``path`` (the vCPUs stopped): its state out of
        this server (:meth:`save`), into the new one (RESUMING, STOP, RUNNING), the VM's
        window then reaching the new server; returns the bytes of state moved.  Collect
        :meth:`dirty_pages` first: the old server's log goes with it."""
        new, _ = self._open(path)
        try:
            state = self.save()
            new.load_state(state)
        except BaseException:
            self._detach(new)
            raise
        old, self.client = self.client, new
        self._detach(old)
        return len(state)

    def _detach(self, c: Client) -> None:
        try:
            if c.connected:
                if self.want_logging:
                    c.dma_logging_stop()
                if c.mappings():
                    c.dma_unmap_all()
        finally:
            c.close()

    def close(self) -> None:
        """Detach: stop logging, withdraw guest RAM, disconnect (the MMIO range stays
        registered with the VM; a later access fails with ECONNRESET)."""
        self.logging = False
        self._detach(self.client)

    def __enter__(self) -> RemoteDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteDevice({self.client.path!r}, region {self.index} at gpa {rng(self.gpa, self.size)})"
