"""Guide and HINT: hinted re-sampling of all-wrong groups, trained for the NO-hint context
(docs/ALGORITHMS.md §3 and §4).

Both roll out without hints, re-sample every all-zero group once with a hint at ``hint_level``
(default provider: the dataset's ``hint`` column; ``--hint_provider`` picks another), replace the
whole group, and train the hinted completions under the prompt WITHOUT the hint. They differ in the
denominator of the ratio and in the loss of hinted completions:

- Guide: ``ratio_t = pi_theta(y_t | x, y_<t) / pi_old(y_t | x, h, y_<t)`` (rollout-time log-probs with
  the hint); hinted completions use the unclipped shaped objective ``A r / (r + gamma)`` with
  ``gamma`` the 90th percentile of the sequence's ratios under the policy about to step, recomputed
  for each mini-batch (detached, at least 1e-4); unhinted ones the clipped loss. ``guide_filter``
  drops groups whose rewards stay all 0 or all 1 and refills the batch as DAPO does (``fill_batch``,
  ``--dapo_max_rounds``, ``dapo/*`` metrics). Metrics: ``guide/ratio_min|mean|max`` over hinted tokens
  at the start of the update.
- HINT: ``pi_old`` is recomputed on the no-hint prompt (one no-grad scoring pass; no correction for
  the sampling shift). Before each optimiser step, Affinity per group (``fasthint.algorithms.affinity``)
  uses HINT's ratio ``pi_theta(y|x) / pi_old(y|x)``, both without the hint, and AAPO
  (``aapo_lambda > 0``) weights a hinted group's loss by ``Affinity ** lambda`` (detached). On the
  first step of a rollout batch the two policies are the same weights, so Affinity is 1 for a group
  with a non-zero advantage and the weight stays 1, as in HINT's code on its first mini-batch; with
  ``--steps_per_generation``/``--num_iterations`` > 1 the later steps see the policy move. It is
  logged (mean over the steps) for hinted groups and for unhinted groups with a non-zero advantage;
  ``affinity/sampling*`` logs it from ``pi_theta(y|x) / pi_old(y|x,h)``, the shift the hint itself
  caused (a diagnostic; it never weights the loss).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fasthint.algorithms.affinity import group_affinity
from fasthint.algorithms.base import (Algorithm, DAPOConfig, Group, RolloutContext, fill_batch, group_advantages,
                                      hint_stats, sample_groups)
from fasthint.algorithms.hint_providers import HintConfig
from fasthint.batch import Sample
from fasthint.hints import at_level
from fasthint.loss import Term, clip_terms, recompute_logprobs
from fasthint.options import Options, need, option

@dataclass
class GuideConfig(Options):
    GROUP = "guide"
    guide_filter: bool = option(True, "guide: drop groups whose rewards stay all 0 or all 1 after hinting, and "
                                      "refill the batch as DAPO does (--dapo_max_rounds).")


@dataclass
class HINTConfig(Options):
    GROUP = "hint"
    aapo_lambda: float = option(1.0, "hint: AAPO weights a hinted group's loss by Affinity ** lambda "
                                     "(0 = off).")

    def check(self) -> None:
        need(self.aapo_lambda >= 0, f"--aapo_lambda must be >= 0 (got {self.aapo_lambda})")


class _HintedResample(Algorithm):
    hint_provider_default = "dataset"
    samples_run_policy = True  # hinted completions are rescored on the no-hint prompt

    def rollout(self, rows: list[dict], ctx: RolloutContext) -> tuple[list[Group], dict]:
        return self._hinted_round(rows, ctx)

    def _hinted_round(self, rows: list[dict], ctx: RolloutContext) -> tuple[list[Group], dict]:
        """The rows' groups: sampled without hints, then every all-zero group re-sampled once with its
        hint at ``hint_level``, replacing it."""
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
                groups[new.uid] = new.replacing(old)
        return [groups[r["uid"]] for r in rows], info

    def _split(self, groups: list[Group], ctx: RolloutContext):
        """Samples in the no-hint context, and the indices of the hinted ones."""
        samples, hinted = [], []
        for gi, (g, adv) in enumerate(zip(groups, group_advantages(groups, self.cfg))):
            ids = ctx.render(g.row, None) if g.level > 0 else g.prompt_ids
            for c, a in zip(g.completions, adv):
                if g.level > 0:
                    hinted.append(len(samples))
                samples.append(Sample(ids, c.token_ids, c.logprobs, a, truncated=c.truncated,
                                      token_weights=c.is_weights, hinted=g.level > 0, group=gi))
        return samples, hinted


class Guide(_HintedResample):
    name = "guide"
    options = (HintConfig, GuideConfig, DAPOConfig)

    def rollout(self, rows: list[dict], ctx: RolloutContext) -> tuple[list[Group], dict]:
        """With ``guide_filter``, groups whose rewards stay all equal after hinting are dropped and the
        batch is refilled with fresh prompts, as DAPO refills (``fill_batch``: same cap, same metrics)."""
        if not self.cfg.guide_filter:
            return self._hinted_round(rows, ctx)
        return fill_batch(ctx, rows, lambda r: self._hinted_round(r, ctx), self.cfg.dapo_max_rounds)

    def objective(self) -> list[Term]:
        """Hinted completions (``gamma > 0``) use the shaped ratio ``A r / (r + gamma)``, the rest GRPO's clip."""
        c = self.cfg
        return clip_terms(c.eps_low, c.eps_high, c.dual_clip, c.beta, shaped=True, entropy_coef=c.entropy_coef)

    def samples(self, groups: list[Group], ctx: RolloutContext, model=None) -> tuple[list[Sample], dict]:
        samples, hinted = self._split(groups, ctx)
        info: dict = {}
        if hinted:
            for i in hinted:
                samples[i].keep_old_logprobs = True  # pi_old(o | q, hint): the behaviour policy of the IS ratio
            r = torch.cat(self._set_gamma([samples[i] for i in hinted], model))
            info = {"guide/ratio_min": r.min().item(), "guide/ratio_mean": r.mean().item(),
                    "guide/ratio_max": r.max().item()}
        return samples, info

    def before_update(self, samples: list[Sample], model, first: bool) -> dict:
        """Before each optimiser step after the batch's first: gamma of the mini-batch's hinted
        completions from the policy about to step (the first step's policy is the one ``samples``
        scored, so its gammas stand)."""
        mine = [s for s in samples if s.hinted]
        if not first and mine:
            self._set_gamma(mine, model)
        return {}

    def _set_gamma(self, hinted: list[Sample], model) -> list[torch.Tensor]:
        """Each hinted sample's ``gamma``: the 90th percentile of its ratios ``pi_theta(y|x) / pi_old(y|x,h)``
        under ``model`` (one no-grad forward; detached, at least 1e-4); returns the ratios."""
        ratios = []
        for s, lp in zip(hinted, recompute_logprobs(model, hinted, self.cfg)):
            r = torch.exp(lp - torch.tensor(s.old_logprobs))
            s.gamma = max(float(torch.quantile(r.double(), 0.9)), 1e-4)
            ratios.append(r)
        return ratios


class HINT(_HintedResample):
    name = "hint"
    options = (HintConfig, HINTConfig)

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.aapo_lambda > 0 and cfg.steps_per_generation * cfg.num_iterations == 1:
            logging.getLogger("fasthint").warning(
                "--aapo_lambda %g never acts with one optimizer step per rollout batch (the ratio is 1 there): "
                "set --steps_per_generation 2 (HINT's code syncs its sampler every 2 steps) or --aapo_lambda 0",
                cfg.aapo_lambda)

    def samples(self, groups: list[Group], ctx: RolloutContext, model=None) -> tuple[list[Sample], dict]:
        samples, hinted = self._split(groups, ctx)
        info: dict = {}
        if hinted:  # pi_old of a hinted completion: one no-grad scoring pass on the NO-hint prompt
            now = recompute_logprobs(model, [samples[i] for i in hinted], self.cfg)
            shift = []
            for i, lp in zip(hinted, now):
                shift.append(lp.double() - torch.tensor(samples[i].old_logprobs, dtype=torch.float64))
                samples[i].old_logprobs = lp.tolist()
            # diagnostic: the shift the hint itself caused, pi_theta(y|x) / pi_old(y|x,h); never a weight
            mine = [samples[i] for i in hinted]
            aff, eur, uc, gids = self._group_affinity(mine, shift)
            m = torch.tensor([g in {s.group for s in mine if s.advantage != 0.0} for g in gids], dtype=torch.bool)
            if m.any():
                info = {"affinity/sampling": aff[m].mean().item(), "affinity/sampling/eur": eur[m].mean().item(),
                        "affinity/sampling/uc": uc[m].mean().item()}
        return samples, info

    def before_update(self, samples: list[Sample], model, first: bool) -> dict:
        """Before each optimiser step: every group's Affinity from HINT's no-hint ratio
        ``pi_theta(y|x) / pi_old(y|x)`` under the policy about to step, its metrics, and the AAPO weight
        ``Affinity ** aapo_lambda`` of hinted groups. On the batch's first step the policy is the old
        one (log r = 0: Affinity 1, weight 1): no forward and no metric, since a constant is not one;
        later steps (``--steps_per_generation``/``--num_iterations``) score a mini-batch that holds
        hinted groups with one no-grad forward."""
        if first or not any(s.hinted for s in samples):  # log r = 0: Affinity 1, weights 1, nothing to log
            return {}
        now = recompute_logprobs(model, samples, self.cfg)
        lrs = [lp.double() - torch.tensor(s.old_logprobs, dtype=torch.float64) for s, lp in zip(samples, now)]
        aff, eur, uc, gids = self._group_affinity(samples, lrs)
        hinted = {s.group for s in samples if s.hinted}
        nonzero = {s.group for s in samples if s.advantage != 0.0}  # a zero-advantage group's Affinity is 0
        info = {}
        for tag, want in (("", True), ("/unhinted", False)):
            m = torch.tensor([(g in hinted) == want and g in nonzero for g in gids], dtype=torch.bool)
            if m.any():
                info[f"affinity{tag}"] = aff[m].mean().item()
                info[f"affinity/eur{tag}"] = eur[m].mean().item()
                info[f"affinity/uc{tag}"] = uc[m].mean().item()
        if self.cfg.aapo_lambda > 0:
            weight = {g: float(a) ** self.cfg.aapo_lambda for g, a in zip(gids, aff.tolist())}
            for s in samples:
                if s.hinted:
                    s.weight = weight[s.group]
        return info

    def _group_affinity(self, samples: list[Sample], log_ratios: list[torch.Tensor]):
        """``group_affinity`` (``eps = --eps_low``) of the samples' groups: (affinity, eur, uc, group ids)."""
        if not samples:
            e = torch.zeros(0, dtype=torch.float64)
            return e, e, e, []
        adv = [torch.full((len(x),), s.advantage, dtype=torch.float64) for s, x in zip(samples, log_ratios)]
        gid = [torch.full((len(x),), s.group, dtype=torch.long) for s, x in zip(samples, log_ratios)]
        gids = torch.cat(gid)
        aff, eur, uc = group_affinity(torch.cat(log_ratios).double(), torch.cat(adv), torch.ones(len(gids)), gids,
                                      eps=self.cfg.eps_low)
        return aff.double(), eur.double(), uc.double(), torch.unique(gids).tolist()
