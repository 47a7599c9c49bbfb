"""A small world for the failure tests, built on one core: one address space, a container
over it (read-write, read-only and write-only mappings, tracking on, one pinned page), a VM
with one logging slot, a group with a device attached to the container and an external
user; :meth:`World.state` is everything a failing call must leave as it was."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from conftest import new_container, new_group, new_vm
from dmarw import AddressSpace, Container, ExternalUser, Group, Prot, Vm

P = 4096
TOP = 1 << 64
RW_PAGES = 8  # iova 0..8P read-write; 8P read-only; 9P write-only
RO_IOVA, WO_IOVA = RW_PAGES * P, (RW_PAGES + 1) * P
HOST = (RW_PAGES + 2) * P
SLOT_PAGES = 8  # gpa 0..8P, logging
_names = itertools.count()


def pattern(n: int) -> bytes:
    return bytes((i * 37 + 11) & 0xFF for i in range(n))


@dataclass
class World:
    core: str
    space: AddressSpace
    hva: int
    c: Container
    vm: Vm
    group: Group
    user: ExternalUser
    buf: bytearray = field(default_factory=lambda: bytearray(b"\xaa" * 16))

    @property
    def dev(self) -> Any:
        return self.group.devices["dev"]

    def state(self) -> dict[str, object]:
        """Everything a failing call must leave alone; the container's dirty bits are drained
        (get-and-clear), so the next state shows only what happened in between."""
        return {
            "mappings": self.c.mappings(),
            "pinned": self.c.pinned(),
            "tracking": self.c.tracking,
            "dirty": [self.c.get_dirty_bitmap(iova, size) for iova, size, _, _ in self.c.mappings()],
            "memory": self.space.read(self.hva, HOST),
            "slots": [(s.slot, s.gpa, s.size, s.hva, s.readonly) for s in self.vm.memslots()],
            "slot_dirty": [sorted(s.dirty.peek()) for s in self.vm.memslots()],
            "group": (self.group.container is self.c, self.group.refs.value, self.group.container_users.value),
            "buf": bytes(self.buf),
        }


def build_world(core: str) -> World:
    space = AddressSpace()
    hva = space.mmap(HOST)
    space.write(hva, pattern(HOST))
    c = new_container(core, lock="rcu")
    c.map_dma(0, RW_PAGES * P, hva, space, Prot.READ | Prot.WRITE)
    c.map_dma(RO_IOVA, P, hva + RO_IOVA, space, Prot.READ)
    c.map_dma(WO_IOVA, P, hva + WO_IOVA, space, Prot.WRITE)
    c.register_unmap_notifier(lambda iova, size: None)
    c.dirty_pages_start()
    c.pin_pages(P, 1, Prot.READ)
    vm = new_vm(space, core)
    vm.set_memslot(0, 0, SLOT_PAGES * P, hva, dirty_log=True)
    g = new_group(f"test_bad_input-{core}-{next(_names)}", core)
    dev = g.add_device("dev")
    g.set_container(c)
    u = ExternalUser.from_device(dev)
    return World(core, space, hva, c, vm, g, u)


def close_world(w: World) -> None:
    w.user.close()
    w.group.unset_container()
    w.group.remove()
    w.vm.close()
    w.c.unpin_pages(P, 1)
    for iova, size, _, _ in w.c.mappings():
        w.c.unmap_dma(iova, size)
    w.space.close()
