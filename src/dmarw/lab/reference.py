"""The 2020 thread's figures: the only reference numbers in the lab.

Source: the Jan 2020 thread "[PATCH v2 2/2] drm/i915/gvt: subsitute kvm_read/write_guest with
vfio_dma_rw" (Yan Zhao, Alex Williamson), measured in the kernel with ``get_cycles()`` on a
GVT-g host running glmark2 in the guest(s); plus the v4 cover discussion of access sizes.
All figures are CPU cycles (TSC) on that thread's machine, never ours.  Every other module
takes them from here (no figure of the thread is typed anywhere else).
"""

from __future__ import annotations

SOURCE = "LKML Jan 2020, drm/i915/gvt vfio_dma_rw thread (kernel, get_cycles())"

# (1) per-interface average cycles, v1 and v2 of the patch
TABLE1: dict[str, dict[str, int]] = {
    "kvm_write_guest": {"v1": 1546, "v2": 1554},
    "kvm_read_guest": {"v1": 686, "v2": 707},
    "vfio_dma_rw(w)": {"v1": 2233, "v2": 2274},
    "vfio_dma_rw(r)": {"v1": 1262, "v2": 1378},
}
V2_CLAIM_INC = 600  # "vfio_dma_rw() has ~600 cycles more overhead on average"

# (2) two repeat runs (rwsem patches applied), with counts
TABLE2: dict[str, dict[str, int]] = {
    "test 1": {"read": 1339, "read_cnt": 29_587_120, "write": 2258, "write_cnt": 17_098_364, "avg": 1676},
    "test 2": {"read": 1340, "read_cnt": 28_454_262, "write": 2238, "write_cnt": 16_501_788, "avg": 1670},
}

# the glmark2 workload facts
GLMARK2 = {"ops": 40_000_000, "read_fraction": 0.63, "page_read_fraction": 0.48}

# (3) one VM: read, write, avg, inc over kvm
TABLE3: dict[str, dict[str, int | None]] = {
    "kvm": {"read": 694, "write": 1506, "avg": 993, "inc": None},
    "vfio-mutex": {"read": 1340, "write": 2248, "avg": 1673, "inc": 680},
    "vfio-rwsem": {"read": 1323, "write": 2198, "avg": 1645, "inc": 653},
}

# (4) per-lock average cycles on vfio_dma_rw, one VM (each includes get_cycles())
TABLE4: dict[str, int] = {
    "iommu.lock": 117,
    "vfio.group_lock": 108,
    "group.unbound_lock": 114,
    "group.device_lock": 115,
    "group.mutex": 113,
}
KVM_SRCU_1VM = 160
UNCONTENDED_MUTEX = 104  # "a mutex without any contention is 104 cycles ... including get_cycles()"
TIMER_COST = 20  # "get_cycles() operation itself would influence final cycles by ~20 cycles"

# (5) two VMs
TABLE5: dict[str, dict[str, int | None]] = {
    "kvm": {"read": 1035, "write": 1832, "avg": 1325, "inc": None},
    "vfio-mutex": {"read": 2104, "write": 2886, "avg": 2390, "inc": 1065},
    "vfio-rwsem": {"read": 1965, "write": 2778, "avg": 2260, "inc": 935},
}

# (6) lock cost, one VM vs two
TABLE6: dict[str, dict[str, int]] = {
    "iommu lock (mutex)": {"one": 117, "two": 150},
    "iommu lock (rwsem r)": {"one": 117, "two": 156},
    "kvm->srcu": {"one": 160, "two": 213},
}
KVM_2VM_INCREASE = 332  # "In the kvm case, avg cycles increased 332 cycles"
KVM_ATOMICS_GUESS = 109  # "The rest 109 cycles may be spent on atomic operations"

# (7) external user interface (one VM)
EXTERNAL_USER = 1198
EXTERNAL_USER_MMGET = 1051

# (8) v4 discussion: vfio_dma_rw minus kvm_read/write_guest, cycles, by access size
SWEEP_DIFF: dict[str, tuple[int, int]] = {
    "<= 1 page": (155, 195),
    "5 pages": (-530, -530),
    "20 pages": (-2533, -2005),
}
SWEEP_CROSSOVER_PAGES = 5  # "vfio wins from about 5 pages"
