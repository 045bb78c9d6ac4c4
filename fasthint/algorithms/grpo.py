"""GRPO's baselines: Dr. GRPO and DAPO (ALGORITHMS.md section 1.7).

- ``dr_grpo``: GRPO with ``adv_scale=none`` and ``loss_agg=seq-mean-token-sum-norm`` (the config's
  ``auto`` values resolve to these); the algorithm itself is GRPO's.
- ``dapo``: dynamic sampling (groups whose rewards are all equal are dropped and more prompts are
  sampled, up to ``dapo_max_rounds`` rounds, until ``prompts_per_step`` informative groups are
  collected), overlong masking (truncated completions get no loss; ``mask_truncated`` auto = on),
  clip-higher (``eps_high``) and token-mean aggregation (the defaults).
"""
from __future__ import annotations

from fasthint.algorithms.base import Algorithm, Group, RolloutContext, sample_groups


class DrGRPO(Algorithm):
    name = "dr_grpo"


class DAPO(Algorithm):
    name = "dapo"

    def rollout(self, rows: list[dict], ctx: RolloutContext) -> tuple[list[Group], dict]:
        want = len(rows)
        kept: list[Group] = []
        sampled = rounds = 0
        while True:
            groups = sample_groups(ctx, rows)
            sampled += len(groups)
            rounds += 1
            kept += [g for g in groups if max(g.rewards) > min(g.rewards)]
            if len(kept) >= want or rounds >= self.cfg.dapo_max_rounds or ctx.next_rows is None:
                break
            rows = ctx.next_rows()[:max(1, want - len(kept))]
        info = {"dapo/rounds": rounds, "dapo/prompts_sampled": sampled,
                "dapo/kept_ratio": len(kept) / max(1, sampled)}
        return kept[:want], info
