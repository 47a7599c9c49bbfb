"""``dmarw serve --device NAME SOCKET``: a device model as a vfio-user server."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable

from .. import exitcodes
from ..errors import DmaError
from .device import Device
from .server import Server, stderr_log


def _sample() -> Device:
    from .sample import SampleDevice

    return SampleDevice()


def _gpu() -> Device:
    from .gpu import GpuVfioDevice

    return GpuVfioDevice()


DEVICES: dict[str, Callable[[], Device]] = {"sample": _sample, "gpu": _gpu}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a device model to a VMM over vfio-user (a UNIX socket)",
        description="Serve a Python device model as a vfio-user server on SOCKET, one client "
        "at a time. --once: serve one client and exit when it disconnects (0 if all went "
        "well). Ctrl-C exits 130, SIGTERM 143; the socket file is removed.",
    )
    p.add_argument("--device", required=True, choices=sorted(DEVICES), help="the device model")
    p.add_argument("--once", action="store_true", help="serve one client, then exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log every error and connection on stderr")
    p.add_argument("socket", metavar="SOCKET", help="the UNIX socket path to listen on")
    p.set_defaults(func=run)


class _Terminated(Exception):
    """SIGTERM arrived (vfio-user backends must honour it): leave as Ctrl-C does."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def run(args: argparse.Namespace) -> int:
    device = DEVICES[args.device]()
    server = Server(args.socket, device, log=stderr_log() if args.verbose else None)
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        try:
            server.listen()
        except DmaError as e:
            raise SystemExit(f"dmarw serve: {e}") from None
        with server:
            print(f"dmarw serve: {args.device} device on {args.socket}", file=sys.stderr, flush=True)
            if args.once:
                return 0 if server.serve_one() else 1
            server.serve_forever()
    except KeyboardInterrupt:
        print("dmarw serve: interrupted", file=sys.stderr)
        return exitcodes.INTERRUPTED
    except _Terminated:
        print("dmarw serve: terminated", file=sys.stderr)
        return exitcodes.TERMINATED
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        device.close()
    return 0
