"""``dmarw info``: what this machine offers dmarw (native cores, KVM and its capabilities)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .. import core
from .system import info as kvm_info
from .vm import DEFAULT_DIRTY, native_available

# the capabilities dmarw.vmm uses, in the order they matter
SHOWN = ("USER_MEMORY", "NR_MEMSLOTS", "READONLY_MEM", "IMMEDIATE_EXIT", "SYNC_MMU", "XSAVE", "XSAVE2",
         "XCRS", "VCPU_EVENTS", "DEBUGREGS", "MANUAL_DIRTY_LOG_PROTECT2", "DIRTY_LOG_RING",
         "DIRTY_LOG_RING_ACQ_REL")


def collect() -> dict[str, Any]:
    out: dict[str, Any] = {
        "native_core": core.native_available(),
        "native_vcpu_loop": native_available(),
        "default_dirty": DEFAULT_DIRTY,
        "kvm": kvm_info(),
    }
    return out


def render(d: dict[str, Any]) -> str:
    yes = {True: "built", False: "not built"}
    lines = [
        f"native core (dmarw._native)       {yes[d['native_core']]}",
        f"native vCPU loop (dmarw._vmm)     {yes[d['native_vcpu_loop']]}",
    ]
    k = d["kvm"]
    if not k["available"]:
        lines.append(f"KVM                               unusable: {k['error']}")
        return "\n".join(lines)
    lines.append(f"{'KVM (' + k['dev'] + ')':<34}API version {k['api_version']}, "
                 f"kvm_run {k['vcpu_mmap_size']} bytes")
    lines.append("capabilities:")
    for name in SHOWN:
        lines.append(f"  KVM_CAP_{name:<28} {k['caps'].get(name, 0)}")
    lines.append(f"dirty modes usable                {', '.join(k['dirty_modes'])} (default {d['default_dirty']})")
    msrs = k["guest_msrs"]
    lines.append(f"guest MSRs in vCPU state          {len(msrs)}")
    for i in range(0, len(msrs), 5):
        lines.append("  " + " ".join(msrs[i : i + 5]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    d = collect()
    if args.json:
        json.dump(d, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render(d))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what this machine offers: native cores, KVM and its capabilities",
                       description="Print the native cores built, KVM's API version and the capabilities "
                       "dmarw's real VM uses, and the dirty-log modes usable here.")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=run)
