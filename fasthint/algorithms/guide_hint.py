"""Guide and HINT: hinted re-sampling of all-wrong groups, trained for the NO-hint context
(docs/ALGORITHMS.md §3 and §4).

Both roll out without hints, re-sample every all-zero group once with a hint at ``hint_level``
(default provider: the dataset's ``hint`` column; ``--hint_provider`` picks another), replace the
whole group, and train the hinted completions under the prompt WITHOUT the hint. They differ in the
denominator of the ratio and in the loss of hinted completions:

- Guide: ``ratio_t = pi_theta(y_t | x, y_<t) / pi_old(y_t | x, h, y_<t)`` (rollout-time log-probs with
  the hint); hinted completions use the unclipped shaped objective ``A r / (r + gamma)`` with
  ``gamma`` the 90th percentile of the sequence's ratios at the start of the update (detached, at
  least 1e-4); unhinted ones the clipped loss. ``guide_filter`` drops groups whose rewards stay all
  0 or all 1. Metrics: ``guide/ratio_min|mean|max`` over hinted tokens.
- HINT: ``pi_old`` is recomputed on the no-hint prompt (so no correction for the sampling shift).
  Affinity per group (``fasthint.algorithms.affinity``) is logged for hinted and unhinted groups;
  with ``aapo_lambda > 0`` (AAPO) a hinted group's loss is multiplied by ``Affinity ** lambda``
  (detached). ``affinity_ratio`` chooses the ratio Affinity is computed from: ``sampling`` (default)
  ``pi_theta(y|x) / pi_old(y|x,h)``, the shift the hint caused; ``training`` current over recomputed
  old, which is exactly 1 at the start of fasthint's single on-policy update (Affinity = 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fasthint.algorithms.affinity import group_affinity
from fasthint.algorithms.base import Algorithm, Group, RolloutContext, group_advantages, hint_stats, sample_groups
from fasthint.algorithms.hint_providers import HintConfig
from fasthint.batch import Sample
from fasthint.hints import at_level
from fasthint.loss import Term, clip_terms, recompute_logprobs
from fasthint.options import Options, need, one_of, option

AFFINITY_RATIOS = ("sampling", "training")


@dataclass
class GuideConfig(Options):
    GROUP = "guide"
    guide_filter: bool = option(True, "guide: drop groups whose rewards stay all 0 or all 1 after hinting.")


@dataclass
class HINTConfig(Options):
    GROUP = "hint"
    aapo_lambda: float = option(1.0, "hint: AAPO weights a hinted group's loss by Affinity ** lambda "
                                     "(0 = off).")
    affinity_ratio: str = option("sampling", f"hint: ratio Affinity is computed from, one of {AFFINITY_RATIOS}.")

    def check(self) -> None:
        need(self.aapo_lambda >= 0, f"--aapo_lambda must be >= 0 (got {self.aapo_lambda})")
        one_of("affinity_ratio", self.affinity_ratio, AFFINITY_RATIOS)


class _HintedResample(Algorithm):
    hint_provider_default = "dataset"

    def rollout(self, rows: list[dict], ctx: RolloutContext) -> tuple[list[Group], dict]:
        groups = {g.uid: g for g in sample_groups(ctx, rows)}
        failed = [g for g in groups.values() if g.all_zero]
        info = {"hint/requested": 0, "hint/parse_fail": 0.0}
        if failed and ctx.hints is not None:
            got = ctx.hints.hints([g.row for g in failed])
            info = hint_stats(ctx)
            todo = [(g, *at_level(h, self.cfg.hint_level)) for g, h in zip(failed, got)]  # (group, level, text)
            todo = [t for t in todo if t[2] is not None]
            redo = sample_groups(ctx, [g.row for g, _, _ in todo], [h for _, _, h in todo],
                                 [lv for _, lv, _ in todo])
            for (old, _, _), new in zip(todo, redo):
                new.pre_hint_rewards = old.rewards
                groups[new.uid] = new
        return [groups[r["uid"]] for r in rows], info

    def _split(self, groups: list[Group], ctx: RolloutContext):
        """Samples in the no-hint context, and the indices of the hinted ones."""
        samples, hinted = [], []
        for g, adv in zip(groups, group_advantages(groups, self.cfg)):
            ids = ctx.render(g.row, None) if g.level > 0 else g.prompt_ids
            for c, a in zip(g.completions, adv):
                if g.level > 0:
                    hinted.append(len(samples))
                samples.append(Sample(ids, c.token_ids, c.logprobs, a, truncated=c.truncated,
                                      token_weights=c.is_weights, hinted=g.level > 0))
        return samples, hinted


class Guide(_HintedResample):
    name = "guide"
    options = (HintConfig, GuideConfig)

    def objective(self) -> list[Term]:
        """Hinted completions (``gamma > 0``) use the shaped ratio ``A r / (r + gamma)``, the rest GRPO's clip."""
        c = self.cfg
        return clip_terms(c.eps_low, c.eps_high, c.dual_clip, c.beta, shaped=True, entropy_coef=c.entropy_coef)

    def samples(self, groups: list[Group], ctx: RolloutContext, model=None) -> tuple[list[Sample], dict]:
        if self.cfg.guide_filter:
            groups = [g for g in groups if max(g.rewards) > min(g.rewards)]
        samples, hinted = self._split(groups, ctx)
        info: dict = {}
        if hinted:
            now = recompute_logprobs(model, [samples[i] for i in hinted], self.cfg)
            ratios = []
            for i, lp in zip(hinted, now):
                r = torch.exp(lp - torch.tensor(samples[i].old_logprobs))
                samples[i].gamma = max(float(torch.quantile(r.double(), 0.9)), 1e-4)
                ratios.append(r)
            r = torch.cat(ratios)
            info = {"guide/ratio_min": r.min().item(), "guide/ratio_mean": r.mean().item(),
                    "guide/ratio_max": r.max().item()}
        return samples, info


class HINT(_HintedResample):
    name = "hint"
    options = (HintConfig, HINTConfig)

    def samples(self, groups: list[Group], ctx: RolloutContext, model=None) -> tuple[list[Sample], dict]:
        samples, hinted = self._split(groups, ctx)
        sampling_lr = {}
        if hinted:
            now = recompute_logprobs(model, [samples[i] for i in hinted], self.cfg)
            for i, lp in zip(hinted, now):
                sampling_lr[i] = lp - torch.tensor(samples[i].old_logprobs)
                samples[i].old_logprobs = lp.tolist()  # pi_old recomputed on the no-hint prompt
        # per-token log ratio for Affinity: hinted -> sampling or training (0) ratio; unhinted -> 0
        # (trainer and rollout policy are the same weights before the update)
        lr, adv, gid = [], [], []
        k = 0
        for gi, g in enumerate(groups):
            for _ in g.completions:
                s = samples[k]
                n = len(s.completion_ids)
                use = self.cfg.affinity_ratio == "sampling" and k in sampling_lr
                lr.append(sampling_lr[k] if use else torch.zeros(n))
                adv.append(torch.full((n,), s.advantage))
                gid.append(torch.full((n,), gi, dtype=torch.long))
                k += 1
        if not groups:
            return samples, {}
        gids = torch.cat(gid)
        vals = group_affinity(torch.cat(lr), torch.cat(adv), torch.ones(len(gids)), gids, eps=self.cfg.eps_low)
        aff, eur, uc = (torch.zeros(len(groups)).index_copy_(0, torch.unique(gids), v.float()) for v in vals)
        info = {}
        for tag, sel in (("", [g.level > 0 for g in groups]), ("/unhinted", [g.level == 0 for g in groups])):
            m = torch.tensor(sel)
            if m.any():
                info[f"affinity{tag}"] = aff[m].mean().item()
                info[f"affinity/eur{tag}"] = eur[m].mean().item()
                info[f"affinity/uc{tag}"] = uc[m].mean().item()
        if self.cfg.aapo_lambda > 0:
            k = 0
            for gi, g in enumerate(groups):
                for _ in g.completions:
                    if g.level > 0:
                        samples[k].weight = float(aff[gi]) ** self.cfg.aapo_lambda
                    k += 1
        return samples, info
