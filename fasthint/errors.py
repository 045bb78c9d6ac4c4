"""User-facing errors: one clear line naming the problem and the fix, exit status 2."""
from __future__ import annotations


class FastHintError(Exception):
    """Bad input or setting. The CLI prints ``error: <message>`` and exits with status 2."""


class ConfigError(FastHintError):
    """An invalid configuration value."""


class DataError(FastHintError):
    """A missing or malformed dataset."""


class ModelError(FastHintError):
    """A model path that is not a usable checkpoint."""
