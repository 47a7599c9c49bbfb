"""Tiny test guests from readable assembly: ``as --32`` + ``ld`` + ``objcopy`` (binutils).

``assemble(text, origin)`` returns the flat binary of ``text`` linked at ``origin`` (the
guest-physical address it is loaded at); results are cached per source text.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

TOOLS = ("as", "ld", "objcopy")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


@functools.cache
def assemble(text: str, origin: int = 0, bits: int = 32) -> bytes:
    """Flat binary of GNU-assembler ``text`` (``.code32`` or ``.code16``) linked at ``origin``."""
    with tempfile.TemporaryDirectory(prefix="dmarw-asm-") as d:
        src, obj, elf, out = (Path(d) / n for n in ("g.s", "g.o", "g.elf", "g.bin"))
        src.write_text(f".code{bits}\n.text\n.globl _start\n_start:\n{text}\n")
        subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True, capture_output=True, text=True)
        subprocess.run(["ld", "-m", "elf_i386", "-e", "_start", f"-Ttext={origin:#x}", "-o", str(elf), str(obj)],
                       check=True, capture_output=True, text=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(elf), str(out)], check=True,
                       capture_output=True, text=True)
        return out.read_bytes()
