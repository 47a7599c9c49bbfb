"""The ABI numbers dmarw.vmm computes equal <linux/kvm.h>'s (compiled into dmarw._vmm);
`dmarw info` reports this machine; a missing /dev/kvm is ENODEV."""

from __future__ import annotations

import ctypes
import errno
import json

import pytest

from dmarw import _vmm, cli  # type: ignore[attr-defined]
from dmarw.vmm import uapi


def test_ioctl_numbers_match_the_header() -> None:
    header = _vmm.constants()
    names = [k for k in header if k.startswith("KVM_")]
    assert len(names) >= 20
    for name in names:
        assert getattr(uapi, name) == header[name], name


def test_struct_sizes_match_the_kernel() -> None:
    # the sizes the header's ioctl numbers encode (bits 16..29)
    header = _vmm.constants()
    for name, t in [("KVM_GET_REGS", uapi.Regs), ("KVM_GET_SREGS", uapi.Sregs), ("KVM_GET_FPU", uapi.Fpu),
                    ("KVM_GET_XCRS", uapi.Xcrs), ("KVM_GET_VCPU_EVENTS", uapi.VcpuEvents),
                    ("KVM_GET_DEBUGREGS", uapi.DebugRegs), ("KVM_ENABLE_CAP", uapi.EnableCap),
                    ("KVM_CLEAR_DIRTY_LOG", uapi.ClearDirtyLog)]:
        assert (header[name] >> 16) & 0x3FFF == ctypes.sizeof(t), name
    assert ctypes.sizeof(uapi.DirtyGfn) == 16


def test_missing_dev_kvm_is_enodev(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uapi, "DEV_KVM", "/dev/kvm-does-not-exist")
    with pytest.raises(OSError) as ei:
        uapi.open_kvm()
    assert ei.value.errno == errno.ENODEV
    assert "/dev/kvm-does-not-exist" in str(ei.value)


def test_info_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "API version 12" in out and "KVM_CAP_DIRTY_LOG_RING" in out and "dirty modes usable" in out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert cli.main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kvm"]["available"] and d["kvm"]["api_version"] == 12
    assert "bitmap" in d["kvm"]["dirty_modes"]


def test_not_permitted_is_eacces(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    def refuse(path: str, flags: int, *a: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(OSError) as ei:
        uapi.open_kvm()
    assert ei.value.errno == errno.EACCES and "not permitted" in str(ei.value)


@pytest.mark.parametrize(("mode", "cap"), [("clear", "MANUAL_DIRTY_LOG_PROTECT2"), ("ring", "DIRTY_LOG_RING")])
def test_a_missing_capability_is_eopnotsupp_naming_it(monkeypatch: pytest.MonkeyPatch, mode: str, cap: str) -> None:
    from dmarw import AddressSpace, DmaError, KvmVm
    from dmarw.vmm.system import system

    k = system()
    real = k.cap
    hidden = {uapi.CAPS[cap], uapi.CAPS.get(cap + "_ACQ_REL", -1)}
    monkeypatch.setattr(k, "cap", lambda c: 0 if c in hidden else real(c))
    sp = AddressSpace()
    with pytest.raises(DmaError) as ei:
        KvmVm(sp, dirty=mode)
    assert ei.value.errno == errno.EOPNOTSUPP and f"KVM_CAP_{cap}" in str(ei.value)
    vm = KvmVm(sp)  # the default falls back where the preferred mode's capability is missing
    assert vm.dirty == ("bitmap" if mode == "clear" else "clear")
    vm.close()
    sp.close()


def test_a_closed_address_space_is_refused() -> None:
    from dmarw import AddressSpace, DmaError, KvmVm

    sp = AddressSpace()
    sp.close()
    with pytest.raises(DmaError) as ei:
        KvmVm(sp)
    assert ei.value.errno == errno.EPERM


def test_info_where_kvm_is_unusable(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from dmarw.vmm import system as system_mod

    monkeypatch.setattr(system_mod, "_kvm", None)
    monkeypatch.setattr(uapi, "DEV_KVM", "/dev/kvm-does-not-exist")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "unusable" in out and "No such device" in out and "/dev/kvm-does-not-exist" in out


def test_exit_decoding_of_every_reason() -> None:
    from dmarw.vmm.exits import REASONS, decode

    assert decode((uapi.EXIT_HLT,)).reason == "hlt"
    assert decode((uapi.EXIT_SHUTDOWN,)).reason == "shutdown"
    assert decode((uapi.EXIT_INTR,)).reason == "intr"
    fe = decode((uapi.EXIT_FAIL_ENTRY, 0x80000021, 1))
    assert (fe.reason, fe.detail) == ("fail-entry", (0x80000021, 1))
    ie = decode((uapi.EXIT_INTERNAL_ERROR, 1, (2, 3)))
    assert (ie.reason, ie.detail) == ("internal-error", (1, 2, 3))
    io = decode((uapi.EXIT_IO, 0x3F8, 1, 1, 3, b"abc"))
    assert (io.reason, io.port, io.size, io.count, io.is_write, io.data, io.raw) == ("io", 0x3F8, 1, 3, True, 0x61, b"abc")
    rd = decode((uapi.EXIT_MMIO, 0xD0000000, 4, 0, None))
    assert (rd.reason, rd.address, rd.is_write, rd.data) == ("mmio", 0xD0000000, False, None)
    assert decode((4,)).reason == "debug" and decode((99,)).reason == "exit-99"
    assert set(REASONS) <= set(uapi.EXIT_NAMES.values())
    assert str(io) == "io out 0x61 1 B port 0x3f8 x3"
