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

from dataclasses import dataclass, replace

from fasthint import dist
from fasthint.algorithms.base import Algorithm, Group, RolloutContext, sample_groups
from fasthint.options import Options, at_least, option


@dataclass
class DAPOConfig(Options):
    GROUP = "dapo"
    dapo_max_rounds: int = option(3, "dapo: sampling rounds per step to fill the batch with groups whose "
                                     "rewards differ.")

    def check(self) -> None:
        at_least(self, ("dapo_max_rounds",), 1)


class DrGRPO(Algorithm):
    name = "dr_grpo"
    defaults = {**Algorithm.defaults, "adv_scale": "none", "loss_agg": "seq-mean-token-sum-norm"}


class DAPO(Algorithm):
    name = "dapo"
    options = (DAPOConfig,)
    defaults = {**Algorithm.defaults, "mask_truncated": True}

    def rollout(self, rows: list[dict], ctx: RolloutContext) -> tuple[list[Group], dict]:
        rank, world = dist.rank(), dist.world_size()
        want = int(dist.all_sum([len(rows)])[0])  # this step's prompts over all processes
        kept: list[Group] = []
        every: list[Group] = []  # every sampled group, without its completions: the group metrics' population
        sampled = rounds = 0
        all_rewards: list[float] = []
        all_hits: list[float] = []
        while True:
            groups = sample_groups(ctx, rows)
            sampled += len(groups)
            every += [replace(g, row={}, prompt_ids=[], completions=[]) for g in groups]
            all_rewards += [r for g in groups for r in g.rewards]
            all_hits += [r for g in groups for r in g.hits]
            rounds += 1
            kept += [g for g in groups if max(g.rewards) > min(g.rewards)]
            n_kept = int(dist.all_sum([len(kept)])[0])
            if n_kept >= want or rounds >= self.cfg.dapo_max_rounds or ctx.next_rows is None:
                break
            rows = ctx.next_rows()[:max(1, want - n_kept)][rank::world]  # a global batch, cut, then split
        before = sum(dist.all_gather(len(kept))[:rank])  # the first `want` kept groups in rank order train
        total = int(dist.all_sum([sampled])[0])
        info = {"dapo/rounds": rounds, "dapo/prompts_sampled": total, "dapo/kept_ratio": n_kept / max(1, total),
                "_sampled_rewards": all_rewards, "_sampled_hits": all_hits,  # reward/accuracy over every sampled
                "_sampled_groups": every}  # group; frac_reward_zero_std and prompts/never_solved too
        return kept[:max(0, want - before)], info
