"""dmarw's guest program: source (``guest.c``, ``guest.ld``), build, loader and result port.

The guest is built from source by the package's build (``setup.py`` runs
:func:`dmarw.guest.build.build` beside the native extension) into ``guest.bin`` in this
package; nothing binary is kept in the repository.  :func:`load` writes the image and the
parameter block (:class:`~dmarw.guest.params.Params`) into guest memory; the vCPU then
starts at :data:`~dmarw.guest.params.LOAD_GPA` in 32-bit flat protected mode.  The guest
reports through :class:`ResultPort` (``out`` to :data:`~dmarw.guest.params.RESULT_PORT`).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import fail
from .build import BINARY, LIMIT_GPA
from .params import LOAD_GPA, PARAMS_GPA, PARAMS_STRUCT, PARAMS_VERSION, Params

__all__ = ["GuestFault", "Params", "Result", "ResultPort", "image", "image_path", "load"]

RESULT_HELLO = 0x48454C4F
RESULT_DONE = 0x454E4F44
RESULT_FAULT = 0x544C5546
FAULTS = {1: "bad parameter block", 2: "device reported an error", 3: "ring too small for the batch"}

WriteGuest = Callable[[int, bytes], None]


def image_path() -> Path:
    return Path(__file__).resolve().parent / BINARY


def image() -> bytes:
    """The built guest image (``ENOENT`` if the package was installed without building it)."""
    p = image_path()
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise fail(errno.ENOENT, f"guest image {p} is not built: reinstall dmarw "
                   "(pip install -e .) with gcc, ld and objcopy present") from None
    if not data or LOAD_GPA + len(data) > LIMIT_GPA:
        raise fail(errno.ENOEXEC, f"guest image {p}: {len(data):#x} bytes does not fit "
                   f"[{LOAD_GPA:#x}, {LIMIT_GPA:#x})")
    return data


def load(write: WriteGuest, params: Params, img: bytes | None = None) -> None:
    """Write the image at ``LOAD_GPA`` (zero-filled up to the parameter block) and the
    parameter block at ``PARAMS_GPA`` through ``write(gpa, data)`` (e.g. the VM's
    ``write_guest``, or a raw host mapping)."""
    data = image() if img is None else img
    write(LOAD_GPA, data + bytes(LIMIT_GPA - LOAD_GPA - len(data)))
    write(PARAMS_GPA, params.pack())


class GuestFault(RuntimeError):
    """The guest stopped on a fault it reported through the result port."""


@dataclass
class Result:
    """What the guest reported: the hello word; at the end the checksum, the commands it
    issued, and its own rdtsc timings of MMIO probes and doorbells, and its WAIT count."""

    hello: int | None = None
    checksum: int | None = None
    commands: int | None = None
    probes: int = 0
    probe_cycles: int = 0
    doorbells: int = 0
    doorbell_cycles: int = 0
    waits: int = 0
    fault: int | None = None
    words: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.checksum is not None

    def check(self) -> int:
        """The checksum, or :class:`GuestFault` naming what went wrong."""
        if self.fault is not None:
            raise GuestFault(f"guest fault {self.fault}: {FAULTS.get(self.fault, 'unknown')}")
        if self.hello != (PARAMS_VERSION << 16 | PARAMS_STRUCT.size):
            raise GuestFault(f"guest hello {self.hello!r}: the image and dmarw.guest.params "
                             f"disagree on the parameter block (want v{PARAMS_VERSION}, "
                             f"{PARAMS_STRUCT.size} bytes)")
        if self.checksum is None:
            raise GuestFault(f"guest did not finish (reported {self.words!r})")
        return self.checksum


class ResultPort:
    """The guest's result port as a PIO device: ``pio_write`` collects 32-bit words."""

    def __init__(self) -> None:
        self.result = Result()
        self._pending: list[int] = []
        self._expect = 0
        self._kind = 0

    def pio_read(self, offset: int, size: int) -> int:
        return 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        r = self.result
        r.words.append(value)
        if self._expect:
            self._pending.append(value)
            self._expect -= 1
            if self._expect == 0:
                self._finish()
            return
        if value in (RESULT_HELLO, RESULT_FAULT, RESULT_DONE):
            self._kind = value
            self._expect = {RESULT_HELLO: 1, RESULT_FAULT: 1, RESULT_DONE: 10}[value]
            self._pending = []

    def _finish(self) -> None:
        r, p = self.result, self._pending
        if self._kind == RESULT_HELLO:
            r.hello = p[0]
        elif self._kind == RESULT_FAULT:
            r.fault = p[0]
        else:
            r.checksum = p[0] | p[1] << 32
            r.commands = p[2]
            r.probes, r.probe_cycles = p[3], p[4] | p[5] << 32
            r.doorbells, r.doorbell_cycles = p[6], p[7] | p[8] << 32
            r.waits = p[9]

    # save/restore: a run stopped mid-way resumes with the words it had
    def save(self) -> bytes:
        words = self.result.words
        return struct.pack(f"<I{len(words)}I", len(words), *words)

    def restore(self, data: bytes) -> None:
        (n,) = struct.unpack_from("<I", data)
        words = struct.unpack_from(f"<{n}I", data, 4)
        self.__init__()  # type: ignore[misc]
        for w in words:
            self.pio_write(0, 4, w)
