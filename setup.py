"""Build of dmarw's native extensions (all metadata lives in pyproject.toml).

``dmarw._native`` (the native core) is built from the C files of ``src/dmarw/_native/``.
It is optional: if the C compiler fails, the install still succeeds, dmarw runs on the
pure-Python core, and a loud warning says so at the end of the build, on stderr and on the
terminal (pip hides a successful build's output; ``make test`` fails
on a missing native core).  ``DMARW_SANITIZE=1`` builds it with AddressSanitizer and
UndefinedBehaviorSanitizer (``make asan``).  More extensions are appended to
``EXTENSIONS``.

The guest program (``src/dmarw/guest/guest.c``) is built by the same ``build_ext`` step
into ``dmarw/guest/guest.bin`` (in the source tree for an editable or in-place build); a
failed guest build warns as loudly and leaves ``dmarw guest`` unusable.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SANITIZE = os.environ.get("DMARW_SANITIZE") == "1"
CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]
LDFLAGS: list[str] = []
if SANITIZE:
    CFLAGS += ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined"]
    LDFLAGS += ["-fsanitize=address,undefined"]

NATIVE_DIR = "src/dmarw/_native"
EXTENSIONS = [
    Extension(
        "dmarw._native",
        sources=sorted(glob.glob(f"{NATIVE_DIR}/*.c")),
        depends=[f"{NATIVE_DIR}/dmarw.h"],
        include_dirs=[NATIVE_DIR],
        extra_compile_args=CFLAGS,
        extra_link_args=LDFLAGS,
        optional=not SANITIZE,
    ),
    # the vCPU exit loop of dmarw.vmm (optional too: without it KvmVm reports EOPNOTSUPP)
    Extension(
        "dmarw._vmm",
        sources=["src/dmarw/vmm/_vmm.c"],
        extra_compile_args=CFLAGS,
        extra_link_args=LDFLAGS,
        optional=not SANITIZE,
    ),
]

BANNER = """
{rule}
WARNING: the native core of dmarw ({name}) could not be built:
  {error}
dmarw is installed and runs on the pure-Python core, about 7x slower per access.
Install a C compiler and the Python headers (e.g. apt-get install gcc python3-dev),
then reinstall: pip install -e .
{rule}
"""


def _shout(text: str) -> None:
    """To stderr and, since pip hides a successful build's output, to the terminal itself."""
    sys.stderr.write(text)
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(text)
    except OSError:  # no terminal (CI): stderr is all there is
        pass


def _build_guest(cmd: build_ext) -> None:
    """The guest image (dmarw/guest/build.py, loaded by path: the package is not importable yet)."""
    src = Path(__file__).resolve().parent / "src" / "dmarw" / "guest"
    spec = importlib.util.spec_from_file_location("_dmarw_guest_build", src / "build.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    inplace = cmd.inplace or getattr(cmd, "editable_mode", False)
    out = src if inplace else Path(cmd.build_lib) / "dmarw" / "guest"
    try:
        print(f"dmarw guest image: {mod.build(out, src)}")
    except mod.GuestBuildError as e:
        rule = "!" * 78
        _shout(f"\n{rule}\nWARNING: the dmarw guest image did not build: {e}\n"
               f"`dmarw guest` and the real-VM tests cannot run without it.\n{rule}\n")


class BuildExt(build_ext):
    """build_ext that says loudly, at the end, which optional extension did not build, then
    builds the guest image."""

    def run(self) -> None:
        self._missing: list[tuple[str, str]] = []
        super().run()
        for name, error in self._missing:
            _shout(BANNER.format(rule="!" * 78, name=name, error=error))
        _build_guest(self)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:  # setuptools' optional handling prints one easy-to-miss line
            if not getattr(ext, "optional", False):
                raise
            self._missing.append((ext.name, str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__))


setup(ext_modules=EXTENSIONS, cmdclass={"build_ext": BuildExt})
