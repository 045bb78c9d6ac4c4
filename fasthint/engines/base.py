"""The rollout engine interface every backend (Hugging Face generate, vLLM) implements."""
from __future__ import annotations

import logging

from dataclasses import dataclass, field
from typing import Optional, Protocol

from fasthint.options import Options, at_least, need, one_of, option

ENGINES = ("hf", "vllm")
IS_LEVELS = ("token", "sequence")  # the old --vllm_importance_sampling_level
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")  # TRL's names


@dataclass
class SamplingConfig:
    """How to sample. ``temperature == 0`` means greedy decoding.

    ``seeds`` (one per prompt, or None): completion ``j`` of prompt ``i`` is drawn from its own random
    stream, :func:`completion_seed` ``(seeds[i], j)``, so that what it samples does not depend on the
    other prompts of the batch, on the process that samples it or on the global RNG, which it leaves
    untouched (evaluation, sharded over ranks). None: the engine's own RNG (training rollouts)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seeds: Optional[list[int]] = None


_MASK64 = (1 << 64) - 1


def completion_seed(seed: int, j: int) -> int:
    """The random stream of completion ``j`` of a prompt whose seed is ``seed``: a 63-bit integer
    (splitmix64 of both, so that nearby seeds give unrelated streams)."""
    return _splitmix64((seed * 0x9E3779B97F4A7C15 + j) & _MASK64) >> 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


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


@dataclass
class RolloutConfig(Options):
    """Sampling the training rollouts and the engine that does it."""

    GROUP = "rollouts and engine"
    num_generations: int = option(8, "completions per prompt: the group size G.")
    temperature: float = option(1.0, "sampling temperature of training rollouts (also used by the loss).")
    top_p: float = option(1.0, "nucleus sampling of training rollouts; keep 1.0 so that sampling and "
                               "training log-probs agree.")
    max_new_tokens: int = option(64, "maximum completion length; longer completions are truncated.")
    generation_batch_size: int = option(256, "sequences per generate call of the HF engine.")
    engine: str = option("hf", f"rollout engine, one of {ENGINES}: hf = the trainer's own module (no weight "
                               "copy); vllm = an in-process vLLM engine fed the weights after every step "
                               "(pip extra 'vllm'; one engine per rank under torchrun).")
    vllm_gpu_memory_utilization: float = option(0.5, "vllm: share of GPU memory for the engine's weights and "
                                                     "KV cache.")
    vllm_sleep_mode: bool = option(False, "vllm: free the engine's GPU memory during each policy update.")
    check_engine_sync: bool = option(False, "after every weight sync, not only the first (which --engine vllm always "
                                            "checks), score some of the engine's rollouts with the trainer and stop "
                                            "when they disagree (fasthint.engines.sync_check).")
    engine_sync_max_logp_diff: float = option(0.05, "the engine/trainer agreement check's limit: mean |delta logp| "
                                                    "per token in nats (rounding of bf16 engines: about 1e-3 to 1e-2).")
    vllm_importance_sampling_correction: bool = option(
        False, "vllm: re-score each rollout with the trainer (one no-grad forward) and weight each token's "
               "loss by the truncated ratio trainer/sampler (TIS); metrics sampling/is_ratio/*.")
    vllm_importance_sampling_mode: str = option("", f"vllm: the correction's ratio per token or per sequence, "
                                                    f"truncated (min(ratio, C)) or masked (weight 0 where ratio > C), "
                                                    f"one of {IS_MODES} (TRL's names); unset = token_truncate.")
    vllm_importance_sampling_level: str = option("", "vllm: the old name of --vllm_importance_sampling_mode: token "
                                                     "= token_truncate, sequence = sequence_truncate.")
    vllm_importance_sampling_cap: float = option(3.0, "vllm: the correction's C (weights min(ratio, C), or 0 above "
                                                      "C when masking; they scale the policy-gradient term, not "
                                                      "the KL).")

    def check(self) -> None:
        at_least(self, ("num_generations", "max_new_tokens", "generation_batch_size"), 1)
        need(self.temperature > 0, f"--temperature must be > 0 (got {self.temperature})")
        need(0 < self.top_p <= 1, f"--top_p must be in (0, 1] (got {self.top_p})")
        one_of("engine", self.engine, ENGINES)
        need(self.engine_sync_max_logp_diff > 0,
             f"--engine_sync_max_logp_diff must be > 0 nats (got {self.engine_sync_max_logp_diff}); e.g. 0.05")
        need(0 < self.vllm_gpu_memory_utilization <= 1,
             f"--vllm_gpu_memory_utilization must be in (0, 1] (got {self.vllm_gpu_memory_utilization})")
        if self.vllm_importance_sampling_level:  # the old option: mapped once, with a word
            one_of("vllm_importance_sampling_level", self.vllm_importance_sampling_level, IS_LEVELS)
            need(not self.vllm_importance_sampling_mode,
                 "--vllm_importance_sampling_level and --vllm_importance_sampling_mode are both given: keep "
                 "--vllm_importance_sampling_mode (the level is its old name)")
            self.vllm_importance_sampling_mode = f"{self.vllm_importance_sampling_level}_truncate"
            logging.getLogger("fasthint").warning(
                "--vllm_importance_sampling_level %s is now --vllm_importance_sampling_mode %s",
                self.vllm_importance_sampling_level, self.vllm_importance_sampling_mode)
            self.vllm_importance_sampling_level = ""
        self.vllm_importance_sampling_mode = self.vllm_importance_sampling_mode or "token_truncate"
        one_of("vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, IS_MODES)
        need(self.vllm_importance_sampling_cap >= 1,
             f"--vllm_importance_sampling_cap must be >= 1 (got {self.vllm_importance_sampling_cap})")
        need(self.engine == "vllm" or not self.vllm_importance_sampling_correction,
             "--vllm_importance_sampling_correction needs --engine vllm (the hf engine samples with the "
             "trainer's own weights)")


class RolloutEngine(Protocol):
    """Generates completions; returns ``len(prompts) * sampling.n`` completions, prompt-major."""

    runs_policy: bool  # generate() runs the trainer's module (so the trainer gathers it for rollouts)

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
