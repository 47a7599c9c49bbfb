"""The ``dmarw`` command: each subcommand lives with the layer it drives."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from . import demo
from .guest import cli as guest_cli
from .lab import cli as lab_cli
from .migration import cli as migration_cli
from .vfio_user import attach as vfio_user_attach
from .vfio_user import cli as vfio_user_cli
from .vmm import cli as vmm_cli

# Each entry: a module function ``register(subparsers)`` that adds one subcommand and sets
# ``func`` (taking the parsed args, returning the exit code) as its default.
REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    demo.register,
    lab_cli.register_reproduce,
    lab_cli.register_bench,
    lab_cli.register_workload,
    migration_cli.register,
    vfio_user_cli.register,
    vmm_cli.register,
    guest_cli.register,
    vfio_user_attach.register,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmarw",
        description="Device-model DMA to guest memory: a user-space VFIO type1 / KVM lab.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
