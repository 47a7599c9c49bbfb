"""``dmarw tour``: map guest RAM, write through both paths, show both dirty logs."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from .bitmap import from_bytes
from .errors import DmaError
from .kvm import Vm
from .mm import AddressSpace
from .type1 import Container, Prot
from .vfio import ExternalUser, Group

GUEST_RAM = 16 << 20  # 16 MiB
IOVA_BASE = 0  # the device sees guest RAM at iova == gpa, as a vIOMMU-less guest does


def tour(console: Console | None = None) -> int:
    con = console or Console()
    space = AddressSpace()
    hva = space.mmap(GUEST_RAM, backing="memfd")
    con.print(f"[bold]guest RAM[/]: {GUEST_RAM >> 20} MiB memfd at hva {hva:#x} (fd {space.fd(hva)})")

    vm = Vm(space)
    vm.set_memslot(0, 0, GUEST_RAM, hva, dirty_log=True)
    container = Container()
    container.map_dma(IOVA_BASE, GUEST_RAM, hva, space, Prot.READ | Prot.WRITE)
    container.dirty_pages_start()
    group = Group("tour-group")
    device = group.add_device("0000:00:02.0")
    group.set_container(container)
    con.print("memslot 0: gpa 0 → hva; container: iova 0 → hva, dirty tracking on")

    vm.write_guest(0x1000, b"vCPU wrote this")
    vm.write_guest(0x5FF8, b"crosses a page!")  # pages 5 and 6
    with ExternalUser.from_device(device) as user:
        user.dma_write(0x9000, b"device DMA wrote this")
        user.dma_write(0xBFFC, b"across 0xC000")  # pages 11 and 12
        seen = user.dma_read(0x1000, 15)
    con.print(f"device reads back the vCPU's bytes through dma_rw: {seen!r}")

    table = Table(title="dirty logs after the writes")
    table.add_column("log")
    table.add_column("dirty pages (gpa/iova)")
    kvm_pages = from_bytes(vm.get_dirty_log(0))
    vfio_pages = from_bytes(container.get_dirty_bitmap(0, GUEST_RAM))
    table.add_row("KVM get_dirty_log(slot 0)", ", ".join(f"{p << 12:#x}" for p in kvm_pages))
    table.add_row("VFIO get_dirty_bitmap", ", ".join(f"{p << 12:#x}" for p in vfio_pages))
    con.print(table)
    con.print(
        "Only the container knows the device's pages: a migration that read the KVM log "
        "alone would miss them."
    )
    try:
        container.dma_read(GUEST_RAM + 0x1000, 8)
    except DmaError as e:
        con.print(f"an unmapped iova is refused: {e}")
    group.remove()
    container.unmap_dma(0, GUEST_RAM)
    vm.close()
    space.close()
    con.print(f"owner closed; memory released: {space.released}")
    return 0


def _run(args: argparse.Namespace) -> int:
    return tour()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tour", help="a short tour of the core API",
                       description="Map 16 MiB of guest RAM, write it through the KVM path and by device "
                       "DMA through a VFIO container, and show which pages each dirty log saw.")
    p.set_defaults(func=_run)
    d = sub.add_parser(
        "demo",
        help="the main job: dmarw reproduce --quick --json dmarw-results.json --plot dmarw-results.png",
        description="The main job: re-measure the 2020 thread's tables and verdicts quickly (dmarw "
        "reproduce --quick) and write dmarw-results.json and dmarw-results.png here; every reproduce "
        "flag applies.",
    )
    from .lab import cli as lab_cli

    lab_cli.add_reproduce_args(d)
    d.set_defaults(func=lab_cli.run_reproduce, quick=True, json="dmarw-results.json", plot="dmarw-results.png")
