"""fasthint's training algorithms: GRPO and its baselines and hint-guided variants.

``make_algorithm(cfg)`` returns the object the trainer loop calls (see ``base.Algorithm``);
``affinity`` is HINT's diagnostic, public for analysis.
"""
from __future__ import annotations

from fasthint.algorithms.affinity import affinity, group_affinity
from fasthint.algorithms.base import Algorithm, Group, RolloutContext, SolveTracker, group_metrics
from fasthint.algorithms.grpo import DAPO, DrGRPO
from fasthint.algorithms.guide_hint import HINT, Guide
from fasthint.algorithms.sage import SAGE, SAGELight

REGISTRY = {"grpo": Algorithm, "dapo": DAPO, "dr_grpo": DrGRPO, "sage": SAGE, "sage_light": SAGELight,
            "guide": Guide, "hint": HINT}


def make_algorithm(cfg) -> Algorithm:
    """The algorithm named by ``cfg.algo``."""
    return REGISTRY[cfg.algo](cfg)


__all__ = ["affinity", "group_affinity", "make_algorithm", "Algorithm", "Group", "RolloutContext", "SolveTracker",
           "group_metrics", "REGISTRY"]
