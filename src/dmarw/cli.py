"""The ``dmarw`` command: each subcommand lives with the layer it drives.

Convention for every subcommand (registered in :data:`REGISTRARS`):

* ``register(subparsers)`` adds the subcommand, with help for it and for each flag, and
  sets ``func`` (parsed args -> exit code) as its default.
* Check every input and output (files to read, folders to write into, sizes) before any
  long work starts; a user's mistake is raised, never printed by the subcommand itself:
  ``dmarw.DmaError`` / another ``OSError`` (a file that cannot be opened or written) or
  ``SystemExit("message")``.  ``argparse.ArgumentTypeError`` from a flag's ``type=`` is a
  usage error.
* :func:`main` turns them into one line on stderr, ``dmarw: error: <message>``, and the
  exit code (:mod:`dmarw.exitcodes`): 1 for ``OSError``/``DmaError``/``SystemExit(message)``,
  2 for usage errors (argparse), 130 for Ctrl-C (``KeyboardInterrupt``: one line
  ``dmarw: interrupted``); SIGTERM prints ``dmarw: terminated`` and exits 143 the same way;
  a closed stdout (``dmarw ... | head``) ends quietly with 1.  A subcommand returns 0, 1
  when its own check fails, or 3 when a migration was refused or cancelled.
  No traceback is shown for any of them.  Work that starts processes or shared memory
  cleans them up in ``finally`` blocks, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from . import __version__, demo, exitcodes
from .errors import DmaError
from .guest import cli as guest_cli
from .lab import cli as lab_cli
from .migration import cli as migration_cli
from .vfio_user import attach as vfio_user_attach
from .vfio_user import cli as vfio_user_cli
from .vmm import cli as vmm_cli

PROG = "dmarw"
EXIT_ERROR = exitcodes.FAILED
EXIT_USAGE = exitcodes.USAGE
EXIT_INTERRUPTED = exitcodes.INTERRUPTED

# Each entry: a module function ``register(subparsers)`` that adds one subcommand and sets
# ``func`` (taking the parsed args, returning the exit code) as its default.
REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    demo.register,
    lab_cli.register_reproduce,
    lab_cli.register_bench,
    lab_cli.register_workload,
    migration_cli.register,
    migration_cli.register_incoming,
    vfio_user_cli.register,
    vmm_cli.register,
    guest_cli.register,
    vfio_user_attach.register,
]


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error form (``dmarw: error: ...``, exit 2) on every level."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Device-model DMA to guest memory: a user-space VFIO type1 / KVM lab.",
        epilog=exitcodes.EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for register in REGISTRARS:
        register(sub)
    return parser


def _one_line(err: BaseException) -> str:
    """An error as one line: OSError's ``strerror: filename`` form, else its text."""
    if isinstance(err, OSError) and not isinstance(err, DmaError) and err.filename is not None:
        text = f"{err.strerror}: {err.filename}"
    else:
        text = str(err) or err.__class__.__name__
    return " ".join(text.split())


def fail_line(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    """Parse, run the subcommand, and map every failure to one line and an exit code."""
    _owner[0] = os.getpid()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args = build_parser().parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the exit
        sys.stderr.write(f"{PROG}: interrupted\n")
        return EXIT_INTERRUPTED
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise
        fail_line(re.sub(rf"^{PROG} [a-z-]+: ", "", _one_line(Exception(e.code))))  # "dmarw: error:" says it
        return EXIT_ERROR
    except BrokenPipeError:  # the reader went away (``dmarw ... | head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except OSError as e:  # DmaError is an OSError
        fail_line(_one_line(e))
        return EXIT_ERROR
    except (ValueError, RuntimeError) as e:  # a refusal raised below the CLI (e.g. a core that cannot load)
        fail_line(_one_line(e))
        return EXIT_ERROR
    finally:
        signal.signal(signal.SIGTERM, previous)


_owner = [0]  # the process that installed _on_sigterm


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM ends the run like Ctrl-C does (``finally`` blocks end the VM processes), exit 143.
    A child forked with this handler, ended before it set its own, exits quietly: the
    one line is the parent's."""
    if os.getpid() != _owner[0]:
        os._exit(128 + signum)
    sys.stderr.write(f"{PROG}: terminated\n")
    raise SystemExit(128 + signum)


def entry() -> None:
    """The console script and ``python -m dmarw``."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
