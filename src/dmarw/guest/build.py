"""Build the guest program from its source: ``guest.c`` + ``guest.ld`` → ``guest.bin``.

Standard library only: ``setup.py`` loads this file by path (before dmarw is importable)
and calls :func:`build` beside the native extension; the tests call it into a temporary
directory.  A flat binary, loaded at :data:`LOAD_GPA`; its writable part (``.data`` and
``.bss``) must end below the parameter block at :data:`LIMIT_GPA`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("guest.c", "guest.ld")
BINARY = "guest.bin"
LOAD_GPA = 0x1000
LIMIT_GPA = 0xF000  # the parameter block's page

CFLAGS = (
    "-m32", "-march=i686", "-ffreestanding", "-fno-pic", "-fno-pie", "-nostdlib", "-O2",
    "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fno-builtin",
    "-mno-sse", "-mno-mmx", "-mgeneral-regs-only", "-Wall", "-Wextra", "-Werror", "-std=gnu11",
)


class GuestBuildError(RuntimeError):
    """The guest did not build (the compiler's message is in the text)."""


def _run(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise GuestBuildError(f"guest build: {cmd[0]} not found ({e})") from e
    if p.returncode != 0:
        raise GuestBuildError(f"guest build: {' '.join(cmd)} failed:\n{p.stderr.strip()}")
    return p.stdout


def tools() -> dict[str, str | None]:
    """The build tools this machine has (``None`` where one is missing)."""
    cc = os.environ.get("CC", "gcc")
    return {name: shutil.which(name) for name in (cc, "ld", "objcopy", "nm")}


def build(out_dir: str | Path, src_dir: str | Path = HERE) -> Path:
    """Compile, link and flatten the guest into ``out_dir/guest.bin``; returns its path."""
    src = Path(src_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "gcc")
    with tempfile.TemporaryDirectory(prefix="dmarw-guest-") as tmp:
        obj = os.path.join(tmp, "guest.o")
        elf = os.path.join(tmp, "guest.elf")
        flat = os.path.join(tmp, BINARY)
        _run([cc, *CFLAGS, "-c", str(src / "guest.c"), "-o", obj])
        _run(["ld", "-m", "elf_i386", "-nostdlib", "--build-id=none", "-T", str(src / "guest.ld"),
              obj, "-o", elf])
        syms = {}
        for line in _run(["nm", elf]).splitlines():
            parts = line.split()
            if len(parts) == 3:
                syms[parts[2]] = int(parts[0], 16)
        if syms.get("_start") != LOAD_GPA:
            raise GuestBuildError(f"guest build: _start at {syms.get('_start')!r}, not {LOAD_GPA:#x}")
        end = syms.get("__rw_end", 1 << 32)
        if end > LIMIT_GPA:
            raise GuestBuildError(f"guest build: image ends at {end:#x}, past {LIMIT_GPA:#x}")
        _run(["objcopy", "-O", "binary", elf, flat])
        dest = out / BINARY
        shutil.copyfile(flat, dest)
    return dest


if __name__ == "__main__":  # python -m dmarw.guest.build [OUT_DIR]
    import sys

    print(build(sys.argv[1] if len(sys.argv) > 1 else HERE))
