"""``dmarw incoming`` as a subprocess for the TCP migration tests: started on 127.0.0.1 port 0,
its address read from its first stderr line; every wait bounded."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


class Incoming:
    """One destination process; ``finish()`` gives its exit code and the rest of its stderr."""

    def __init__(self, key_file: Path, *, timeout: float, wait: float) -> None:
        self.wait = wait
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dmarw", "incoming", "--listen", "127.0.0.1:0", "--key-file", str(key_file),
             "--timeout", f"{timeout:g}"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        m = re.search(r"listening on (\S+)", line)
        assert m, line
        self.addr = m.group(1)

    def finish(self) -> tuple[int, str]:
        assert self.proc.stderr is not None
        try:
            err = self.proc.stderr.read()
            rc = self.proc.wait(self.wait)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return rc, err
