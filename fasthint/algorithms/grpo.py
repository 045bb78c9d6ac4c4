"""GRPO's baselines: Dr. GRPO and DAPO (docs/ALGORITHMS.md §1.7).

- ``dr_grpo``: GRPO with ``adv_scale=none`` and ``loss_agg=seq-mean-token-sum-norm`` (the config's
  ``auto`` values resolve to these); the algorithm itself is GRPO's.
- ``dapo``: dynamic sampling (groups whose rewards are all equal are dropped and more prompts are
  sampled, up to ``dapo_max_rounds`` rounds, until ``prompts_per_step`` informative groups are
  collected; ``reward/*`` and ``accuracy`` cover every sampled group, ``.../kept`` the ones that
  train), overlong masking (truncated completions get no loss; ``mask_truncated`` auto = on),
  clip-higher (``eps_high``) and token-mean aggregation (the defaults).

Under ``torchrun`` every process samples its own share of prompts, but the stopping rule and the
final cut use global counts (one all-reduce per round), so all processes run the same rounds and
draw the same extra global batches, and exactly ``prompts_per_step`` groups train over all of them.
"""
from __future__ import annotations

from fasthint.algorithms.base import Algorithm, DAPOConfig, Group, RolloutContext, fill_batch, sample_groups


class DrGRPO(Algorithm):
    name = "dr_grpo"
    defaults = {**Algorithm.defaults, "adv_scale": "none", "loss_agg": "seq-mean-token-sum-norm"}


class DAPO(Algorithm):
    name = "dapo"
    options = (DAPOConfig,)
    defaults = {**Algorithm.defaults, "mask_truncated": True}

    def rollout(self, rows: list[dict], ctx: RolloutContext) -> tuple[list[Group], dict]:
        return fill_batch(ctx, rows, lambda r: (sample_groups(ctx, r), {}), self.cfg.dapo_max_rounds)
