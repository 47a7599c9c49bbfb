"""How the tests make a core's objects: the one place that names the cores' constructors.

Tests import these helpers as ``from cores import ...``; ``conftest.py`` turns them into the
``core`` / ``make_container`` / ``make_vm`` / ``make_group`` / ``make_bitmap`` fixtures.
(Never ``from conftest import``: several folders have a ``conftest.py``, and which one the
module name ``conftest`` means depends on the collection order.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

import dmarw


def _native_missing() -> str | None:
    """Why the native core cannot run here, or None when it can."""
    import importlib.machinery

    try:
        import dmarw._native as ext
    except ImportError as e:
        return f"the native core dmarw._native is not built ({e}); run `pip install -e .` with a C compiler"
    origin = getattr(ext, "__file__", None) or ""
    if not origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):  # e.g. only the C sources
        return "the native core dmarw._native is not built (no extension module); run `pip install -e .` with a C compiler"
    return None


NATIVE_MISSING = _native_missing()
CORES = [
    pytest.param("python", id="python"),
    pytest.param(
        "native",
        id="native",
        marks=pytest.mark.skipif(NATIVE_MISSING is not None, reason=str(NATIVE_MISSING)),
    ),
]


def new_container(core: str, **kwargs: Any) -> dmarw.Container:
    """A container of ``core`` (``lock=``, ``mm_ref=``, ``pgsize=`` as the API takes them)."""
    return dmarw.Container(core=core, **kwargs)


def new_vm(space: dmarw.AddressSpace, core: str) -> dmarw.Vm:
    """A VM of ``core`` over ``space``."""
    return dmarw.Vm(space, core=core)


def new_group(name: str, core: str) -> dmarw.Group:
    """A VFIO group of ``core``."""
    return dmarw.Group(name, core=core)


# -- the dirty bitmaps ----------------------------------------------------------------------

BITMAP_PAGES = 1 << 15  # pages of the fixed-size (native) bitmap: more than any test marks


def new_bitmap(kind: str, pages: Iterable[int] = ()) -> Any:
    """A dirty bitmap of ``kind`` holding ``pages``."""
    from dmarw.bitmap import NO_DIRTY, DirtyBitmap, NoDirty

    if kind == "DirtyBitmap":
        return DirtyBitmap(pages)
    if kind == "NoDirty":
        assert not list(pages)
        return NoDirty()
    if kind == "NO_DIRTY":
        assert not list(pages)
        return NO_DIRTY
    if kind == "native":
        from dmarw.native import NativeDirtyBitmap

        return NativeDirtyBitmap(BITMAP_PAGES, pages)
    raise AssertionError(kind)


def _native_param(value: str) -> Any:
    return pytest.param(
        value,
        id=value,
        marks=pytest.mark.skipif(NATIVE_MISSING is not None, reason=str(NATIVE_MISSING)),
    )


BITMAP_KINDS = [
    pytest.param("DirtyBitmap", id="DirtyBitmap"),
    pytest.param("NoDirty", id="NoDirty"),
    pytest.param("NO_DIRTY", id="NO_DIRTY"),
    _native_param("native"),
]
TRACKING_BITMAP_KINDS = [BITMAP_KINDS[0], BITMAP_KINDS[3]]
