"""``dmarw attach SOCKET``: connect to a vfio-user server as a VMM would and print the device.

It negotiates VERSION, offers a DMA region with its memfd (DMA_MAP, withdrawn at the end),
then asks for everything a VMM asks before it starts a guest: device info, every region's
info (size, flags, mmap areas), every interrupt's info and the PCI IDs from config space.
Exit status 0 only when the device answered every query; bad input or an unreachable
socket is one line on stderr and a non-zero status, before any work.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

from ..errors import DmaError
from ..mm import AddressSpace
from . import protocol as P
from .client import Client, region_flag_names

MAX_DMA_SIZE = 256 << 20  # what attach maps at most: a probe, not a guest
IRQ_NAMES = {P.INTX: "INTx", P.MSI: "MSI", P.MSIX: "MSI-X", P.ERR_IRQ: "ERR", P.REQ_IRQ: "REQ"}
REGION_NAMES = {**{i: f"BAR{i}" for i in range(6)}, P.ROM_REGION: "ROM",
                P.CONFIG_REGION: "config", P.VGA_REGION: "VGA"}


@dataclass
class Report:
    """What the device answered (and which queries it did not)."""

    socket: str
    version: tuple[int, int] = (0, 0)
    capabilities: dict[str, Any] = field(default_factory=dict)
    device: dict[str, int] = field(default_factory=dict)
    pci: dict[str, int] = field(default_factory=dict)
    dma: dict[str, Any] = field(default_factory=dict)
    regions: list[dict[str, Any]] = field(default_factory=list)
    irqs: list[dict[str, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "socket": self.socket, "version": list(self.version), "capabilities": self.capabilities,
            "device": self.device, "pci": self.pci, "dma": self.dma, "regions": self.regions,
            "irqs": self.irqs, "errors": self.errors, "ok": not self.errors,
        }


def _ask(report: Report, what: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except DmaError as e:
        report.errors.append(f"{what}: {e.detail}")
        return None


def probe(path: str, *, dma_size: int, timeout: float) -> Report:
    """Attach to the server at ``path``, query everything, detach."""
    report = Report(path)
    space = AddressSpace()
    try:
        with Client(path, timeout=timeout, connect_timeout=0.5) as c:
            report.version = c.server_version
            report.capabilities = c.server_caps
            hva = space.mmap(dma_size, backing="memfd")
            _ask(report, "DMA_MAP", c.dma_map, 0, dma_size, space, hva)
            if c.mappings():
                report.dma = {"iova": 0, "size": dma_size, "fd": True}
            info = _ask(report, "DEVICE_GET_INFO", c.device_info)
            if info is not None:
                report.device = {"flags": info.flags, "num_regions": info.num_regions,
                                 "num_irqs": info.num_irqs}
                for i in range(min(info.num_regions, 64)):
                    r = _ask(report, f"DEVICE_GET_REGION_INFO {i}", c.region_info, i)
                    if r is not None:
                        report.regions.append({
                            "index": i, "size": r.size, "flags": r.flags, "offset": r.offset,
                            "mmap_areas": [[a.offset, a.size] for a in r.sparse or []]
                            if r.sparse is not None else ([[0, r.size]] if r.flags & P.REGION_FLAG_MMAP else []),
                        })
                for i in range(min(info.num_irqs, 64)):
                    q = _ask(report, f"DEVICE_GET_IRQ_INFO {i}", c.irq_info, i)
                    if q is not None:
                        report.irqs.append({"index": i, "count": q.count, "flags": q.flags})
                cfg = next((r for r in report.regions if r["index"] == P.CONFIG_REGION), None)
                if info.flags & P.DEVICE_FLAGS_PCI and cfg is not None and cfg["size"] >= 64:
                    raw = _ask(report, "config space REGION_READ", c.config_read, 0, 64)
                    if raw is not None:
                        vendor, device = struct.unpack_from("<HH", raw, 0)
                        rev_class = struct.unpack_from("<I", raw, 8)[0]
                        sub_vendor, sub_device = struct.unpack_from("<HH", raw, 0x2C)
                        report.pci = {"vendor": vendor, "device": device,
                                      "subsystem_vendor": sub_vendor, "subsystem": sub_device,
                                      "class": rev_class >> 8, "revision": rev_class & 0xFF}
            if c.mappings():
                _ask(report, "DMA_UNMAP", c.dma_unmap, 0, dma_size)
    finally:
        space.close()
    return report


def render(r: Report) -> str:
    """The report as text no wider than 80 columns."""
    caps = r.capabilities
    out = [f"vfio-user device at {r.socket}",
           f"  protocol {r.version[0]}.{r.version[1]}, max_data_xfer_size "
           f"{caps.get('max_data_xfer_size', '-')}, max_msg_fds {caps.get('max_msg_fds', '-')}"
           + (", migration" if "migration" in caps else "")]
    if r.pci:
        p = r.pci
        out.append(f"  PCI {p['vendor']:04x}:{p['device']:04x} subsystem "
                   f"{p['subsystem_vendor']:04x}:{p['subsystem']:04x} class {p['class']:06x} "
                   f"rev {p['revision']:02x}")
    if r.dma:
        out.append(f"  DMA: {r.dma['size']:#x} bytes offered at iova {r.dma['iova']:#x} with a memfd")
    if r.device:
        out.append(f"  {r.device['num_regions']} regions, {r.device['num_irqs']} interrupts, "
                   f"flags {r.device['flags']:#x}")
    out.append("")
    out.append(f"  {'region':<8}{'name':<8}{'size':>12}  {'flags':<6}{'offset':>12}  mmap areas")
    for g in r.regions:
        areas = ", ".join(f"{o:#x}+{n:#x}" for o, n in g["mmap_areas"]) or "-"
        if len(areas) > 30:
            areas = areas[:27] + "..."
        out.append(f"  {g['index']:<8}{REGION_NAMES.get(g['index'], '-'):<8}{g['size']:>#12x}  "
                   f"{region_flag_names(g['flags']):<6}{g['offset']:>#12x}  {areas}")
    out.append("")
    out.append(f"  {'irq':<8}{'name':<8}{'count':>6}  flags")
    for q in r.irqs:
        out.append(f"  {q['index']:<8}{IRQ_NAMES.get(q['index'], '-'):<8}{q['count']:>6}  {q['flags']:#x}")
    for e in r.errors:
        out.append(f"  NOT ANSWERED: {e}"[:80])
    out.append(f"  {'every query answered' if not r.errors else f'{len(r.errors)} queries not answered'}")
    return "\n".join(line[:80] for line in out)


def _size(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size") from None
    if n <= 0 or n % 4096 or n > MAX_DMA_SIZE:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a positive multiple of 4096 up to {MAX_DMA_SIZE:#x}")
    return n


def _timeout(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < t <= 600:
        raise argparse.ArgumentTypeError(f"{text!r}: between 0 and 600 seconds")
    return t


def run(args: argparse.Namespace) -> int:
    path = args.socket
    try:
        st = os.stat(path)
    except OSError as e:
        raise SystemExit(f"dmarw attach: {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise SystemExit(f"dmarw attach: {path} is not a UNIX socket")
    try:
        report = probe(path, dma_size=args.dma_size, timeout=args.timeout)
    except DmaError as e:
        raise SystemExit(f"dmarw attach: {path}: {e.detail}") from None
    if args.json:
        json.dump(report.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render(report))
    return 0 if not report.errors else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attach", help="connect to a vfio-user server as a VMM and print its device",
                       description=__doc__.split("\n\n")[0].replace("``", "") if __doc__ else None)
    p.add_argument("socket", help="the server's UNIX socket")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--dma-size", type=_size, default=1 << 20,
                   help=f"bytes of memfd offered by DMA_MAP at iova 0 (default 1 MiB, at most {MAX_DMA_SIZE >> 20} MiB)")
    p.add_argument("--timeout", type=_timeout, default=5.0, help="seconds to wait for each reply (default 5)")
    p.set_defaults(func=run)
