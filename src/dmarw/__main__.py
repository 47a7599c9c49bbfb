"""``python -m dmarw``: the same command as ``dmarw``."""

from .cli import entry

entry()
