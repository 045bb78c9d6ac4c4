"""fasthint's training algorithms: GRPO and its baselines and hint-guided variants.

Every module of this package is imported here, and every ``Algorithm`` subclass that sets ``name``
registers itself in ``REGISTRY`` (``base.Algorithm`` explains the parts of an algorithm): adding an
algorithm is one new module plus its test. ``make_algorithm(cfg)`` returns the object the trainer loop
calls; ``affinity`` is HINT's diagnostic, public for analysis.
"""
from __future__ import annotations

import importlib
import pkgutil

from fasthint.algorithms.affinity import affinity, group_affinity
from fasthint.algorithms.base import REGISTRY, Algorithm, Group, RolloutContext, SolveTracker, group_metrics

for _module in pkgutil.iter_modules(__path__):  # each module's subclasses register themselves
    importlib.import_module(f"{__name__}.{_module.name}")


def make_algorithm(cfg) -> Algorithm:
    """The algorithm named by ``cfg.algo``."""
    return REGISTRY[cfg.algo](cfg)


def algorithm_options() -> tuple:
    """The config components of every registered algorithm, once each, in registry order."""
    return tuple(dict.fromkeys(opt for cls in REGISTRY.values() for opt in cls.options))


__all__ = ["affinity", "group_affinity", "make_algorithm", "algorithm_options", "Algorithm", "Group",
           "RolloutContext", "SolveTracker", "group_metrics", "REGISTRY"]
