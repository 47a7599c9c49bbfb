"""The VFIO layer: groups, devices, the per-call path, external users, lock counts.

Every behavioural test runs on each core (``core``; containers and groups come from
``make_container`` / ``make_group``) against each lock strategy × mm-ref mode
(``container_kwargs``).  Lock counts come from :func:`dmarw.lockstat.collect` itself: the
per-call path must take the five locks of the 2020 kernel once per call, the external-user
path only the iommu lock.
"""

from __future__ import annotations

import errno
import itertools
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmarw import (
    PAGE_SIZE,
    AddressSpace,
    Container,
    Device,
    DmaError,
    ExternalUser,
    Group,
    Prot,
    Vm,
    lockstat,
    vfio_dma_rw,
    vfio_pin_pages,
    vfio_unpin_pages,
)

SIZE = 16 * PAGE_SIZE
RO_IOVA = SIZE  # a read-only mapping right after the read-write one
_names = itertools.count()
MakeContainer = Callable[..., Container]
MakeGroup = Callable[[str], Group]


def unique(prefix: str) -> str:
    """A group name no other test (or helper's suite) registers."""
    return f"test_vfio-{prefix}-{next(_names)}-{threading.get_ident()}"


@dataclass
class Env:
    """One owner address space, one container over it, one attached group with one device."""

    space: AddressSpace
    hva: int
    container: Container
    group: Group
    device: Device
    users: list[ExternalUser] = field(default_factory=list)

    def user(self) -> ExternalUser:
        u = ExternalUser.from_device(self.device)
        self.users.append(u)
        return u

    def snapshot(self) -> dict[str, Any]:
        """Everything a failing call must leave as it was (the dirty bitmap is drained)."""
        c, g = self.container, self.group
        snap: dict[str, Any] = {
            "mappings": c.mappings(),
            "pinned": c.pinned(),
            "container_users": g.container_users.value,
            "refs": g.refs.value,
            "container": g.container,
            "space_users": self.space.users,
        }
        if not self.space.released:
            snap["memory"] = self.space.read(self.hva, SIZE)
        if c.tracking:
            # get-and-clear: a second snapshot sees only what happened in between (and the
            # pinned pages, which every GET reports)
            snap["dirty"] = c.get_dirty_bitmap(0, SIZE)
        return snap


def make_env(
    make_container: MakeContainer,
    make_group: MakeGroup,
    kwargs: dict[str, str],
    *,
    attach: bool = True,
    tracking: bool = True,
) -> Env:
    space = AddressSpace()
    hva = space.mmap(SIZE + PAGE_SIZE)
    space.write(hva, bytes(range(256)) * (SIZE // 256))
    c = make_container(**kwargs)
    c.map_dma(0, SIZE, hva, space, Prot.READ | Prot.WRITE)
    c.map_dma(RO_IOVA, PAGE_SIZE, hva + SIZE, space, Prot.READ)
    c.register_unmap_notifier(lambda iova, size: None)
    if tracking:
        c.dirty_pages_start()
    g = make_group(unique(kwargs.get("lock", "x")))
    dev = g.add_device("0000:00:02.0")
    if attach:
        g.set_container(c)
    return Env(space, hva, c, g, dev)


def teardown_env(env: Env) -> None:
    for u in env.users:
        u.close()
    for d in env.group.devices.values():
        d.bind()
    if env.group.container is not None:
        env.group.unset_container()
    env.group.remove()
    env.space.close()


@pytest.fixture
def env(
    make_container: MakeContainer, make_group: MakeGroup, container_kwargs: dict[str, str]
) -> Iterator[Env]:
    e = make_env(make_container, make_group, container_kwargs)
    yield e
    teardown_env(e)


@pytest.fixture
def detached(
    make_container: MakeContainer, make_group: MakeGroup, container_kwargs: dict[str, str]
) -> Iterator[Env]:
    e = make_env(make_container, make_group, container_kwargs, attach=False)
    yield e
    teardown_env(e)


def assert_fails_unchanged(env: Env, err: int, call: Callable[[], object]) -> DmaError:
    """``call`` raises DmaError(err) and changes nothing the snapshot can see."""
    env.snapshot()  # drain the dirty bitmap
    before = env.snapshot()
    with pytest.raises(DmaError) as info:
        call()
    assert info.value.errno == err, str(info.value)
    assert isinstance(info.value, OSError)
    assert env.snapshot() == before
    return info.value


# -- groups and devices -----------------------------------------------------------------------


def test_duplicate_group_name_is_eexist_and_name_is_free_after_remove(make_group: MakeGroup) -> None:
    name = unique("dup")
    g = make_group(name)
    try:
        with pytest.raises(DmaError) as info:
            make_group(name)
        assert info.value.errno == errno.EEXIST
        assert name in str(info.value)
    finally:
        g.remove()
    again = make_group(name)  # the name is free again
    again.remove()


def test_duplicate_device_is_eexist(make_group: MakeGroup) -> None:
    g = make_group(unique("dev"))
    try:
        d = g.add_device("a")
        assert d.group is g and g.devices == {"a": d}
        with pytest.raises(DmaError) as info:
            g.add_device("a")
        assert info.value.errno == errno.EEXIST
        assert g.devices == {"a": d}
    finally:
        g.remove()


def test_unbind_makes_group_not_viable_bind_restores(make_group: MakeGroup) -> None:
    g = make_group(unique("viable"))
    try:
        a, b = g.add_device("a"), g.add_device("b")
        assert g.viable()
        a.unbind()
        a.unbind()  # idempotent
        assert not g.viable()
        b.unbind()
        a.bind()
        assert not g.viable()
        b.bind()
        assert g.viable()
        assert g.unbound == set()
    finally:
        g.remove()


def test_set_container_twice_is_ebusy(make_container: MakeContainer, env: Env) -> None:
    other = make_container()
    with pytest.raises(DmaError) as info:
        env.group.set_container(other)
    assert info.value.errno == errno.EBUSY
    assert env.group.container is env.container


def test_unset_container_without_one_is_einval(detached: Env) -> None:
    with pytest.raises(DmaError) as info:
        detached.group.unset_container()
    assert info.value.errno == errno.EINVAL
    assert detached.group.container is None


def test_unset_container_while_external_user_holds_it_is_ebusy(env: Env) -> None:
    u = env.user()
    err = assert_fails_unchanged(env, errno.EBUSY, env.group.unset_container)
    assert env.group.name in str(err)
    u.close()
    env.group.unset_container()
    assert env.group.container is None
    assert env.group.container_users.value == 0


def test_remove_group_with_users_is_ebusy(env: Env) -> None:
    env.user()
    assert_fails_unchanged(env, errno.EBUSY, env.group.remove)


# -- the per-call path ---------------------------------------------------------------------------


def test_vfio_dma_rw_round_trip_and_dirty(env: Env) -> None:
    env.snapshot()
    vfio_dma_rw(env.device, 0x2FFC, b"abcdefgh", True)  # pages 2 and 3
    buf = bytearray(8)
    vfio_dma_rw(env.device, 0x2FFC, buf, False)
    assert bytes(buf) == b"abcdefgh"
    assert env.space.read(env.hva + 0x2FFC, 8) == b"abcdefgh"
    assert env.container.get_dirty_bitmap(0, SIZE)[0] == 0b1100
    assert env.group.container_users.value == 0
    assert env.group.refs.value == 1


def test_vfio_pin_and_unpin_pages(env: Env) -> None:
    hvas = vfio_pin_pages(env.device, 0x3000, 2, Prot.READ | Prot.WRITE)
    assert hvas == [env.hva + 0x3000, env.hva + 0x4000]
    assert env.container.pinned() == {0x3000: 1, 0x4000: 1}
    vfio_unpin_pages(env.device, 0x3000, 2)
    assert env.container.pinned() == {}
    assert env.group.container_users.value == 0
    assert env.group.refs.value == 1


def _calls(dev: Device) -> list[tuple[str, Callable[[], object]]]:
    return [
        ("dma_rw write", lambda: vfio_dma_rw(dev, 0x1000, b"x" * 64, True)),
        ("dma_rw read", lambda: vfio_dma_rw(dev, 0x1000, bytearray(64), False)),
        ("pin_pages", lambda: vfio_pin_pages(dev, 0x1000, 1, Prot.READ)),
        ("unpin_pages", lambda: vfio_unpin_pages(dev, 0x1000, 1)),
        ("external user", lambda: ExternalUser.from_device(dev)),
    ]


def test_per_call_path_not_attached_is_einval(detached: Env) -> None:
    for what, call in _calls(detached.device):
        err = assert_fails_unchanged(detached, errno.EINVAL, call)
        assert "not attached" in str(err), what


def test_per_call_path_not_viable_is_einval(env: Env) -> None:
    vfio_pin_pages(env.device, 0x1000, 1, Prot.READ)  # so unpin would otherwise succeed
    env.device.unbind()
    for what, call in _calls(env.device):
        err = assert_fails_unchanged(env, errno.EINVAL, call)
        assert "not viable" in str(err), what
    env.device.bind()
    vfio_unpin_pages(env.device, 0x1000, 1)
    assert env.container.pinned() == {}


def test_removed_group_is_enodev(
    make_container: MakeContainer, make_group: MakeGroup, container_kwargs: dict[str, str]
) -> None:
    e = make_env(make_container, make_group, container_kwargs, attach=False)
    e.group.remove()
    try:
        with pytest.raises(DmaError) as info:
            vfio_dma_rw(e.device, 0, bytearray(4), False)
        assert info.value.errno == errno.ENODEV
        assert e.group.refs.value == 1
    finally:
        e.space.close()


@pytest.mark.parametrize(
    ("err", "args"),
    [
        (errno.EINVAL, (SIZE + 2 * PAGE_SIZE, b"unmapped", True)),  # no mapping there
        (errno.EPERM, (RO_IOVA, b"read-only", True)),  # write to a READ mapping
        (errno.EINVAL, (0x1000, b"", True)),  # zero length
        (errno.EPERM, (SIZE - 4, b"into the read-only one", True)),  # second chunk is READ
        (errno.EINVAL, (RO_IOVA + PAGE_SIZE - 4, b"off the end", False)),  # runs off the end
    ],
)
def test_container_failures_through_the_per_call_path_drop_every_reference(
    env: Env, err: int, args: tuple[int, bytes, bool]
) -> None:
    assert_fails_unchanged(env, err, lambda: vfio_dma_rw(env.device, *args))


def test_pin_failures_drop_every_reference(env: Env) -> None:
    assert_fails_unchanged(
        env, errno.EPERM, lambda: vfio_pin_pages(env.device, RO_IOVA, 1, Prot.WRITE)
    )
    assert_fails_unchanged(
        env, errno.EINVAL, lambda: vfio_pin_pages(env.device, SIZE + 4 * PAGE_SIZE, 1, Prot.READ)
    )
    assert_fails_unchanged(env, errno.EINVAL, lambda: vfio_unpin_pages(env.device, 0x5000, 1))


# -- external users --------------------------------------------------------------------------


def test_external_user_context_manager_holds_and_drops_references(env: Env) -> None:
    g = env.group
    with ExternalUser.from_device(env.device) as u:
        assert g.container_users.value == 1
        assert g.refs.value == 2
        u.dma_write(0x5000, b"hello")
        assert u.dma_read(0x5000, 5) == b"hello"
        buf = bytearray(5)
        u.dma_rw(0x5000, buf, False)
        assert bytes(buf) == b"hello"
        assert u.pin_pages(0x6000, 1, Prot.READ) == [env.hva + 0x6000]
        u.unpin_pages(0x6000, 1)
    assert g.container_users.value == 0
    assert g.refs.value == 1
    assert u.container is None


def test_external_user_close_is_idempotent_and_use_after_close_is_einval(env: Env) -> None:
    u = env.user()
    u.close()
    u.close()
    assert env.group.container_users.value == 0
    assert env.group.refs.value == 1
    for call in (
        lambda: u.dma_rw(0x1000, bytearray(8), False),
        lambda: u.dma_read(0x1000, 8),
        lambda: u.dma_write(0x1000, b"12345678"),
        lambda: u.pin_pages(0x1000, 1, Prot.READ),
        lambda: u.unpin_pages(0x1000, 1),
    ):
        err = assert_fails_unchanged(env, errno.EINVAL, call)
        assert "closed" in str(err)


def test_external_user_keeps_working_while_device_is_unbound(env: Env) -> None:
    """Viability is checked once, when the handle is taken (as the 2020 kernel did)."""
    with ExternalUser.from_device(env.device) as u:
        env.device.unbind()
        u.dma_write(0, b"still held")
        assert u.dma_read(0, 10) == b"still held"
        env.device.bind()


def test_several_external_users_count_separately(env: Env) -> None:
    a, b = env.user(), env.user()
    assert env.group.container_users.value == 2
    assert env.group.refs.value == 3
    a.close()
    with pytest.raises(DmaError):
        env.group.unset_container()
    b.close()
    assert env.group.container_users.value == 0
    env.group.unset_container()


# -- a closed owner --------------------------------------------------------------------------


def test_closed_owner_is_eperm_on_every_path(env: Env, container_kwargs: dict[str, str]) -> None:
    u = env.user()
    vfio_pin_pages(env.device, 0x2000, 1, Prot.READ)
    env.space.close()  # the owner exits: both mm_ref modes must refuse from now on
    assert env.space.closed
    for call in (
        lambda: vfio_dma_rw(env.device, 0x1000, b"late", True),
        lambda: vfio_dma_rw(env.device, 0x1000, bytearray(4), False),
        lambda: vfio_pin_pages(env.device, 0x3000, 1, Prot.READ),
        lambda: u.dma_rw(0x1000, bytearray(4), False),
        lambda: u.dma_write(0x1000, b"late"),
        lambda: u.pin_pages(0x3000, 1, Prot.READ),
    ):
        err = assert_fails_unchanged(env, errno.EPERM, call)
        assert "0x" in str(err), container_kwargs  # names the address
    # unpinning needs no address-space reference: the vendor driver can always let go
    vfio_unpin_pages(env.device, 0x2000, 1)
    assert env.container.pinned() == {}


def test_kthread_owner_is_refused_only_by_get_task_mm(
    make_container: MakeContainer, make_group: MakeGroup, container_kwargs: dict[str, str]
) -> None:
    space = AddressSpace(kthread=True)
    hva = space.mmap(PAGE_SIZE)
    c = make_container(**container_kwargs)
    c.map_dma(0, PAGE_SIZE, hva, space)
    g = make_group(unique("kthread"))
    dev = g.add_device("d")
    g.set_container(c)
    try:
        if container_kwargs["mm_ref"] == "get_task_mm":
            with pytest.raises(DmaError) as info:
                vfio_dma_rw(dev, 0, b"k", True)
            assert info.value.errno == errno.EPERM
            assert space.read(hva, 1) == b"\0"
        else:  # mmget_not_zero trusts the caller not to be a kernel thread
            vfio_dma_rw(dev, 0, b"k", True)
            assert space.read(hva, 1) == b"k"
        assert g.container_users.value == 0 and g.refs.value == 1
    finally:
        g.unset_container()
        g.remove()
        space.close()


# -- lock counts, from the lock statistics themselves ---------------------------------------------

PER_CALL = ("vfio.group_lock", "group.unbound_lock", "group.device_lock", "group.mutex")


def _expected(kwargs: dict[str, str], n: int, *, per_call: bool, reader: bool, mm: bool) -> dict[str, int]:
    """Lock classes one call takes, times ``n``."""
    out = dict.fromkeys(PER_CALL, n) if per_call else {}
    if reader and kwargs["lock"] == "rcu":
        out["iommu.rcu"] = n  # lock-free read side: no iommu.lock at all
    else:
        out["iommu.lock"] = n
    if mm and kwargs["mm_ref"] == "get_task_mm":
        out["task_lock"] = n
    return out


N = 7


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
@pytest.mark.parametrize("size", [64, PAGE_SIZE])
def test_per_call_dma_rw_takes_each_named_lock_once(
    env: Env, container_kwargs: dict[str, str], write: bool, size: int
) -> None:
    buf = bytearray(b"w" * size)
    with lockstat.collect() as stats:
        for _ in range(N):
            vfio_dma_rw(env.device, PAGE_SIZE, buf, write)
    assert stats.counts() == _expected(container_kwargs, N, per_call=True, reader=True, mm=True)


def test_per_call_pin_and_unpin_take_each_named_lock_once(
    env: Env, container_kwargs: dict[str, str]
) -> None:
    with lockstat.collect() as pin:
        for i in range(N):
            vfio_pin_pages(env.device, i * PAGE_SIZE, 1, Prot.READ)
    with lockstat.collect() as unpin:
        for i in range(N):
            vfio_unpin_pages(env.device, i * PAGE_SIZE, 1)
    # pin/unpin change the mapping's pin counts: the write side, iommu.lock for every strategy
    assert pin.counts() == _expected(container_kwargs, N, per_call=True, reader=False, mm=True)
    assert unpin.counts() == _expected(container_kwargs, N, per_call=True, reader=False, mm=False)


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
def test_external_user_takes_only_the_iommu_lock(
    env: Env, container_kwargs: dict[str, str], write: bool
) -> None:
    u = env.user()
    buf = bytearray(64)
    with lockstat.collect() as stats:
        for _ in range(N):
            u.dma_rw(PAGE_SIZE, buf, write)
    assert stats.counts() == _expected(container_kwargs, N, per_call=False, reader=True, mm=True)
    with lockstat.collect() as pins:
        u.pin_pages(0, 1, Prot.READ)
        u.unpin_pages(0, 1)
    assert "vfio.group_lock" not in pins.counts()
    assert pins.counts()["iommu.lock"] == 2


def test_external_user_open_and_close_take_the_group_locks_once(env: Env) -> None:
    with lockstat.collect() as stats:
        with ExternalUser.from_device(env.device):
            pass
    assert stats.counts() == dict.fromkeys(PER_CALL, 1)


def test_lock_table_rows_time_every_acquisition(env: Env, container_kwargs: dict[str, str]) -> None:
    with lockstat.collect() as stats:
        for _ in range(N):
            vfio_dma_rw(env.device, 0, bytearray(64), False)
    rows = {r["name"]: r for r in stats.table()}
    assert set(rows) == set(_expected(container_kwargs, 1, per_call=True, reader=True, mm=True))
    for r in rows.values():
        assert r["count"] == N
        assert r["total_ns"] >= 0 and r["avg_ns"] == r["total_ns"] / N
        assert r["total_cycles"] == pytest.approx(lockstat.ns_to_cycles(r["total_ns"]))
    assert list(rows)[:4] == list(PER_CALL)  # the 2020 kernel's order


def test_kvm_path_takes_only_kvm_srcu(make_vm: Callable[[AddressSpace], Vm]) -> None:
    space = AddressSpace()
    hva = space.mmap(4 * PAGE_SIZE)
    vm = make_vm(space)
    vm.set_memslot(0, 0, 4 * PAGE_SIZE, hva, dirty_log=True)
    try:
        with lockstat.collect() as stats:
            for _ in range(N):
                vm.write_guest(0x1000, b"z" * 64)
                vm.read_guest(0x1000, 64)
        assert stats.counts() == {"kvm.srcu": 2 * N}
        assert [r["name"] for r in stats.table()] == ["kvm.srcu"]
    finally:
        vm.close()
        space.close()


def test_threads_on_both_paths_count_exactly(env: Env, container_kwargs: dict[str, str]) -> None:
    threads, calls = 4, 25
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            start.wait()
            with ExternalUser.from_device(env.device) as u:
                for k in range(calls):
                    iova = (i * 2 + k % 2) * PAGE_SIZE
                    vfio_dma_rw(env.device, iova, bytes([i]) * 64, True)
                    assert u.dma_read(iova, 64) == bytes([i]) * 64
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    with lockstat.collect() as stats:
        ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not errors, errors
    total = threads * calls
    got = stats.counts()
    for name in PER_CALL:  # per call, plus the handle's open
        assert got[name] == total + threads, name
    reads = "iommu.rcu" if container_kwargs["lock"] == "rcu" else "iommu.lock"
    assert got[reads] == 2 * total  # one write per call, one read through the handle
    if container_kwargs["mm_ref"] == "get_task_mm":
        assert got["task_lock"] == 2 * total
    else:
        assert "task_lock" not in got
    assert env.group.container_users.value == 0 and env.group.refs.value == 1


def test_unset_container_races_per_call_users(env: Env) -> None:
    """Detach succeeds only between calls; afterwards every call is EINVAL, none half-done."""
    stop = threading.Event()
    outcomes: list[int] = []

    def user() -> None:
        while not stop.is_set():
            try:
                vfio_dma_rw(env.device, 0x1000, b"r" * 16, True)
                outcomes.append(0)
            except DmaError as e:
                outcomes.append(e.errno or -1)
                if e.errno == errno.EINVAL:
                    return

    t = threading.Thread(target=user)
    t.start()
    detached = False
    while not detached:
        try:
            env.group.unset_container()
            detached = True
        except DmaError as e:
            assert e.errno == errno.EBUSY
    t.join(timeout=30)
    stop.set()
    assert not t.is_alive()
    assert set(outcomes) <= {0, errno.EINVAL} and outcomes[-1] == errno.EINVAL
    assert env.group.container_users.value == 0 and env.group.refs.value == 1


# -- a random walk over the API, checked against a model of the references ------------------------

ACTIONS = st.lists(
    st.sampled_from(["open", "close", "rw", "pin", "unpin", "unbind", "bind", "detach", "attach"]),
    max_size=30,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=ACTIONS)
def test_random_walk_keeps_references_consistent(
    make_container: MakeContainer,
    make_group: MakeGroup,
    container_kwargs: dict[str, str],
    actions: list[str],
) -> None:
    e = make_env(make_container, make_group, container_kwargs, tracking=False)
    open_users: list[ExternalUser] = []
    pins = 0
    try:
        for a in actions:
            attached = e.group.container is not None
            viable = e.device.bound
            ok = attached and viable
            before = (e.group.container_users.value, e.group.refs.value, e.container.pinned())
            try:
                if a == "open":
                    open_users.append(ExternalUser.from_device(e.device))
                elif a == "close" and open_users:
                    open_users.pop().close()
                elif a == "rw":
                    vfio_dma_rw(e.device, 0, b"rw", True)
                elif a == "pin":
                    vfio_pin_pages(e.device, 0, 1, Prot.READ)
                    pins += 1
                elif a == "unpin":
                    vfio_unpin_pages(e.device, 0, 1)
                    pins -= 1
                elif a == "unbind":
                    e.device.unbind()
                elif a == "bind":
                    e.device.bind()
                elif a == "detach":
                    e.group.unset_container()
                elif a == "attach":
                    e.group.set_container(e.container)
            except DmaError as err:
                after = (e.group.container_users.value, e.group.refs.value, e.container.pinned())
                assert after == before, (a, err)
                if a in ("open", "rw", "pin") or (a == "unpin" and pins):
                    assert not ok and err.errno == errno.EINVAL
                elif a == "detach":
                    assert err.errno == (errno.EBUSY if attached else errno.EINVAL)
                    assert err.errno != errno.EBUSY or open_users
                elif a == "attach":
                    assert attached and err.errno == errno.EBUSY
                else:
                    assert a == "unpin" and pins == 0 and err.errno == errno.EINVAL
            else:
                if a in ("open", "rw", "pin", "unpin", "detach"):
                    assert ok or a == "detach"
                if a == "detach":
                    assert not open_users
            assert e.group.container_users.value == len(open_users)
            assert e.group.refs.value == 1 + len(open_users)
            assert sum(e.container.pinned().values()) == pins
    finally:
        for u in open_users:
            u.close()
        e.device.bind()
        if e.group.container is None:
            e.group.set_container(e.container)
        while pins:
            vfio_unpin_pages(e.device, 0, 1)
            pins -= 1
        teardown_env(e)


# -- the benchmark's paths are the real ones and agree with each other ---------------------------


def test_bench_paths_runs_every_path_and_writes_json(tmp_path: Any, load_bench: Any) -> None:
    """A tiny run of bench/paths.py: every path reads what every other wrote; JSON schema."""
    import json


    mod = load_bench("paths")
    out = tmp_path / "paths.json"
    assert mod.main(["--rounds", "3", "--passes", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"cycles_source", "timer_overhead_ns", "loop_overhead_ns"} <= set(data["meta"])
    got = {(r["path"], r["op"], r["size"]) for r in data["results"]}
    assert got == {(p, o, s) for p in mod.PATHS for o in mod.OPS for s in mod.SIZES}
    for r in data["results"]:
        assert len(r["samples_ns"]) == 3
        if r["path"] == "kvm":
            assert r["ratio_to_kvm"] == 1.0


# -- unmap_dma racing DMA: nothing lands after unmap returns (every strategy, rcu above all) ------


def _race_unmap_once(env: Env, u: ExternalUser, writers: int = 3) -> None:
    """One race: writers on both paths while the main thread unmaps (see the test below)."""
    warmup, after = 10, 20
    last_ok: dict[int, int] = {}
    fails: dict[int, set[int]] = {i: set() for i in range(writers)}
    warmed = threading.Barrier(writers + 1)
    unmapped = threading.Event()
    errors: list[BaseException] = []

    def write(i: int, seq: int) -> None:
        data = seq.to_bytes(8, "little")
        iova = 0x1000 + i * 64
        if i % 2:
            vfio_dma_rw(env.device, iova, data, True)  # the per-call path
        else:
            u.dma_write(iova, data)  # the external-user path

    def writer(i: int) -> None:
        try:
            seq = 0
            for seq in range(1, warmup + 1):
                write(i, seq)
                last_ok[i] = seq
            warmed.wait()
            refused_after_unmap = 0
            while refused_after_unmap < after:
                seq += 1
                seen_unmapped = unmapped.is_set()
                try:
                    write(i, seq)
                    last_ok[i] = seq
                    assert not seen_unmapped, f"writer {i}: write {seq} landed after unmap"
                except DmaError as e:
                    fails[i].add(e.errno or 0)
                    refused_after_unmap += seen_unmapped
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for t in ts:
        t.start()
    warmed.wait()
    assert env.container.unmap_dma(0, SIZE) == SIZE
    at_return = {i: env.space.read(env.hva + 0x1000 + i * 64, 8) for i in range(writers)}
    unmapped.set()
    for t in ts:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in ts)
    assert not errors, errors
    for i in range(writers):
        assert int.from_bytes(at_return[i], "little") == last_ok[i], f"writer {i}"
        assert env.space.read(env.hva + 0x1000 + i * 64, 8) == at_return[i]
        assert fails[i] == {errno.EINVAL}  # "not mapped", nothing else


def test_unmap_races_external_user_and_per_call_writers(env: Env) -> None:
    """Writers hammer the mapping while it is unmapped, several times over.

    Every write that succeeded had found the mapping, so unmap waited for it (a grace period
    under rcu, the lock otherwise): at the moment ``unmap_dma`` returns, each writer's slot
    holds the value of its last successful write, and no later write ever lands.  A tiny
    thread switch interval makes the interpreter interleave inside the accesses.
    """
    u = env.user()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(5):
            _race_unmap_once(env, u)
            env.container.map_dma(0, SIZE, env.hva, env.space, Prot.READ | Prot.WRITE)
    finally:
        sys.setswitchinterval(old)
    assert env.group.container_users.value == 1  # the handle's own
    assert env.group.refs.value == 2


def test_process_shared_group_lock_is_still_the_named_class(env: Env) -> None:
    """``set_group_lock`` swaps in a host-wide lock (the lab's VMs share one); same counts."""
    import multiprocessing

    from dmarw import set_group_lock, vfio

    saved = vfio._registry.lock
    set_group_lock(multiprocessing.Lock())
    try:
        with lockstat.collect() as stats:
            vfio_dma_rw(env.device, 0, b"shared", True)
        assert stats.counts()["vfio.group_lock"] == 1
        assert env.space.read(env.hva, 6) == b"shared"
    finally:
        set_group_lock(saved)


def test_group_reference_counters_are_exact_under_threads(make_group: MakeGroup) -> None:
    """``container_users``/``refs`` are lock-free counters: concurrent inc/dec lose nothing."""
    g = make_group(unique("counters"))
    a = g.refs  # starts at 1: the registry's own reference
    go = threading.Barrier(4)

    def churn(k: int) -> None:
        go.wait()
        for _ in range(5000):
            a.inc()
            if k % 2:
                a.dec()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        ts = [threading.Thread(target=churn, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert a.value == 1 + 2 * 5000
    for _ in range(2 * 5000):
        a.dec()
    g.remove()
