"""Live migration of guest RAM driven by the dirty logs (issue 5).

:mod:`.stream` is the wire format (sans-I/O encoder and validating decoder),
:mod:`.source` the pre-copy loop over a ``Vm`` + ``Container``, :mod:`.dest` the receiving
process, :mod:`.writers` the concurrent vCPU/device/pinned-page writers, :mod:`.harness`
one run end to end with verification, and :mod:`.cli` the ``dmarw migrate`` command.
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
