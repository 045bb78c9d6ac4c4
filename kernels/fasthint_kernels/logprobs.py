"""Triton kernels: log-probs (and entropy) of a linear head without materialising the logits.

Math (docs/ALGORITHMS.md §5), per token t with z = (h_t W^T + b) / T:

    forward:  online over vocab tiles, fp32, identity m = -inf:
              m' = max(m, max_v z_v);  s' = s e^(m-m') + sum_v e^(z_v-m')
              q' = e^(m-m') (q + s (m-m')) + sum_v e^(z_v-m') (z_v-m')      [q = sum e^(z-m)(z-m)]
              lse = m + log s,  logp = z_y - lse,  entropy = log s - q / s
    backward: g = dL/dlogp, e = dL/dentropy, log p_v = z_v - lse recomputed tile by tile:
              dz_v = g (1[v=y] - p_v) - e p_v (log p_v + entropy)
              dH = dz W / T,  dW = dz^T H / T,  db = sum_t dz / T

Kernels: ``_fwd`` (grid: token tiles), ``_bwd_dh`` (grid: token tiles; each program owns its rows of
dH) and ``_bwd_dw`` (grid: vocab tiles; each program owns its rows of dW and db). No atomics, so
results are deterministic. FLOPs: forward 2NDV, backward 8NDV (each backward kernel recomputes its
logit tiles). Memory beyond the inputs and their gradients: fp32 accumulators for dH/dW (when the
inputs are not fp32) and O(N) vectors; never ``[N, V]``. Token tiles run on grid axis 0 (no 65,535
limit). Works on CPU tensors under ``TRITON_INTERPRET=1`` (tests use fp32 there: the interpreter's
bf16 ``tl.dot`` is wrong).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _logit_tile(H, W, B, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv, inv_t,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] in fp32 (masked vocab columns = -inf)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(H + offs_n[:, None] * stride_hn + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0)
        w = tl.load(W + offs_v[:, None] * stride_wv + offs_d[None, :], mask=mask_v[:, None] & mask_d[None, :],
                    other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(B + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return tl.where(mask_v[None, :], acc * inv_t, float("-inf"))


@triton.jit
def _online_update(z, y, offs_v, mask_v, m, s, q, zy, WITH_ENT: tl.constexpr):
    """One vocabulary tile of the online log-sum-exp (and entropy) sweep above: (m, s, q, zy) updated."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp(m - m_new)
    zc = z - m_new[:, None]
    p = tl.exp(zc)
    if WITH_ENT:  # the where()s keep -inf (masked columns, the initial m) out of products
        shift = s * tl.where(s > 0, m - m_new, 0.0)
        q = alpha * (q + shift) + tl.sum(p * tl.where(mask_v[None, :], zc, 0.0), axis=1)
    s = alpha * s + tl.sum(p, axis=1)
    zy += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
    return m_new, s, q, zy


@triton.jit
def _fwd(H, W, B, Y, LOGP, LSE, ENT, N, V, D, stride_hn, stride_wv, inv_t,
         HAS_BIAS: tl.constexpr, WITH_ENT: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PREC: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    y = tl.load(Y + offs_n, mask=mask_n, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    q = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _logit_tile(H, W, B, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv, inv_t,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PREC)
        m, s, q, zy = _online_update(z, y, offs_v, mask_v, m, s, q, zy, WITH_ENT)
    lse = m + tl.log(s)
    tl.store(LOGP + offs_n, zy - lse, mask=mask_n)
    tl.store(LSE + offs_n, lse, mask=mask_n)
    if WITH_ENT:
        tl.store(ENT + offs_n, tl.log(s) - q / s, mask=mask_n)


@triton.jit
def _token_coeffs(Y, LSE, ENT, G, GE, offs_n, mask_n, WITH_ENT: tl.constexpr):
    """Per-token backward inputs: target, lse, dL/dlogp, dL/dentropy and entropy (e, ent = g unused)."""
    y = tl.load(Y + offs_n, mask=mask_n, other=0)
    lse = tl.load(LSE + offs_n, mask=mask_n, other=0.0)
    g = tl.load(G + offs_n, mask=mask_n, other=0.0)
    e = g
    ent = g
    if WITH_ENT:
        e = tl.load(GE + offs_n, mask=mask_n, other=0.0)
        ent = tl.load(ENT + offs_n, mask=mask_n, other=0.0)
    return y, lse, g, e, ent


@triton.jit
def _dz_tile(z, y, offs_v, lse, g, e, ent, inv_t, WITH_ENT: tl.constexpr):
    """dL/d(H W^T + b) for one tile (already divided by T)."""
    logp = z - lse[:, None]
    p = tl.exp(logp)
    dz = tl.where(offs_v[None, :] == y[:, None], g[:, None], 0.0) - g[:, None] * p
    if WITH_ENT:
        dz -= e[:, None] * p * tl.where(p > 0, logp + ent[:, None], 0.0)
    return dz * inv_t


@triton.jit
def _bwd_dh(H, W, B, Y, LSE, ENT, G, GE, DH, N, V, D, stride_hn, stride_wv, stride_dhn, inv_t,
            HAS_BIAS: tl.constexpr, WITH_ENT: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PREC: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    y, lse, g, e, ent = _token_coeffs(Y, LSE, ENT, G, GE, offs_n, mask_n, WITH_ENT)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _logit_tile(H, W, B, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv, inv_t,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PREC)
        dz = _dz_tile(z, y, offs_v, lse, g, e, ent, inv_t, WITH_ENT)
        for d0 in range(0, D, BLOCK_D):  # this program owns rows offs_n of DH: plain read-add-write
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            w = tl.load(W + offs_v[:, None] * stride_wv + offs_d[None, :], mask=mask_v[:, None] & mask_d[None, :],
                        other=0.0)
            ptr = DH + offs_n[:, None] * stride_dhn + offs_d[None, :]
            msk = mask_n[:, None] & mask_d[None, :]
            upd = tl.dot(dz.to(w.dtype), w, input_precision=DOT_PREC)
            tl.store(ptr, tl.load(ptr, mask=msk, other=0.0) + upd, mask=msk)


@triton.jit
def _bwd_dw(H, W, B, Y, LSE, ENT, G, GE, DW, DB, N, V, D, stride_hn, stride_wv, stride_dwv, inv_t,
            HAS_BIAS: tl.constexpr, WITH_ENT: tl.constexpr, NEED_DB: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PREC: tl.constexpr):
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        y, lse, g, e, ent = _token_coeffs(Y, LSE, ENT, G, GE, offs_n, mask_n, WITH_ENT)
        z = _logit_tile(H, W, B, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv, inv_t,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PREC)
        dz = tl.where(mask_n[:, None], _dz_tile(z, y, offs_v, lse, g, e, ent, inv_t, WITH_ENT), 0.0)
        if NEED_DB:
            db += tl.sum(dz, axis=0)
        for d0 in range(0, D, BLOCK_D):  # this program owns rows offs_v of DW
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            h = tl.load(H + offs_n[:, None] * stride_hn + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                        other=0.0)
            ptr = DW + offs_v[:, None] * stride_dwv + offs_d[None, :]
            msk = mask_v[:, None] & mask_d[None, :]
            upd = tl.dot(tl.trans(dz.to(h.dtype)), h, input_precision=DOT_PREC)
            tl.store(ptr, tl.load(ptr, mask=msk, other=0.0) + upd, mask=msk)
    if NEED_DB:
        tl.store(DB + offs_v, db, mask=mask_v)


def _blocks(d: int, dtype: torch.dtype) -> dict:
    """Tile sizes and dot precision. Under the interpreter each tile iteration has a fixed cost, so
    vocab tiles grow. fp32 inputs follow torch's matmul setting: full fp32 ("ieee") unless the user
    allowed TF32 (``torch.backends.cuda.matmul.allow_tf32`` / ``set_float32_matmul_precision``)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    fp32_exact = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" \
        and not torch.backends.cuda.matmul.allow_tf32
    return dict(BLOCK_N=64, BLOCK_V=1024 if interpret else 128,
                BLOCK_D=64 if d >= 64 else max(16, triton.next_power_of_2(d)),
                DOT_PREC="ieee" if fp32_exact else "tf32")


class TritonLinearLogprobs(torch.autograd.Function):
    """Autograd wrapper of the three kernels above."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, return_entropy: bool):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        targets = targets.contiguous().long()
        n, d = hidden.shape
        v = weight.shape[0]
        logp, lse, ent = (torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3))
        bl = _blocks(d, hidden.dtype)
        b_arg = bias if bias is not None else lse
        _fwd[(triton.cdiv(n, bl["BLOCK_N"]),)](
            hidden, weight, b_arg, targets, logp, lse, ent, n, v, d, hidden.stride(0), weight.stride(0),
            1.0 / temperature, HAS_BIAS=bias is not None, WITH_ENT=return_entropy, **bl)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.temperature, ctx.return_entropy = temperature, return_entropy
        ctx.mark_non_differentiable(targets)
        return (logp, ent) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        n, d = hidden.shape
        v = weight.shape[0]
        bl = _blocks(d, hidden.dtype)
        g = (grad_logp if grad_logp is not None else torch.zeros_like(lse)).float().contiguous()
        with_ent = ctx.return_entropy and grad_ent is not None
        ge = grad_ent.float().contiguous() if with_ent else g
        common = dict(HAS_BIAS=bias is not None, WITH_ENT=with_ent, **bl)
        b_arg = bias if bias is not None else lse
        inv_t = 1.0 / ctx.temperature
        dh = dw = db = None
        if ctx.needs_input_grad[0]:
            dh32 = torch.zeros((n, d), dtype=torch.float32, device=hidden.device)
            _bwd_dh[(triton.cdiv(n, bl["BLOCK_N"]),)](
                hidden, weight, b_arg, targets, lse, ent, g, ge, dh32, n, v, d, hidden.stride(0), weight.stride(0),
                dh32.stride(0), inv_t, **common)
            dh = dh32.to(hidden.dtype)
        need_db = bias is not None and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1] or need_db:
            dw32 = torch.zeros((v, d), dtype=torch.float32, device=hidden.device)
            db32 = torch.zeros(v, dtype=torch.float32, device=hidden.device)
            _bwd_dw[(triton.cdiv(v, bl["BLOCK_V"]),)](
                hidden, weight, b_arg, targets, lse, ent, g, ge, dw32, db32, n, v, d, hidden.stride(0),
                weight.stride(0), dw32.stride(0), inv_t, NEED_DB=need_db, **common)
            dw = dw32.to(weight.dtype) if ctx.needs_input_grad[1] else None
            db = db32.to(bias.dtype) if need_db else None
        return dh, dw, db, None, None, None


def linear_logprobs_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                           bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                           return_entropy: bool = False):
    """Fused log-probs (and entropy) of ``targets`` under ``softmax((hidden @ weight.T + bias) / T)``."""
    return TritonLinearLogprobs.apply(hidden, weight, bias, targets, float(temperature), bool(return_entropy))
