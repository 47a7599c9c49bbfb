"""``dmarw incoming`` as a subprocess for the TCP migration tests: started on 127.0.0.1 port 0,
its address read from its first stderr line; every wait bounded, and the process reaped on
every path (:meth:`Incoming.close`, also when it could not start)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path


class Incoming:
    """One destination process, listening once ``addr`` is known (the constructor waits for
    it unless ``listen_later``: then ``addr`` does); ``finish()`` gives its exit code and the
    rest of its stderr."""

    def __init__(self, key_file: Path, *, timeout: float, wait: float, env: dict[str, str] | None = None,
                 listen_later: bool = False) -> None:
        self.wait = wait
        self.started = time.monotonic()
        self._addr: str | None = None
        self._reader: threading.Thread | None = None
        self._rest: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dmarw", "incoming", "--listen", "127.0.0.1:0", "--key-file", str(key_file),
             "--timeout", f"{timeout:g}"],
            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            env=None if env is None else {**os.environ, **env},
        )
        if not listen_later:
            self.listening()

    @property
    def addr(self) -> str:
        """``HOST:PORT`` it listens on."""
        return self.listening()

    def listening(self) -> str:
        """Wait for its first line (once): the address it listens on; killed and reaped
        when that line is not there."""
        if self._addr is None:
            try:
                assert self.proc.stderr is not None
                line = self.proc.stderr.readline()  # ends at the first line or at its exit
                m = re.search(r"listening on (\S+)", line)
                assert m, f"dmarw incoming said {line!r}"
            except BaseException:
                self.close()
                raise
            self._addr = m.group(1)
            self._drain()
        return self._addr

    def _drain(self) -> None:
        """Its stderr read as it comes, so finish() waits on the process alone."""
        self._reader = threading.Thread(target=self._read_rest, name="incoming-stderr", daemon=True)
        self._reader.start()

    def _read_rest(self) -> None:
        assert self.proc.stderr is not None
        self._rest.append(self.proc.stderr.read())

    def finish(self) -> tuple[int, str]:
        """Its exit code (negative: the signal that ended it) and stderr after the first
        line; killed when it has not exited within ``wait`` s (then the wait fails)."""
        if self._reader is None:  # its address was read elsewhere (e.g. by a forked child)
            self._drain()
        try:
            rc = self.proc.wait(self.wait)
        finally:
            self.close()
        return rc, "".join(self._rest)

    def close(self) -> None:
        """Kill it unless it has exited, and reap it; safe to call again."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self._reader is not None:
            self._reader.join(self.wait)
        if self.proc.stderr is not None and (self._reader is None or not self._reader.is_alive()):
            self.proc.stderr.close()
