"""The ``dmarw`` command's exit codes: one meaning each, the same for every subcommand.

``main`` (:mod:`dmarw.cli`) maps errors, usage mistakes and signals to them; a subcommand
returns :data:`OK`, :data:`FAILED` (its own check failed: pages or a checksum differ, a
query went unanswered) or, for ``migrate`` and ``incoming``, :data:`MIGRATION_FAILED`.
"""

from __future__ import annotations

OK = 0
FAILED = 1  # a check failed, or a runtime error / refused input (one line on stderr)
USAGE = 2  # argparse: an unknown flag, a value a flag's type refuses
MIGRATION_FAILED = 3  # refused, cancelled or the peer lost: nothing resumed on the destination
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
TERMINATED = 143  # 128 + SIGTERM

EPILOG = (
    "exit status: 0 done (a migration: verified both ways); 1 a check failed (pages or a checksum "
    "differ) or an error (one line on stderr); 2 usage error; 3 migration refused or cancelled "
    "(migrate: the destination refused, died or stopped answering, the source guest kept running; "
    "incoming: the source was refused or its stream broke, nothing resumed); 130 Ctrl-C; "
    "143 SIGTERM."
)
