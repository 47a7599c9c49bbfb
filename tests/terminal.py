"""Children started as from a terminal: Ctrl-C (SIGINT) delivered, not ignored.

A shell without job control starts a background command with SIGINT ignored, and Python
keeps an inherited ignored SIGINT ignored, so a test that sends SIGINT to a child it
started from such a shell (``make test &`` in a script) would see nothing happen.
"""

from __future__ import annotations

import signal


def sigint_default() -> None:
    """A ``preexec_fn``: the child's SIGINT back to its default action (Python then installs
    its own handler, as it does under a terminal)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
