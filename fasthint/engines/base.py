"""The rollout engine interface every backend (Hugging Face generate, vLLM) implements."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol


@dataclass
class SamplingConfig:
    """How to sample. ``temperature == 0`` means greedy decoding."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64


@dataclass
class Completion:
    """One sampled completion of one prompt.

    ``token_ids`` end with the EOS token when the model stopped by itself; ``logprobs`` are the
    sampling log-probs of those tokens at the sampling temperature (raw logits for greedy), one per
    token; ``truncated`` is True when ``max_new_tokens`` cut the completion. ``is_weights`` (one per
    token, or None) are the truncated importance weights trainer/sampler that
    :mod:`fasthint.engines.correction` attaches (``logprobs`` are then the trainer's).
    """

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    truncated: bool = False
    is_weights: Optional[list[float]] = None


class RolloutEngine(Protocol):
    """Generates completions; returns ``len(prompts) * sampling.n`` completions, prompt-major."""

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        ...

    def update_weights(self, model) -> None:
        """Makes the engine sample from ``model``'s current weights (no-op when it shares them)."""
        ...

    def sleep(self) -> None:
        """Frees what the engine holds during the policy update (no-op when it holds nothing)."""
        ...

    def close(self) -> None:
        """Shuts the engine down (before the process group is destroyed)."""
        ...
