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
- HINT: ``pi_old`` is recomputed on the no-hint prompt (one no-grad scoring pass; no correction for
  the sampling shift). Affinity per group (``fasthint.algorithms.affinity``) uses HINT's ratio
  ``pi_theta(y|x) / pi_old(y|x)``, both without the hint: with one optimizer step per rollout batch
  they are the same weights, so Affinity is 1 for a group with a non-zero advantage and AAPO
  (``aapo_lambda > 0``: weight ``Affinity ** lambda``, detached) leaves hinted groups at weight 1, as
  HINT's code does on its first mini-batch. It is logged for hinted groups and for unhinted groups
  with a non-zero advantage; ``affinity/sampling*`` logs it from ``pi_theta(y|x) / pi_old(y|x,h)``,
  the shift the hint itself caused (a diagnostic; it never weights the loss).
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
from fasthint.options import Options, need, option

@dataclass
class GuideConfig(Options):
    GROUP = "guide"
    guide_filter: bool = option(True, "guide: drop groups whose rewards stay all 0 or all 1 after hinting.")


@dataclass
class HINTConfig(Options):
    GROUP = "hint"
    aapo_lambda: float = option(1.0, "hint: AAPO weights a hinted group's loss by Affinity ** lambda "
                                     "(0 = off).")

    def check(self) -> None:
        need(self.aapo_lambda >= 0, f"--aapo_lambda must be >= 0 (got {self.aapo_lambda})")


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
        sampling_lr: dict[int, torch.Tensor] = {}
        if hinted:  # pi_old of a hinted completion: one no-grad scoring pass on the NO-hint prompt
            now = recompute_logprobs(model, [samples[i] for i in hinted], self.cfg)
            for i, lp in zip(hinted, now):
                sampling_lr[i] = lp - torch.tensor(samples[i].old_logprobs)  # vs the hinted sampling context
                samples[i].old_logprobs = lp.tolist()
        if not groups:
            return samples, {}
        # Affinity from HINT's ratio r_t = pi_theta(y_t|x,y_<t) / pi_old(y_t|x,y_<t), both on the no-hint
        # context. fasthint makes one optimizer step per rollout batch and scores the batch right before it,
        # so pi_theta IS pi_old here: log r_t = 0 exactly (no forward needed), Affinity = 1 for a group with
        # a non-zero advantage and AAPO leaves its weight at 1, as HINT's code does on its first mini-batch.
        per_group = self._affinity_inputs(groups, samples, sampling_lr)
        aff, eur, uc = self._group_affinity(per_group, use_sampling=False)
        s_aff, s_eur, s_uc = self._group_affinity(per_group, use_sampling=True)
        nonzero = torch.tensor([any(a != 0.0 for a in adv) for _, adv, _ in per_group])
        info = {}
        for tag, sel in (("", [g.level > 0 for g in groups]), ("/unhinted", [g.level == 0 for g in groups])):
            m = torch.tensor(sel) & nonzero  # a zero-advantage group has Affinity 0 by definition
            if m.any():
                info[f"affinity{tag}"] = aff[m].mean().item()
                info[f"affinity/eur{tag}"] = eur[m].mean().item()
                info[f"affinity/uc{tag}"] = uc[m].mean().item()
        m = torch.tensor([g.level > 0 for g in groups]) & nonzero
        if m.any():  # diagnostic: the shift the hint itself caused, pi_theta(y|x) / pi_old(y|x,h)
            info["affinity/sampling"] = s_aff[m].mean().item()
            info["affinity/sampling/eur"] = s_eur[m].mean().item()
            info["affinity/sampling/uc"] = s_uc[m].mean().item()
        if self.cfg.aapo_lambda > 0:
            k = 0
            for gi, g in enumerate(groups):
                for _ in g.completions:
                    if g.level > 0:
                        samples[k].weight = float(aff[gi]) ** self.cfg.aapo_lambda
                    k += 1
        return samples, info

    @staticmethod
    def _affinity_inputs(groups: list[Group], samples: list[Sample], sampling_lr: dict) -> list:
        """Per group: (no-hint log-ratios, advantages, sampling-context log-ratios), one entry per completion."""
        out, k = [], 0
        for g in groups:
            lr, adv, slr = [], [], []
            for _ in g.completions:
                n = len(samples[k].completion_ids)
                lr.append(torch.zeros(n, dtype=torch.float64))
                adv.append(samples[k].advantage)
                slr.append(sampling_lr[k].double() if k in sampling_lr else torch.zeros(n, dtype=torch.float64))
                k += 1
            out.append((lr, adv, slr))
        return out

    def _group_affinity(self, per_group: list, use_sampling: bool):
        """``group_affinity`` over every group (``eps = --eps_low``), from the no-hint or the sampling ratio."""
        lr, adv, gid = [], [], []
        for gi, (nohint, a, sampling) in enumerate(per_group):
            for x, ai in zip(sampling if use_sampling else nohint, a):
                lr.append(x)
                adv.append(torch.full((len(x),), ai, dtype=torch.float64))
                gid.append(torch.full((len(x),), gi, dtype=torch.long))
        gids = torch.cat(gid)
        vals = group_affinity(torch.cat(lr), torch.cat(adv), torch.ones(len(gids)), gids, eps=self.cfg.eps_low)
        return tuple(torch.zeros(len(per_group), dtype=torch.float64).index_copy_(0, torch.unique(gids), v.double())
                     for v in vals)
