"""Triton kernel: group-normalised advantages (segment mean/std), exact against the reference.

For a group g with rewards r_i (n_g of them):
    mean_g = sum r / n_g,  std_g = sqrt(sum (r - mean_g)^2 / (n_g - 1))   (Bessel)
    scale=group: A_i = (r_i - mean_g) / (std_g + eps);  batch: / (std_batch + eps);  none: r_i - mean_g
    A_i = 0 when n_g = 1 or all r in the group are equal.
Groups are keyed by arbitrary int64 ids: the launcher sorts by id (torch) so that every group is one
contiguous segment; one program per group walks its segment twice (mean, then centred sum of
squares) in float64, so the result equals the float64 reference up to the final float32 rounding.
Memory: O(B).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _group_adv(R, ORDER, STARTS, OUT, inv_batch_std, eps, MODE: tl.constexpr, BLOCK: tl.constexpr):
    gid = tl.program_id(0)
    start = tl.load(STARTS + gid)
    end = tl.load(STARTS + gid + 1)
    n = end - start
    total = tl.zeros((BLOCK,), tl.float64)
    rmin = tl.full((BLOCK,), float("inf"), tl.float64)
    rmax = tl.full((BLOCK,), float("-inf"), tl.float64)
    for i0 in range(start, end, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        mask = offs < end
        r = tl.load(R + tl.load(ORDER + offs, mask=mask, other=0), mask=mask, other=0.0).to(tl.float64)
        total += r
        rmin = tl.minimum(rmin, tl.where(mask, r, float("inf")))
        rmax = tl.maximum(rmax, tl.where(mask, r, float("-inf")))
    mean = tl.sum(total, axis=0) / n
    signal = (n > 1) & (tl.max(rmax, axis=0) > tl.min(rmin, axis=0))
    ss = tl.zeros((BLOCK,), tl.float64)
    for i0 in range(start, end, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        mask = offs < end
        r = tl.load(R + tl.load(ORDER + offs, mask=mask, other=0), mask=mask, other=0.0).to(tl.float64)
        c = tl.where(mask, r - mean, 0.0)
        ss += c * c
    denom = tl.maximum(n - 1, 1).to(tl.float64)
    std = tl.sqrt(tl.sum(ss, axis=0) / denom)
    for i0 in range(start, end, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        mask = offs < end
        idx = tl.load(ORDER + offs, mask=mask, other=0)
        a = tl.load(R + idx, mask=mask, other=0.0).to(tl.float64) - mean
        if MODE == 0:
            a = a / (std + eps)
        elif MODE == 1:
            a = a * inv_batch_std
        a = tl.where(signal, a, 0.0)
        tl.store(OUT + idx, a.to(tl.float32), mask=mask)


_MODES = {"group": 0, "batch": 1, "none": 2}


def group_advantages_triton(rewards: torch.Tensor, group_ids: torch.Tensor, *, scale: str = "group",
                            eps: float = 1e-6) -> torch.Tensor:
    """Same contract as ``reference.group_advantages_ref`` (float32 out), computed by ``_group_adv``."""
    if scale not in _MODES:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    r = rewards.contiguous().to(torch.float64)
    out = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    if r.numel() == 0:
        return out
    ids, order = torch.sort(group_ids.contiguous(), stable=True)
    _, counts = torch.unique_consecutive(ids, return_counts=True)
    starts = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=r.device)
    starts[1:] = torch.cumsum(counts, 0)
    inv_batch_std = 0.0
    if scale == "batch":
        bstd = r.std(unbiased=True).item() if r.numel() > 1 else 0.0
        inv_batch_std = 1.0 / (bstd + eps)
    _group_adv[(counts.numel(),)](r, order, starts, out, inv_batch_std, eps, MODE=_MODES[scale], BLOCK=64)
    return out
