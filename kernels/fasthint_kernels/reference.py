"""Materialising pure-torch references of every fasthint op: the oracle for tests and benchmarks.

These compute in the dtype they are given (float64 for ground truth) and build the full
``[N, V]`` logits; they are not meant for training large vocabularies. The head's log-probs use
optional final-logit soft-capping (Gemma-2): ``softcap_c(z) = c * tanh(z / c)``, applied before
the temperature.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fasthint_kernels.spec import PGSpec

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def group_advantages_ref(rewards: torch.Tensor, group_ids: torch.Tensor, *, scale: str = "group",
                         eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages (docs/ALGORITHMS.md §1.3), one per completion.

    ``group``: (r - mean_g) / (std_g + eps); ``batch``: (r - mean_g) / (std_batch + eps);
    ``none``: r - mean_g. std is Bessel-corrected; a group of one or with all-equal rewards gets 0.
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    r = rewards.to(torch.float64)
    out = torch.zeros_like(r)
    batch_std = r.std(unbiased=True) if r.numel() > 1 else r.new_tensor(0.0)
    for g in torch.unique(group_ids):
        idx = (group_ids == g).nonzero(as_tuple=True)[0]
        rg = r[idx]
        if rg.numel() < 2 or bool((rg == rg[0]).all()):
            continue
        centred = rg - rg.mean()
        if scale == "group":
            centred = centred / (rg.std(unbiased=True) + eps)
        elif scale == "batch":
            centred = centred / (batch_std + eps)
        out[idx] = centred
    return out.to(torch.float32) if rewards.dtype != torch.float64 else out


def fp32_dots_exact() -> bool:
    """Whether torch keeps fp32 matmuls in full fp32 (its default: ``float32_matmul_precision`` "highest"
    and ``torch.backends.cuda.matmul.allow_tf32`` off). The Triton kernels follow it: full-fp32 dots
    ("ieee", FMA units, not tensor cores) when True, TF32 tensor cores when the user allowed them."""
    return torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32


def check_softcap(softcap: Optional[float]) -> Optional[float]:
    """``None`` (no soft-capping) or the cap ``c`` as a float; anything but a finite ``c > 0`` raises."""
    if softcap is None:
        return None
    try:
        c = float(softcap)
    except (TypeError, ValueError):
        c = float("nan")
    if isinstance(softcap, (bool, str, bytes)) or not math.isfinite(c) or c <= 0:
        raise ValueError(f"softcap must be None or a finite positive float, got {softcap!r}")
    return c


def linear_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                        bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                        return_entropy: bool = False, softcap: Optional[float] = None):
    """log softmax(softcap_c(H W^T + b) / T)[y] (and the entropy of that distribution), via full logits;
    ``softcap_c(z) = c tanh(z / c)`` for ``softcap=c``, the identity for ``None``."""
    softcap = check_softcap(softcap)
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    logp = logprobs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


def policy_loss_ref(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                    ref_logp: Optional[torch.Tensor] = None, beta: float = 0.0, eps_low: float = 0.2,
                    eps_high: float = 0.28, dual_clip: Optional[float] = None, loss_agg: str = "token-mean",
                    num_tokens: Optional[float] = None, seq_ids: Optional[torch.Tensor] = None,
                    num_seqs: Optional[float] = None, seq_weights: Optional[torch.Tensor] = None,
                    shaped_gamma: Optional[torch.Tensor] = None):
    """Clipped policy-gradient loss over packed tokens ``[N]`` (docs/ALGORITHMS.md §1.4-1.5).

    Per token: ``ratio = exp(logp - old)``, ``obj = min(ratio*A, clip(ratio, 1-eps_low, 1+eps_high)*A)``,
    dual clip ``obj = max(obj, c*A)`` where ``A < 0``, ``loss_t = -obj + beta * k3(ref, logp)``,
    times ``seq_weights`` when given. Tokens with ``shaped_gamma > 0`` (Guide's hinted completions,
    section 3) use the unclipped shaped objective ``obj = A * ratio / (ratio + gamma)`` instead.
    Aggregation over ``mask`` tokens:
    ``token-mean``: sum / num_tokens (default: mask.sum());
    ``seq-mean-token-mean``: per-sequence mean (``seq_ids``), summed / num_seqs (default: #sequences);
    ``seq-mean-token-sum-norm``: sum / num_tokens, where the caller passes batch size x max length.
    Returns (loss, stats) with stats ``clip_ratio/low``, ``clip_ratio/high``, ``kl`` as token means.
    """
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    m = mask.to(logp.dtype)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logp.dtype)
    obj = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    if dual_clip is not None:
        obj = torch.where(adv < 0, torch.maximum(obj, dual_clip * adv), obj)
    if shaped_gamma is not None:
        gam = shaped_gamma.to(logp.dtype)
        shaped = gam > 0
        obj = torch.where(shaped, adv * ratio / (ratio + torch.where(shaped, gam, torch.ones_like(gam))), obj)
    tok = -obj
    kl = None
    if ref_logp is not None and beta > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        tok = tok + beta * kl
    if seq_weights is not None:
        tok = tok * seq_weights.to(tok.dtype)
    tok = torch.where(mask.bool(), tok, torch.zeros_like(tok))  # not tok * m: NaN/inf off the mask stay out
    if loss_agg == "seq-mean-token-mean":
        if seq_ids is None:
            raise ValueError("loss_agg='seq-mean-token-mean' needs seq_ids (the sequence index of each token)")
        n_seq_local = int(seq_ids.max().item()) + 1 if seq_ids.numel() else 0
        per_seq = torch.zeros(n_seq_local, dtype=tok.dtype, device=tok.device).index_add_(0, seq_ids, tok)
        cnt = torch.zeros(n_seq_local, dtype=tok.dtype, device=tok.device).index_add_(0, seq_ids, m.to(tok.dtype))
        has = cnt > 0
        denom = float(num_seqs) if num_seqs is not None else float(has.sum().item())
        loss = (per_seq[has] / cnt[has]).sum() / max(denom, 1.0)
    else:
        denom = float(num_tokens) if num_tokens is not None else float(m.sum().item())
        loss = tok.sum() / max(denom, 1.0)
    with torch.no_grad():
        n = m.sum().clamp_min(1)
        stats = {
            "clip_ratio/low": (((ratio < 1 - eps_low) & (adv < 0)).to(m.dtype) * m).sum() / n,
            "clip_ratio/high": (((ratio > 1 + eps_high) & (adv > 0)).to(m.dtype) * m).sum() / n,
            "kl": ((torch.where(mask.bool(), kl, torch.zeros_like(kl)).sum() / n) if kl is not None
                   else torch.zeros((), dtype=m.dtype, device=m.device)),
        }
    return loss, stats


def pg_loss_torch(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, spec: PGSpec, *,
                  bias: Optional[torch.Tensor] = None, temperature: float = 1.0, softcap: Optional[float] = None):
    """The policy-gradient loss of :class:`PGSpec` with materialised logits, in ``hidden``'s dtype
    (the float64 oracle of ``fused_pg``; the formulas are at the top of ``fused_pg.py``):
    ``(loss, logp, entropy)``, the last two detached."""
    lp, ent = linear_logprobs_ref(hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=True,
                                  softcap=softcap)
    dt = lp.dtype
    old, adv, w = (x.to(dt) for x in (spec.old_logp, spec.advantages, spec.weights))
    r = torch.exp(lp - old)
    o = torch.minimum(r * adv, torch.clamp(r, 1 - spec.eps_low, 1 + spec.eps_high) * adv)
    if spec.dual_clip is not None:
        o = torch.where(adv < 0, torch.maximum(o, spec.dual_clip * adv), o)
    if spec.gamma is not None:
        gam = spec.gamma.to(dt)
        o = torch.where(gam > 0, adv * r / (r + torch.where(gam > 0, gam, 1.0)), o)
    loss = -o * (spec.is_weights.to(dt) if spec.is_weights is not None else 1.0)
    if spec.ref_logp is not None and spec.beta > 0:
        dd = spec.ref_logp.to(dt) - lp
        loss = loss + spec.beta * (torch.exp(dd) - dd - 1)
    if spec.entropy_coef > 0:
        loss = loss - spec.entropy_coef * ent
    tok = torch.where(w != 0, w * loss, torch.zeros_like(loss))
    return tok.sum(), lp.detach(), ent.detach()
