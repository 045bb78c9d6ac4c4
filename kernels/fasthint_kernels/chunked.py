"""Bounded-memory pure-torch path: the CPU implementation of fasthint's ops.

Log-probs of a linear head without keeping ``[N, V]`` logits (ALGORITHMS.md section 5):

    z = (H W^T + b) / T,  lse = logsumexp(z),  logp = z_y - lse,  entropy = -sum_v p_v (z_v - lse)
    dL/dz_v = g (1[v=y] - p_v) - e p_v (z_v - sum_u p_u z_u),   g = dL/dlogp, e = dL/dentropy
    dH = dZ W / T,   dW = dZ^T H / T,   db = sum_t dZ / T

Forward and backward walk token chunks of at most ``chunk_elems / V`` rows; backward recomputes each
chunk's logits from the saved ``lse`` (and uses the saved entropy). Memory beyond inputs and
gradients: two ``[chunk, V]`` buffers (8 MiB each by default) plus O(N). Accumulation is in fp32
(float64 inputs stay float64).
"""
from __future__ import annotations

from typing import Optional

import torch

DEFAULT_CHUNK_ELEMS = 1 << 21  # 2M logits (8 MiB fp32) per chunk buffer


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(n: int, v: int, chunk_elems: int) -> int:
    return max(1, min(n, chunk_elems // max(1, v)))


def _logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], temperature: float) -> torch.Tensor:
    acc = _acc_dtype(h.dtype)
    z = h @ w.t()
    z = z if z.dtype == acc else z.to(acc)  # a fresh buffer either way: safe to update in place
    if b is not None:
        z.add_(b.to(acc))
    return z.div_(temperature) if temperature != 1.0 else z


class ChunkedLinearLogprobs(torch.autograd.Function):
    """logp (and entropy) of targets under softmax((H W^T + b)/T), chunked over tokens.

    Each chunk works in place on two ``[rows, V]`` buffers (logits/log-probs and probabilities).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, return_entropy: bool, chunk_elems: int):
        n, v = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden.dtype)
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        ent = torch.empty(n, dtype=acc, device=hidden.device) if return_entropy else None
        rows = _chunk_rows(n, v, chunk_elems)
        for s in range(0, n, rows):
            z = _logits(hidden[s:s + rows], weight, bias, temperature)
            l = torch.logsumexp(z, dim=-1)
            z.sub_(l.unsqueeze(-1))  # log p
            lse[s:s + rows] = l
            logp[s:s + rows] = z.gather(-1, targets[s:s + rows].long().unsqueeze(-1)).squeeze(-1)
            if ent is not None:  # -sum p log p: shift-invariant, no cancellation of large logits
                ent[s:s + rows] = -(torch.exp(z).mul_(z)).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.temperature, ctx.return_entropy, ctx.chunk_elems = temperature, return_entropy, chunk_elems
        ctx.mark_non_differentiable(targets)
        return (logp, ent) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        T = ctx.temperature
        n, v = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        db = torch.zeros(v, dtype=acc, device=weight.device) if need_b else None
        g_all = grad_logp.to(acc) if grad_logp is not None else torch.zeros(n, dtype=acc, device=hidden.device)
        with_ent = ctx.return_entropy and grad_ent is not None
        rows = _chunk_rows(n, v, ctx.chunk_elems)
        for s in range(0, n, rows):
            h = hidden[s:s + rows]
            z = _logits(h, weight, bias, T).sub_(lse[s:s + rows].unsqueeze(-1))  # log p
            p = torch.exp(z)
            g = g_all[s:s + rows].unsqueeze(-1)
            if with_ent:  # z <- e p (log p + entropy): d entropy / d z_v = -p_v (log p_v + entropy)
                e = grad_ent[s:s + rows].to(acc).unsqueeze(-1)
                z.add_(ent[s:s + rows].unsqueeze(-1)).mul_(p).mul_(e)
            dz = p.mul_(-g)  # dz = g (1[v=y] - p) - e p (log p + entropy), in p's buffer
            dz.scatter_add_(-1, targets[s:s + rows].long().unsqueeze(-1), g)
            if with_ent:
                dz.sub_(z)
            if T != 1.0:
                dz.div_(T)
            if need_h:
                dh[s:s + rows] = dz @ weight if hidden.dtype == acc else (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                dw.addmm_(dz.t(), h.to(acc))
            if need_b:
                db += dz.sum(0)
        return (dh, dw.to(weight.dtype) if need_w else None, db.to(bias.dtype) if need_b else None,
                None, None, None, None)


def linear_logprobs_chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                            bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                            return_entropy: bool = False, chunk_elems: int = DEFAULT_CHUNK_ELEMS):
    """Bounded-memory log-probs (and entropy) of ``targets`` under a linear head; see module doc."""
    return ChunkedLinearLogprobs.apply(hidden, weight, bias, targets, float(temperature), bool(return_entropy),
                                       int(chunk_elems))


def group_advantages_torch(rewards: torch.Tensor, group_ids: torch.Tensor, *, scale: str = "group",
                           eps: float = 1e-6) -> torch.Tensor:
    """Vectorised segment mean/std version of ``reference.group_advantages_ref`` (float32 out)."""
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    r = rewards.to(torch.float64)
    _, inv = torch.unique(group_ids, return_inverse=True)
    k = int(inv.max().item()) + 1 if inv.numel() else 0
    cnt = torch.zeros(k, dtype=torch.float64, device=r.device).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(k, dtype=torch.float64, device=r.device).index_add_(0, inv, r) / cnt
    centred = r - mean[inv]
    ss = torch.zeros(k, dtype=torch.float64, device=r.device).index_add_(0, inv, centred * centred)
    rmax = torch.full((k,), -torch.inf, dtype=torch.float64, device=r.device).scatter_reduce_(0, inv, r, "amax")
    rmin = torch.full((k,), torch.inf, dtype=torch.float64, device=r.device).scatter_reduce_(0, inv, r, "amin")
    signal = (cnt > 1) & (rmax > rmin)
    if scale == "group":
        std = torch.sqrt(ss / (cnt - 1).clamp_min(1))
        centred = centred / (std[inv] + eps)
    elif scale == "batch":
        bstd = r.std(unbiased=True) if r.numel() > 1 else r.new_tensor(0.0)
        centred = centred / (bstd + eps)
    return torch.where(signal[inv], centred, torch.zeros_like(centred)).to(torch.float32)
