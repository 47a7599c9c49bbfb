"""Build of dmarw's native core, ``dmarw._native`` (all metadata lives in pyproject.toml).

The extension is optional: if the C compiler fails, the install still succeeds and dmarw
runs on the pure-Python core (``DMARW_CORE=native`` then fails loudly at import).
``DMARW_SANITIZE=1`` builds it with AddressSanitizer and UndefinedBehaviorSanitizer
(``make asan``).
"""

from __future__ import annotations

import glob
import os

from setuptools import Extension, setup

CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]
LDFLAGS: list[str] = []
if os.environ.get("DMARW_SANITIZE") == "1":
    CFLAGS += ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined"]
    LDFLAGS += ["-fsanitize=address,undefined"]

setup(
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
