"""Truncated importance sampling (TIS) for a rollout engine whose sampler is not the trainer.

vLLM samples with its own kernels (on GPU often in another precision), so the policy that drew a
completion, ``pi_s``, differs slightly from the trainer's ``pi_theta`` even right after a weight sync.
With ``--vllm_importance_sampling_correction`` every training rollout is re-scored by the trainer (one
no-grad forward of the gathered model, in the context the completion was sampled from), and

- the completion's log-probs become the trainer's, so the PPO ratio compares the trainer with itself
  (ratio 1 at the first update, exactly as with the HF engine);
- every token carries a constant factor on its loss (Yao et al. 2025, "truncated importance sampling"),
  in one of TRL's four modes (``--vllm_importance_sampling_mode``, ``C = --vllm_importance_sampling_cap``):

      token_truncate:     w_t = min(rho_t, C)                 rho_t = pi_theta(y_t) / pi_s(y_t)
      token_mask:         w_t = rho_t if rho_t <= C, else 0
      sequence_truncate:  w_t = min(R, C)                     R = prod_u rho_u, every token t of the completion
      sequence_mask:      w_t = R if R <= C, else 0

  A masked token (or completion) leaves the policy-gradient term (it still counts in the aggregation's
  token count, as in TRL); ``sampling/is_masked_frac`` is the share of tokens masked.

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

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def is_weights(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mode: str, cap: float) -> torch.Tensor:
    """Per-token importance weights of one completion (float64 maths, see module doc); a sequence ratio is
    compared with the cap in log space, so a long completion's product never overflows."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    level, action = mode.split("_")
    d = trainer_logp.double() - sampler_logp.double()
    log_r = d if level == "token" else torch.full_like(d, d.sum().item())
    log_cap = math.log(cap)
    if action == "truncate":
        return torch.exp(log_r.clamp(max=log_cap))
    return torch.where(log_r > log_cap, torch.zeros_like(log_r), torch.exp(log_r.clamp(max=log_cap)))


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
        self.ratio_sum, self.ratio_min, self.ratio_max, self.capped, self.masked = 0.0, math.inf, 0.0, 0, 0

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        comps = self.engine.generate(prompts, sampling)
        t0 = time.perf_counter()
        todo = [c for c in comps if c.token_ids]
        samples = [Sample(prompts[c.prompt_index], c.token_ids, c.logprobs, 0.0) for c in todo]
        cap, mode = self.cfg.vllm_importance_sampling_cap, self.cfg.vllm_importance_sampling_mode
        level = mode.split("_")[0]
        for c, trainer in zip(todo, recompute_logprobs(self.model, samples, self.cfg)):
            sampler = torch.tensor(c.logprobs, dtype=torch.float64)
            d = trainer.double() - sampler
            ratio = torch.exp(d) if level == "token" else torch.exp(d.sum()).reshape(1)
            w = is_weights(trainer, sampler, mode, cap)
            self.n += len(d)
            self.diff_sum += d.abs().sum().item()
            self.diff_max = max(self.diff_max, d.abs().max().item())
            self.ratio_sum += ratio.sum().item() * (1 if level == "token" else len(d))
            self.ratio_min = min(self.ratio_min, ratio.min().item())
            self.ratio_max = max(self.ratio_max, ratio.max().item())
            self.capped += int((ratio > cap).sum().item()) * (1 if level == "token" else len(d))
            self.masked += int((w == 0).sum().item()) if mode.endswith("_mask") else 0
            c.logprobs, c.is_weights = trainer.tolist(), w.tolist()
        self.seconds += time.perf_counter() - t0
        return comps

    def pop_stats(self) -> dict:
        """This rank's sums since the last call (summed over ranks by the caller), then reset."""
        out = {"n": self.n, "diff_sum": self.diff_sum, "diff_max": self.diff_max, "ratio_sum": self.ratio_sum,
               "ratio_min": self.ratio_min, "ratio_max": self.ratio_max, "capped": self.capped,
               "masked": self.masked, "seconds": self.seconds}
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
            "sampling/is_masked_frac": sum(p.get("masked", 0) for p in parts) / n,
            "time/is_rescore_s": max(p["seconds"] for p in parts)}
