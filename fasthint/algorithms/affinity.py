"""HINT's Affinity diagnostic: how well a group's (hint-guided) tokens fit the current policy.

For one group, with per-token log importance ratio ``log r_t`` and the sequence advantage ``A_i``:

* token weights ``w_t = |A_i|`` on the counted tokens of sequence ``i`` (mask 1), 0 elsewhere;
* ``B`` = counted tokens inside the clip band ``1-eps <= r_t <= 1+eps`` (inclusive; the test is done
  in log space, ``log(1-eps) <= log r_t <= log(1+eps)``; a non-finite ``log r_t`` is outside);
* ``EUR = sum_B w / sum w``  (effective-update ratio: advantage mass the clipped loss still uses);
* ``mu = sum_B w log r / sum_B w``;  ``UC = sqrt(sum_B w (log r - mu)^2 / sum_B w)``  (update spread);
* ``tau = ln(1+eps) / 2``;  ``Affinity = EUR * exp(-UC / tau)``.

All three are 0 when ``sum w = 0`` (all advantages 0 or no counted tokens), and when ``sum_B w = 0``
(every counted token outside the band). Masked-out tokens never leak NaN/inf into the result.

Affinity is a diagnostic (logged per step) and, detached, the AAPO weight: AAPO multiplies a hinted
group's loss by ``Affinity ** lambda``. Nothing here tracks gradients.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["affinity", "group_affinity"]


def _out_dtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    pos = den > 0
    return torch.where(pos, num / torch.where(pos, den, torch.ones_like(den)), torch.zeros_like(num))


def _scatter_affinity(lr: Tensor, adv: Tensor, mask: Tensor, idx: Tensor, k: int,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token 1-D inputs and segment index ``idx`` in ``[0, k)`` -> three ``[k]`` tensors."""
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    dtype = _out_dtype(lr, adv)
    lr, adv = lr.detach().to(dtype), adv.detach().to(dtype)
    counted = mask.detach() != 0
    lo = math.log1p(-eps) if eps < 1 else -math.inf
    hi = math.log1p(eps)
    inside = counted & torch.isfinite(lr) & (lr >= lo) & (lr <= hi)
    zero = torch.zeros((), dtype=dtype, device=lr.device)
    w = torch.where(counted, adv.abs(), zero)
    w_b = torch.where(inside, w, zero)
    lr_b = torch.where(inside, lr, zero)

    def seg_sum(v: Tensor) -> Tensor:
        return torch.zeros(k, dtype=dtype, device=lr.device).index_add_(0, idx, v)

    sum_w, sum_bw = seg_sum(w), seg_sum(w_b)
    mu = _safe_div(seg_sum(w_b * lr_b), sum_bw)
    dev = torch.where(inside, lr_b - mu[idx], zero)
    uc = _safe_div(seg_sum(w_b * dev * dev), sum_bw).clamp_min(0).sqrt()
    eur = _safe_div(sum_bw, sum_w)
    tau = math.log1p(eps) / 2
    return eur * torch.exp(-uc / tau), eur, uc


@torch.no_grad()
def affinity(log_ratio: Tensor, advantages: Tensor, mask: Tensor, *,
             eps: float = 0.2) -> tuple[Tensor, Tensor, Tensor]:
    """Affinity of ONE group: ``log_ratio`` ``[B, T]``, ``advantages`` ``[B]``, ``mask`` ``[B, T]``.

    Returns 0-dim ``(affinity, eur, uc)``, float64 if the inputs are float64, else float32.
    """
    if log_ratio.dim() != 2 or mask.shape != log_ratio.shape or advantages.shape != log_ratio.shape[:1]:
        raise ValueError(f"expected log_ratio/mask [B, T] and advantages [B]; got "
                         f"{tuple(log_ratio.shape)}, {tuple(mask.shape)}, {tuple(advantages.shape)}")
    adv = advantages[:, None].expand_as(log_ratio)
    idx = torch.zeros(log_ratio.numel(), dtype=torch.long, device=log_ratio.device)
    out = _scatter_affinity(log_ratio.reshape(-1), adv.reshape(-1), mask.reshape(-1), idx, 1, eps)
    return tuple(t[0] for t in out)  # type: ignore[return-value]


@torch.no_grad()
def group_affinity(log_ratio: Tensor, advantages: Tensor, mask: Tensor, group_ids: Tensor, *,
                   eps: float = 0.2) -> tuple[Tensor, Tensor, Tensor]:
    """Affinity of every group in a packed token stream; all inputs ``[N]``.

    ``advantages`` is per token (the sequence's advantage repeated on its tokens); ``group_ids`` is an
    int64 group id per token (need not be sorted or contiguous). Returns ``(affinity, eur, uc)``, each
    ``[K]``, in the order of ``torch.unique(group_ids)`` (ascending sorted unique ids): entry ``j``
    belongs to group ``torch.unique(group_ids)[j]``. Float64 for float64 input, else float32.
    """
    shape = log_ratio.shape
    if len(shape) != 1 or advantages.shape != shape or mask.shape != shape or group_ids.shape != shape:
        raise ValueError(f"expected 1-D inputs of equal length; got {tuple(log_ratio.shape)}, "
                         f"{tuple(advantages.shape)}, {tuple(mask.shape)}, {tuple(group_ids.shape)}")
    uniq, inv = torch.unique(group_ids, sorted=True, return_inverse=True)
    return _scatter_affinity(log_ratio, advantages, mask, inv.reshape(-1), uniq.numel(), eps)
