"""The ``core`` fixture itself: the contract suites really build objects of the core under test.

Guards the one place that makes a core's objects (``tests/conftest.py``): were it to build
the same core for both ids, every contract suite would silently test one core twice.
"""

from __future__ import annotations

from collections.abc import Callable

from dmarw import AddressSpace, Container, Group, Vm


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
