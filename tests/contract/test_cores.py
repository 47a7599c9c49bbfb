"""Which core an object is: the ``core`` fixture, ``core=``, ``.core``, ``DMARW_CORE``.

The first test guards the one place that makes a core's objects (``tests/conftest.py``):
were it to build the same core for both ids, every contract suite would silently test one
core twice.  The others hold the public classes to one API over both cores: ``core=``
chooses, ``.core`` says, ``isinstance`` holds for both, native is the default,
``DMARW_CORE=python`` selects the reference, a group and its external users take their
container's core and mixing is refused.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

import dmarw
from conftest import NATIVE_MISSING
from dmarw import PAGE_SIZE, AddressSpace, Container, DmaError, Group, Vm


def _core_of(obj: object) -> str:
    """The core an object belongs to, as the API reports it."""
    named = getattr(obj, "core", None)
    if isinstance(named, str):
        return named
    if isinstance(obj, Group):  # until groups say their core: a native group has native state
        return "native" if obj._state is not None else "python"
    return "native" if type(obj).__name__.startswith("Native") else "python"


def test_the_fixtures_build_objects_of_the_core_under_test(
    core: str,
    make_container: Callable[..., Container],
    make_vm: Callable[[AddressSpace], Vm],
    make_group: Callable[[str], Group],
) -> None:
    space = AddressSpace()
    try:
        c = make_container(lock="rcu")
        assert isinstance(c, Container)
        assert _core_of(c) == core
        vm = make_vm(space)
        assert isinstance(vm, Vm)
        assert _core_of(vm) == core
        vm.close()
        g = make_group(f"test_cores-{core}")
        try:
            assert _core_of(g) == core
        finally:
            g.remove()
    finally:
        space.close()


# -- the public classes: one API over both cores ---------------------------------------------


def test_the_public_classes_take_core_and_say_which(core: str) -> None:
    space = AddressSpace()
    try:
        c = dmarw.Container(core=core, lock="rcu")
        assert isinstance(c, dmarw.Container)
        assert c.core == core
        vm = dmarw.Vm(space, core=core)
        assert isinstance(vm, dmarw.Vm)
        assert vm.core == core
        vm.close()
    finally:
        space.close()


@pytest.mark.parametrize("bogus", ["bogus", "natve", 1])
def test_an_unknown_core_is_einval_naming_it(bogus: object) -> None:
    with pytest.raises(DmaError) as info:
        dmarw.Container(core=bogus)  # type: ignore[arg-type]
    assert info.value.errno == errno.EINVAL
    assert repr(bogus) in info.value.detail, str(info.value)


def test_a_group_and_its_external_users_take_the_container_core(core: str) -> None:
    space = AddressSpace()
    hva = space.mmap(PAGE_SIZE)
    c = dmarw.Container(core=core)
    c.map_dma(0, PAGE_SIZE, hva, space)
    g = dmarw.Group(f"test_cores-group-{core}", core=core)
    dev = g.add_device("d")
    try:
        g.set_container(c)
        assert g.core == core
        with dmarw.ExternalUser.from_device(dev) as u:
            assert u.core == core
            u.dma_write(0, b"same core")
            assert u.dma_read(0, 9) == b"same core"
        g.unset_container()
    finally:
        g.remove()
        space.close()


@pytest.mark.skipif(NATIVE_MISSING is not None, reason=str(NATIVE_MISSING))
@pytest.mark.parametrize(("group_core", "container_core"), [("python", "native"), ("native", "python")])
def test_mixing_the_cores_is_refused_with_einval(group_core: str, container_core: str) -> None:
    space = AddressSpace()
    hva = space.mmap(PAGE_SIZE)
    c = dmarw.Container(core=container_core)
    c.map_dma(0, PAGE_SIZE, hva, space)
    g = dmarw.Group(f"test_cores-mixed-{group_core}", core=group_core)
    g.add_device("d")
    try:
        with pytest.raises(DmaError) as info:
            g.set_container(c)
        assert info.value.errno == errno.EINVAL
        assert group_core in info.value.detail and container_core in info.value.detail, str(info.value)
        assert g.container is None
        assert c.mappings() == [(0, PAGE_SIZE, hva, dmarw.Prot.READ | dmarw.Prot.WRITE)]
    finally:
        g.remove()
        space.close()


_REPORT_CORES = """
import json, dmarw
s = dmarw.AddressSpace()
h = s.mmap(4096)
c = dmarw.Container()
c.map_dma(0, 4096, h, s)
vm = dmarw.Vm(s)
g = dmarw.Group("g")
d = g.add_device("d")
g.set_container(c)
u = dmarw.ExternalUser.from_device(d)
print(json.dumps({"container": c.core, "vm": vm.core, "group": g.core, "user": u.core}))
"""


def _run(code: str, core_env: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DMARW_CORE"}
    if core_env is not None:
        env["DMARW_CORE"] = core_env
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(NATIVE_MISSING is not None, reason=str(NATIVE_MISSING))
def test_the_default_core_is_native() -> None:
    p = _run(_REPORT_CORES, None)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == dict.fromkeys(("container", "vm", "group", "user"), "native")


def test_dmarw_core_python_selects_the_reference() -> None:
    p = _run(_REPORT_CORES, "python")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == dict.fromkeys(("container", "vm", "group", "user"), "python")


def test_a_bogus_dmarw_core_does_not_break_import_and_is_einval_when_used() -> None:
    code = (
        "import errno, dmarw\n"
        "try:\n"
        "    dmarw.Container()\n"
        "except dmarw.DmaError as e:\n"
        "    assert e.errno == errno.EINVAL, e\n"
        "    print(e.detail)\n"
    )
    p = _run(code, "bogus")
    assert p.returncode == 0, p.stderr
    assert "bogus" in p.stdout and "DMARW_CORE" in p.stdout, p.stdout
