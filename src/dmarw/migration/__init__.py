"""Live migration driven by the dirty logs, of a running guest or of replayed writes.

:mod:`.stream` is the wire format (sans-I/O encoder and validating decoder), :mod:`.control`
the control messages and the key handshake's proofs (sans-I/O), :mod:`.channel` their socket
half, :mod:`.source` the pre-copy loop over a VM + ``Container``, :mod:`.dest` the receiving
RAM, :mod:`.incoming` the destination process (``dmarw incoming``, also forked locally),
:mod:`.guest` the running guest's two ends, :mod:`.running` one running-guest migration with
both verifications, :mod:`.writers` and :mod:`.harness` the replay migration, and
:mod:`.cli` / :mod:`.guest_cli` the commands.
"""

from .dest import Destination
from .harness import Config, Outcome, run
from .source import MigrationFailed, MigrationReport, RoundStats, Source
from .stream import Decoder, Encoder, StreamError

__all__ = [
    "Config",
    "Decoder",
    "Destination",
    "Encoder",
    "MigrationFailed",
    "MigrationReport",
    "Outcome",
    "RoundStats",
    "Source",
    "StreamError",
    "run",
]
