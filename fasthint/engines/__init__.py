"""Rollout engines: generate G completions per prompt with their sampling log-probs."""
from fasthint.engines.base import Completion, RolloutEngine, SamplingConfig

__all__ = ["Completion", "RolloutEngine", "SamplingConfig"]
