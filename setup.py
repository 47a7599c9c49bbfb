"""Build of dmarw's native extensions (all metadata lives in pyproject.toml).

``dmarw._native`` (the native core) is built from the C files of ``src/dmarw/_native/``.
It is optional: if the C compiler fails, the install still succeeds, dmarw runs on the
pure-Python core, and a loud warning says so at the end of the build, on stderr and on the
terminal (pip hides a successful build's output; ``make test`` fails
on a missing native core).  ``DMARW_SANITIZE=1`` builds it with AddressSanitizer and
UndefinedBehaviorSanitizer (``make asan``).  More extensions are appended to
``EXTENSIONS``.
"""

from __future__ import annotations

import glob
import os
import sys

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


class BuildExt(build_ext):
    """build_ext that says loudly, at the end, which optional extension did not build."""

    def run(self) -> None:
        self._missing: list[tuple[str, str]] = []
        super().run()
        for name, error in self._missing:
            _shout(BANNER.format(rule="!" * 78, name=name, error=error))

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:  # setuptools' optional handling prints one easy-to-miss line
            if not getattr(ext, "optional", False):
                raise
            self._missing.append((ext.name, str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__))


setup(ext_modules=EXTENSIONS, cmdclass={"build_ext": BuildExt})
