"""Build of dmarw's native core, ``dmarw._native`` (all metadata lives in pyproject.toml).

The extension is optional: if the C compiler fails, the install still succeeds and dmarw
runs on the pure-Python core (``DMARW_CORE=native`` then fails loudly at import).
``DMARW_SANITIZE=1`` builds it with AddressSanitizer and UndefinedBehaviorSanitizer
(``make asan``).

The guest program (``src/dmarw/guest/guest.c``) is built beside it, by the same
``build_ext`` step, into ``dmarw/guest/guest.bin`` (in the source tree for an editable or
in-place build); a failed guest build warns and leaves ``dmarw guest`` unusable.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]
LDFLAGS: list[str] = []
if os.environ.get("DMARW_SANITIZE") == "1":
    CFLAGS += ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined"]
    LDFLAGS += ["-fsanitize=address,undefined"]


class build_ext_and_guest(build_ext):
    """build_ext, then the guest image (dmarw/guest/build.py, loaded by path)."""

    def run(self) -> None:
        super().run()
        here = Path(__file__).resolve().parent
        src = here / "src" / "dmarw" / "guest"
        spec = importlib.util.spec_from_file_location("_dmarw_guest_build", src / "build.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        inplace = self.inplace or getattr(self, "editable_mode", False)
        out = src if inplace else Path(self.build_lib) / "dmarw" / "guest"
        try:
            print(f"dmarw guest image: {mod.build(out, src)}")
        except mod.GuestBuildError as e:
            print(f"warning: the dmarw guest image did not build: {e}")


setup(
    cmdclass={"build_ext": build_ext_and_guest},
    ext_modules=[
        Extension(
            "dmarw._native",
            sources=["src/dmarw/_native.c"],
            extra_compile_args=CFLAGS,
            extra_link_args=LDFLAGS,
            optional=os.environ.get("DMARW_SANITIZE") != "1",
        ),
        # the vCPU exit loop of dmarw.vmm (optional too: without it KvmVm reports EOPNOTSUPP)
        Extension(
            "dmarw._vmm",
            sources=sorted(glob.glob("src/dmarw/_vmm/*.c")),
            depends=["src/dmarw/_vmm/vmm.h"],
            include_dirs=["src/dmarw/_vmm"],
            extra_compile_args=CFLAGS,
            extra_link_args=LDFLAGS,
            optional=os.environ.get("DMARW_SANITIZE") != "1",
        ),
    ]
)
