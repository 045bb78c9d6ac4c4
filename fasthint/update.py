"""The policy update: one optimizer step over this rank's samples, normalised globally.

Every rank divides its loss by the *global* normaliser (tokens or sequences summed over ranks, one
all-reduce), so the gradients FSDP sums over ranks are exactly those of one process holding the
whole batch. Under FSDP every rank runs the same number of micro-batches (a rank with fewer runs
zero-weight ones), because each forward/backward of a sharded model is a collective.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fasthint import dist
from fasthint.batch import Sample, _collate, make_micro_batches, split_mini_batches
from fasthint.errors import FastHintError
from fasthint.loss import (PolicyLoss, Term, autocast_bf16, clip_terms, micro_batch_logprobs, model_inputs,
                           recompute_logprobs)
from fasthint.options import Options, at_least, need, option


@dataclass
class OptimConfig(Options):
    """The optimiser and how a step is cut into forward/backward passes."""

    GROUP = "optimisation"
    learning_rate: float = option(2e-4, "AdamW learning rate (the peak, after warm-up); the default suits "
                                        "the toy: for real models use about 1e-6.")
    lr_scheduler_type: str = option("cosine", "learning rate after warm-up (TRL's name): constant, linear or "
                                              "cosine (both towards 0 at the last optimiser step); the recipes "
                                              "set constant, as the papers ran.")
    warmup_steps: int = option(0, "linear learning-rate warm-up steps.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.99, "AdamW beta2.")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = off).")
    micro_batch_size: int = option(64, "sequences per forward/backward; gradients are accumulated.")
    micro_batch_tokens: int = option(0, "also cap each forward/backward at this many padded tokens (sequences x "
                                        "longest), so long and short rollouts use memory alike (0 = no cap).")
    padding_free: bool = option(False, "pack each micro-batch's sequences into one row without padding "
                                       "(positions restart per sequence; flash-attn's variable-length kernels "
                                       "on CUDA, per-sequence SDPA elsewhere); --micro_batch_tokens then counts "
                                       "real tokens and micro-batches are filled first-fit.")
    steps_per_generation: int = option(1, "optimiser steps per rollout batch: the batch is cut into this many "
                                          "mini-batches of whole groups, one step each (TRL's name; verl: "
                                          "train_batch_size / ppo_mini_batch_size).")
    num_iterations: int = option(1, "passes over each rollout batch (TRL's name; verl's ppo_epochs). With more "
                                    "than one step per batch the trainer recomputes the old log-probs first, "
                                    "so the ratio starts at 1 and clipping acts on the later steps.")

    def check(self) -> None:
        need(self.learning_rate > 0, f"--learning_rate must be > 0 (got {self.learning_rate})")
        need(self.lr_scheduler_type in LR_SCHEDULES,
             f"--lr_scheduler_type {self.lr_scheduler_type!r}: use one of {', '.join(LR_SCHEDULES)}")
        at_least(self, ("micro_batch_size", "steps_per_generation", "num_iterations"), 1)
        at_least(self, ("warmup_steps", "micro_batch_tokens"), 0)
        need(self.max_grad_norm >= 0, f"--max_grad_norm must be >= 0 (got {self.max_grad_norm})")
        need(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "--adam_beta1/2 must be in [0, 1)")

    def build(self, params, total_steps: int = 0) -> tuple:
        """AdamW over ``params`` and its schedule: linear warm-up over ``warmup_steps``, then
        ``lr_scheduler_type`` over the rest of ``total_steps`` optimiser steps."""
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, betas=(self.adam_beta1, self.adam_beta2),
                                      weight_decay=self.weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(lr_factor, self.lr_scheduler_type, self.warmup_steps, total_steps))


LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(kind: str, warmup: int, total: int, step: int) -> float:
    """The learning rate's factor before optimiser step ``step`` (0-based): (s + 1) / (warmup + 1)
    during warm-up, then 1 (constant) or decaying towards 0 at step ``total`` (linear, cosine; as
    transformers' schedules, so the last of ``total`` steps still moves the weights)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant" or total <= warmup:
        return 1.0
    frac = min(1.0, (step - warmup) / (total - warmup))
    return 1.0 - frac if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))


def _as_policy(model) -> PolicyLoss:
    return model if isinstance(model, PolicyLoss) else PolicyLoss(model)


BeforeUpdate = Callable[[list, torch.nn.Module, bool], dict]  # (mini-batch samples, lm, first) -> metrics


def policy_update(model, samples: list[Sample], cfg, optimizer, scheduler, ref_model=None,
                  terms: Optional[list[Term]] = None, before_update: Optional[BeforeUpdate] = None) -> dict:
    """The optimiser steps of one rollout batch: ``cfg.num_iterations`` passes over its
    ``cfg.steps_per_generation`` mini-batches (whole groups), one :func:`train_step` each; metrics
    are means over the steps (token counts per pass, ``*/max`` the largest).

    With more than one step, the old log-probs are first recomputed by the trainer (verl's
    recompute; samples with ``keep_old_logprobs`` keep theirs) so that the first step's ratio is 1
    and the later steps' ratios measure how far the policy moved: clipping acts there.
    ``sampling/logp_diff/*`` then compare this recompute with the sampler, and ``policy/logp_diff/*``
    the steps' log-probs with it (0 on the first step). ``before_update(mini, lm,
    first)`` runs before each step (HINT's Affinity weights); its metrics are averaged like the rest.
    With one step and one pass this is exactly ``train_step(samples)``.
    """
    policy = _as_policy(model)
    steps = cfg.steps_per_generation * cfg.num_iterations
    mismatch = _recompute_old_logprobs(policy, samples, cfg) if steps > 1 else {}
    minis = split_mini_batches(samples, cfg.steps_per_generation) if cfg.steps_per_generation > 1 else [samples]
    outs: list[dict] = []
    for _ in range(cfg.num_iterations):
        for mini in minis:
            first = not outs
            extra = {}
            if before_update is not None:  # the first step's policy is the old one: no forward needed
                with contextlib.nullcontext() if first else dist.gathered(policy):
                    extra = before_update(mini, policy.lm, first)
            outs.append({**train_step(policy, mini, cfg, optimizer, scheduler, ref_model, terms), **extra})
    out = _mean_over_steps(outs, cfg.num_iterations)
    if mismatch:  # the steps' |logp - old| is the policy's own drift since the recompute
        out["policy/logp_diff/mean"] = out.pop("sampling/logp_diff/mean")
        out["policy/logp_diff/max"] = out.pop("sampling/logp_diff/max")
        out.update(mismatch)
    return out


def _mean_over_steps(outs: list[dict], passes: int) -> dict:
    if len(outs) == 1:
        return outs[0]
    out = {}
    for k in dict.fromkeys(k for o in outs for k in o):
        vals = [o[k] for o in outs if k in o]
        if k in ("num_tokens/trained", "num_tokens/hinted"):
            out[k] = int(sum(vals) / passes)
        elif k.endswith("/max"):
            out[k] = max(vals)
        else:
            out[k] = sum(vals) / len(vals)
    return out


def _recompute_old_logprobs(policy: PolicyLoss, samples: list[Sample], cfg) -> dict:
    """Replaces each sample's old log-probs (but those with ``keep_old_logprobs``) by the current
    policy's, in the loss's precision; returns the sampler/trainer mismatch of the unhinted ones."""
    todo = [s for s in samples if not s.keep_old_logprobs]
    with dist.gathered(policy):
        now = recompute_logprobs(policy.lm, todo, cfg) if todo else []
    diff_sum, n, diff_max = 0.0, 0, 0.0
    for s, lp in zip(todo, now):
        if not s.hinted and len(lp):
            d = (lp - torch.tensor(s.old_logprobs)).abs()
            diff_sum, n, diff_max = diff_sum + d.sum().item(), n + d.numel(), max(diff_max, d.max().item())
        s.old_logprobs = lp.tolist()
    diff_sum, n = dist.all_sum([diff_sum, n])
    return {"sampling/logp_diff/mean": diff_sum / n if n else float("nan"),
            "sampling/logp_diff/max": dist.all_max(diff_max)}


def train_step(model, samples: list[Sample], cfg, optimizer, scheduler, ref_model=None,
               terms: Optional[list[Term]] = None) -> dict:
    """One optimizer step over ``samples`` with gradient accumulation and a global normaliser.

    ``terms``: the per-token objective (``fasthint.loss``; the algorithm's ``objective()``); default
    the clipped surrogate and k3 KL from ``cfg``.

    ``model`` is the causal LM or its :class:`fasthint.loss.PolicyLoss` (FSDP root). Without KL or an entropy
    bonus (a term that ``acts_without_advantage``), a sample whose advantage (or weight) is 0 adds exactly
    nothing to the loss or its gradient, so it is skipped (it still counts in the normaliser); token
    metrics are then over the trained tokens of all ranks: entropy and KL over all of them, the clip
    ratios and the sampler/trainer log-prob mismatch over the unhinted ones (a hinted token may train
    in another context than it was sampled in).
    """
    policy = _as_policy(model)
    lm = policy.lm
    if terms is None:
        terms = clip_terms(cfg.eps_low, cfg.eps_high, cfg.dual_clip, cfg.beta, entropy_coef=cfg.entropy_coef)
    if cfg.mask_truncated:  # overlong masking: no loss, and not in the normaliser
        samples = [s for s in samples if not s.truncated]
    n_tokens, num_seqs = dist.all_sum([sum(len(s.completion_ids) for s in samples), len(samples)])
    norm = n_tokens if cfg.loss_agg == "token-mean" else num_seqs * cfg.max_new_tokens
    if ref_model is None and not any(t.acts_without_advantage for t in terms):  # they would add exactly 0
        samples = [s for s in samples if s.advantage != 0.0 and s.weight != 0.0]
    pad = lm.config.pad_token_id or 0
    device = next(lm.parameters()).device
    mbs = make_micro_batches(samples, cfg.micro_batch_size, pad, device=device, max_tokens=cfg.micro_batch_tokens,
                             packed=cfg.padding_free)
    n_mb = int(dist.all_max(len(mbs)))
    autocast = autocast_bf16(cfg)
    acc = {"loss": 0.0, "clip_ratio/low": 0.0, "clip_ratio/high": 0.0, "entropy": 0.0, "kl": 0.0,
           "logp_diff_sum": 0.0, "tokens": 0.0, "tokens_unhinted": 0.0, "input_tokens": 0.0, "real_tokens": 0.0}
    diff_max = 0.0
    scale = float(dist.world_size())  # FSDP averages gradients over ranks; the sum is wanted
    optimizer.zero_grad(set_to_none=True)
    for i in range(n_mb):
        real = i < len(mbs)
        mb = mbs[i] if real else _idle_micro_batch(pad, device)
        loss, stats = micro_batch_loss(policy, mb, cfg, terms, norm, num_seqs, ref_model, autocast)
        if not real:  # keeps the collectives of a sharded model in step; contributes nothing
            (loss * 0.0).backward()
            continue
        if not torch.isfinite(loss):
            raise FastHintError("the loss is not finite (NaN/inf): lower --learning_rate or check the "
                                "rewards; nothing was updated at this step")
        (loss * scale if scale != 1.0 else loss).backward()
        logp, k = stats["logp"], stats["logp"].numel()
        unhinted = mb.hinted == 0 if mb.hinted is not None else None
        k_u = int(unhinted.sum().item()) if unhinted is not None else k
        acc["loss"] += loss.item()
        acc["input_tokens"] += mb.num_input_tokens
        acc["real_tokens"] += mb.num_input_tokens if mb.packed else mb.attention_mask.sum().item()
        for key in ("clip_ratio/low", "clip_ratio/high"):
            acc[key] += stats[key].item() * k_u
        acc["kl"] += stats["kl"].item() * k
        acc["entropy"] += stats["entropy"].sum().item()
        diff = (logp - mb.old_logp).abs()
        diff = diff[unhinted] if unhinted is not None else diff
        acc["logp_diff_sum"] += diff.sum().item()
        acc["tokens"] += k
        acc["tokens_unhinted"] += k_u
        diff_max = max(diff_max, diff.max().item() if k_u else 0.0)
    gn = _clip_and_step(policy, cfg, optimizer, scheduler, stepped=n_mb > 0)
    keys = list(acc)
    acc = dict(zip(keys, dist.all_sum([acc[k] for k in keys])))
    n, nu = acc["tokens"] or float("nan"), acc["tokens_unhinted"] or float("nan")
    out = {"loss": acc["loss"], "grad_norm": gn, "entropy": acc["entropy"] / n,
           "clip_ratio/low": acc["clip_ratio/low"] / nu, "clip_ratio/high": acc["clip_ratio/high"] / nu,
           "sampling/logp_diff/mean": acc["logp_diff_sum"] / nu, "sampling/logp_diff/max": dist.all_max(diff_max),
           "num_tokens/trained": int(acc["tokens"]), "num_tokens/hinted": int(acc["tokens"] - acc["tokens_unhinted"]),
           "num_tokens/padding_frac": 1.0 - acc["real_tokens"] / acc["input_tokens"] if acc["input_tokens"] else 0.0}
    if ref_model is not None:
        out["kl"] = acc["kl"] / n
    return out


def micro_batch_loss(policy: PolicyLoss, mb, cfg, terms: list[Term], norm: float, num_seqs: float,
                     ref_model=None, autocast: bool = False, **loss_overrides) -> tuple:
    """``(loss, stats)`` of micro-batch ``mb`` under the objective ``terms`` with the global normalisers
    (the reference model's log-probs first when there is one): the forward of every update step, and
    of its rehearsal (``fasthint.rehearse``; ``loss_overrides`` replace keyword arguments there)."""
    ref_logp = micro_batch_logprobs(ref_model, mb, cfg.temperature, autocast) if ref_model is not None else None
    kwargs = dict(advantages=mb.advantages, mask=torch.ones_like(mb.old_logp), old_logp=mb.old_logp,
                  temperature=cfg.temperature, return_entropy=True, ref_logp=ref_logp, terms=terms,
                  loss_agg=cfg.loss_agg, num_tokens=norm, seq_ids=mb.seq_ids, num_seqs=num_seqs,
                  seq_weights=mb.weights, token_fields=_token_fields(mb),
                  sampler_mask=1.0 - mb.hinted if mb.hinted is not None else None,
                  grad_filter=cfg.head_grad_filter or None)
    kwargs.update(loss_overrides)
    return policy(mb.input_ids, mb.attention_mask, mb.score_index, mb.targets, autocast=autocast,
                  model_kwargs=model_inputs(policy.lm, mb) if mb.packed else None, **kwargs)


def _token_fields(mb) -> dict:
    """The per-token fields the objective's terms read: Guide's ``gamma``, the TIS ``is_weight``."""
    fields = {"gamma": mb.gamma, "is_weight": mb.is_weights}
    return {k: v for k, v in fields.items() if v is not None}


def _clip_and_step(policy, cfg, optimizer, scheduler, stepped: bool) -> float:
    """Clips the global gradient norm, steps (a no-op when no parameter has a gradient); the norm."""
    params = [p for p in policy.parameters() if p.grad is not None]
    gn = torch.zeros(())
    if stepped and params:
        gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
    if not torch.isfinite(gn):
        optimizer.zero_grad(set_to_none=True)
        raise FastHintError("the gradient norm is not finite: lower --learning_rate; nothing was updated")
    optimizer.step()
    scheduler.step()
    # the gradients go now, not at the next step's start: between steps (rollouts, vLLM awake) they
    # would hold 4 bytes per parameter / world of device memory for nothing (fasthint.rehearse)
    optimizer.zero_grad(set_to_none=True)
    return gn.item()


def _idle_micro_batch(pad: int, device):
    """A one-token micro-batch with zero advantage, for a rank with fewer micro-batches than others."""
    return _collate([Sample([pad], [pad], [0.0], 0.0, weight=0.0)], pad, device)
