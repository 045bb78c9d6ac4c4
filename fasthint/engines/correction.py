"""Truncated importance sampling (TIS) for a rollout engine whose sampler is not the trainer.

vLLM samples with its own kernels (on GPU often in another precision), so the policy that drew a
completion, ``pi_s``, differs slightly from the trainer's ``pi_theta`` even right after a weight sync.
With ``--vllm_importance_sampling_correction`` every training rollout is re-scored by the trainer (one
no-grad forward of the gathered model, in the context the completion was sampled from), and

- the completion's log-probs become the trainer's, so the PPO ratio compares the trainer with itself
  (ratio 1 at the first update, exactly as with the HF engine);
- every token carries a constant factor on its loss (Yao et al. 2025, "truncated importance sampling"):

      token level:     w_t = min(pi_theta(y_t) / pi_s(y_t), C)
      sequence level:  w_t = min(prod_u pi_theta(y_u) / pi_s(y_u), C)   for every token t of the completion

  with ``C = --vllm_importance_sampling_cap``.

Without the correction the sampler's log-probs are the PPO ratio's old policy: the mismatch then sits
in the ratio and is clipped with it. Either way ``sampling/logp_diff/{mean,max}`` report
``|log pi_theta - log pi_s|`` per token; with the correction they are measured here, at rollout time.
"""
from __future__ import annotations

import math
import time

import torch

from fasthint.batch import Sample
from fasthint.engines.base import Completion, SamplingConfig
from fasthint.loss import recompute_logprobs

LEVELS = ("token", "sequence")


def is_weights(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, level: str, cap: float) -> torch.Tensor:
    """Per-token truncated importance weights of one completion (float64 maths, see module doc)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    d = trainer_logp.double() - sampler_logp.double()
    if level == "token":
        return torch.exp(d).clamp(max=cap)
    return torch.full_like(d, math.exp(min(d.sum().item(), math.log(cap))))


class ISCorrectedEngine:
    """Wraps an engine: its completions come back with the trainer's log-probs and ``is_weights``.

    ``stats`` accumulates, until :meth:`pop_stats`, the mismatch and ratio metrics of every call.
    """

    runs_policy = True  # recomputes the trainer's log-probs of every rollout

    def __init__(self, engine, model, cfg):
        self.engine, self.model, self.cfg = engine, model, cfg
        self._reset()

    def _reset(self) -> None:
        self.n, self.diff_sum, self.diff_max, self.seconds = 0, 0.0, 0.0, 0.0
        self.ratio_sum, self.ratio_min, self.ratio_max, self.capped = 0.0, math.inf, 0.0, 0

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        comps = self.engine.generate(prompts, sampling)
        t0 = time.perf_counter()
        todo = [c for c in comps if c.token_ids]
        samples = [Sample(prompts[c.prompt_index], c.token_ids, c.logprobs, 0.0) for c in todo]
        cap, level = self.cfg.vllm_importance_sampling_cap, self.cfg.vllm_importance_sampling_level
        for c, trainer in zip(todo, recompute_logprobs(self.model, samples, self.cfg)):
            sampler = torch.tensor(c.logprobs, dtype=torch.float64)
            d = trainer.double() - sampler
            ratio = torch.exp(d) if level == "token" else torch.exp(d.sum()).reshape(1)
            w = is_weights(trainer, sampler, level, cap)
            self.n += len(d)
            self.diff_sum += d.abs().sum().item()
            self.diff_max = max(self.diff_max, d.abs().max().item())
            self.ratio_sum += ratio.sum().item() * (1 if level == "token" else len(d))
            self.ratio_min = min(self.ratio_min, ratio.min().item())
            self.ratio_max = max(self.ratio_max, ratio.max().item())
            self.capped += int((ratio > cap).sum().item()) * (1 if level == "token" else len(d))
            c.logprobs, c.is_weights = trainer.tolist(), w.tolist()
        self.seconds += time.perf_counter() - t0
        return comps

    def pop_stats(self) -> dict:
        """This rank's sums since the last call (summed over ranks by the caller), then reset."""
        out = {"n": self.n, "diff_sum": self.diff_sum, "diff_max": self.diff_max, "ratio_sum": self.ratio_sum,
               "ratio_min": self.ratio_min, "ratio_max": self.ratio_max, "capped": self.capped,
               "seconds": self.seconds}
        self._reset()
        return out

    def update_weights(self, model) -> None:
        self.engine.update_weights(model)


def merge_stats(parts: list[dict]) -> dict:
    """Metrics from every rank's :meth:`ISCorrectedEngine.pop_stats` (token-weighted)."""
    n = sum(p["n"] for p in parts)
    if not n:
        return {}
    return {"sampling/logp_diff/mean": sum(p["diff_sum"] for p in parts) / n,
            "sampling/logp_diff/max": max(p["diff_max"] for p in parts),
            "sampling/is_ratio/mean": sum(p["ratio_sum"] for p in parts) / n,
            "sampling/is_ratio/min": min(p["ratio_min"] for p in parts),
            "sampling/is_ratio/max": max(p["ratio_max"] for p in parts),
            "sampling/is_capped_frac": sum(p["capped"] for p in parts) / n,
            "time/is_rescore_s": max(p["seconds"] for p in parts)}
