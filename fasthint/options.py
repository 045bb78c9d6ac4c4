"""What every component's config is made of: documented fields and checks that name the fix.

A component (the model, the data, the rollouts, the loss, the optimiser, logging, each algorithm)
declares its settings as a ``@dataclass`` subclass of :class:`Options` in its own module, with
:func:`option` fields (default + help text) and a ``check()`` that raises one
:class:`~fasthint.errors.ConfigError` line naming the flag and the fix. ``fasthint.config.TrainConfig``
is the union of the components; every function takes the narrowest one it needs, so a tool that
needs only an engine builds a ``RolloutConfig`` and nothing else.
"""
from __future__ import annotations

from dataclasses import field
from typing import Any, Iterable

from fasthint.errors import ConfigError


def option(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse
    """A config field with its default and its ``--help`` text."""
    return field(default=default, metadata={"help": help})


def need(ok: bool, msg: str) -> None:
    """Raises ``ConfigError(msg)`` unless ``ok``."""
    if not ok:
        raise ConfigError(msg)


def one_of(flag: str, value: Any, allowed: Iterable) -> None:
    """``--flag value`` must be one of ``allowed``."""
    allowed = tuple(allowed)
    need(value in allowed, f"--{flag} {value!r}: use one of {', '.join(map(str, allowed))}")


def at_least(cfg: Any, names: Iterable[str], low: float) -> None:
    """Every named integer setting of ``cfg`` is ``>= low``."""
    for name in names:
        need(getattr(cfg, name) >= low, f"--{name} must be >= {low} (got {getattr(cfg, name)})")


class Options:
    """Base of the component configs. ``GROUP`` titles the component's flags in ``--help``."""

    GROUP = ""

    def check(self) -> None:
        """Validates this component's own fields (override; raise via :func:`need`)."""
