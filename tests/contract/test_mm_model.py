"""Host memory and its lifetime against a plain model (hypothesis, stateful), on each core.

The model: a dict of mappings (hva → bytearray), the user count, an ``exited`` flag and a
kernel-thread flag.  Rules, as the kernel has them:

* ``mmap`` of a page multiple maps fresh zeroed memory at a page-aligned hva no other
  mapping overlaps; after the owner exited it is ``EFAULT``;
* ``munmap`` takes exactly a whole mapping (``EINVAL`` otherwise) and frees it;
* ``read``/``write`` inside one mapping move bytes; any byte outside every mapping (or in
  a second mapping) is ``EFAULT`` and moves none;
* ``mmget_not_zero`` counts a user unless the owner exited; ``get_task_mm`` also refuses a
  kernel-thread owner; ``mmput`` drops one (``EINVAL`` with none); ``close`` is the owner's
  exit (idempotent, drops the owner's reference); when the count reaches zero every mapping
  is freed and each access is ``EFAULT``;
* a VM of the core under test takes a user reference (``EPERM`` once the owner exited) and
  drops it at ``close``, so guest memory outlives the owner while the VM lives, and a VM's
  guest reads see the host bytes.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from dmarw import PAGE_SIZE, AddressSpace, DmaError, Vm

P = PAGE_SIZE


def _outcome(fn: Callable[..., Any], *args: Any, **kw: Any) -> tuple[str, Any]:
    try:
        return ("ok", fn(*args, **kw))
    except DmaError as e:
        return ("err", e.errno)


class SpaceMachine(RuleBasedStateMachine):
    def __init__(self, make_vm: Callable[[AddressSpace], Vm], kthread: bool) -> None:
        super().__init__()
        self.make_vm = make_vm
        self.kthread = kthread
        self.space = AddressSpace(kthread=kthread)
        self.maps: dict[int, bytearray] = {}
        self.gone: list[tuple[int, int]] = []  # (hva, size) of freed mappings, to probe
        self.users = 1
        self.exited = False
        self.refs = 0  # references this machine took with mmget/get_task_mm
        self.vms: list[Vm] = []

    def teardown(self) -> None:
        for vm in self.vms:
            vm.close()
        for _ in range(self.refs):
            self.space.mmput()
        self.space.close()

    def _released(self) -> bool:
        return self.users == 0

    def _find(self, hva: int, n: int) -> tuple[int, bytearray] | None:
        for base, mem in self.maps.items():
            if base <= hva and hva + n <= base + len(mem):
                return base, mem
        return None

    def _addr(self, data: st.DataObject, n: int) -> int:
        """An hva to probe: inside, across the end of, just before a mapping, or freed."""
        spots = [(b, len(m)) for b, m in self.maps.items()] + self.gone
        if not spots:
            return data.draw(st.integers(0, 1 << 47))
        base, size = data.draw(st.sampled_from(spots))
        return base + data.draw(st.integers(-n - 2, size + 2))

    # -- mappings ---------------------------------------------------------------------------
    @rule(pages=st.integers(1, 4), backing=st.sampled_from(["anon", "memfd"]))
    def mmap(self, pages: int, backing: str) -> None:
        got = _outcome(self.space.mmap, pages * P, backing=backing)
        if self.exited:
            assert got == ("err", errno.EFAULT)
            return
        assert got[0] == "ok"
        hva = got[1]
        assert hva % P == 0
        assert all(hva + pages * P <= b or b + len(m) <= hva for b, m in self.maps.items())
        assert self.space.read(hva, pages * P) == bytes(pages * P)
        self.maps[hva] = bytearray(pages * P)

    @precondition(lambda self: bool(self.maps))
    @rule(data=st.data(), whole=st.booleans())
    def munmap(self, data: st.DataObject, whole: bool) -> None:
        base = data.draw(st.sampled_from(sorted(self.maps)))
        size = len(self.maps[base])
        if whole:
            assert _outcome(self.space.munmap, base, size) == ("ok", None)
            del self.maps[base]
            self.gone.append((base, size))
        else:
            off, n = data.draw(st.sampled_from([(0, size - P), (P, size), (0, size + P), (-P, size)]))
            if n <= 0:
                return
            hva = base + off
            got = _outcome(self.space.munmap, hva, n)
            if len(self.maps.get(hva, b"")) == n:  # exactly another (adjacent) mapping
                assert got == ("ok", None)
                del self.maps[hva]
                self.gone.append((hva, n))
            else:
                assert got == ("err", errno.EINVAL), (hex(hva), n)

    @rule(data=st.data(), n=st.integers(1, 2 * P))
    def read(self, data: st.DataObject, n: int) -> None:
        hva = self._addr(data, n)
        got = _outcome(self.space.read, hva, n)
        hit = self._find(hva, n)
        if hit is None:
            assert got == ("err", errno.EFAULT), (hex(hva), n)
        else:
            base, mem = hit
            assert got == ("ok", bytes(mem[hva - base : hva - base + n]))

    @rule(data=st.data(), n=st.integers(1, 2 * P), seed=st.integers(0, 255))
    def write(self, data: st.DataObject, n: int, seed: int) -> None:
        hva = self._addr(data, n)
        payload = bytes((seed + i) & 0xFF for i in range(n))
        got = _outcome(self.space.write, hva, payload)
        hit = self._find(hva, n)
        if hit is None:
            assert got == ("err", errno.EFAULT), (hex(hva), n)
        else:
            assert got == ("ok", None)
            base, mem = hit
            mem[hva - base : hva - base + n] = payload

    # -- users ------------------------------------------------------------------------------
    @rule(task=st.booleans())
    def take_user(self, task: bool) -> None:
        got = self.space.get_task_mm() if task else self.space.mmget_not_zero()
        ok = not self.exited and not self._released() and not (task and self.kthread)
        assert got is ok
        if ok:
            self.users += 1
            self.refs += 1

    @precondition(lambda self: self.refs > 0)
    @rule()
    def put_user(self) -> None:
        self.space.mmput()
        self.refs -= 1
        self._drop()

    @rule()
    def mmput_without_a_reference(self) -> None:
        if self.users == 0:
            assert _outcome(self.space.mmput) == ("err", errno.EINVAL)

    @rule()
    def owner_exits(self) -> None:
        self.space.close()
        if not self.exited:
            self.exited = True
            self._drop()

    def _drop(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.gone.extend((b, len(m)) for b, m in self.maps.items())
            self.maps.clear()

    # -- a VM of the core under test holds a user reference -----------------------------------
    @precondition(lambda self: len(self.vms) < 2)
    @rule()
    def open_vm(self) -> None:
        try:
            vm = self.make_vm(self.space)
        except DmaError as e:
            assert self.exited and e.errno == errno.EPERM
            return
        assert not self.exited
        self.vms.append(vm)
        self.users += 1

    @precondition(lambda self: bool(self.vms))
    @rule(data=st.data())
    def guest_reads_host_memory(self, data: st.DataObject) -> None:
        if not self.maps:
            return
        vm = self.vms[-1]
        base = data.draw(st.sampled_from(sorted(self.maps)))
        mem = self.maps[base]
        vm.set_memslot(0, 0, len(mem), base)
        assert vm.read_guest(0, len(mem)) == bytes(mem)
        vm.set_memslot(0, 0, 0, 0)

    @precondition(lambda self: bool(self.vms))
    @rule()
    def close_vm(self) -> None:
        self.vms.pop().close()
        self._drop()

    @invariant()
    def same_state(self) -> None:
        assert self.space.users == self.users
        assert self.space.closed is self.exited
        assert self.space.released is self._released()
        assert sorted(r.hva for r in self.space.regions()) == sorted(self.maps)
        for base, mem in self.maps.items():
            assert self.space.read(base, len(mem)) == bytes(mem)


SETTINGS = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("kthread", [False, True], ids=["task", "kthread"])
def test_address_space_matches_the_model(make_vm: Callable[[AddressSpace], Vm], kthread: bool) -> None:
    run_state_machine_as_test(lambda: SpaceMachine(make_vm, kthread), settings=SETTINGS)
