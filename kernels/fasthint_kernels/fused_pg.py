"""Triton kernels: the hint-masked policy-gradient loss of a linear head, objective in the kernel.

Per trained token t (N of them; hint and prompt tokens never reach the head) with
a = h_t W^T + b, z = a / T (with a soft-cap c: z = c tanh(a / c) / T, whose factor 1 - tanh^2
multiplies the backward's dz), p = softmax(z), logp_t = z_y - lse_t, H_t = -sum_v p_v log p_v:

    r = exp(logp - old)
    clip:    o = min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
    dual:    o = max(o, c A) where A < 0                     (DUAL_CLIP, c > 1)
    shaped:  o = A r / (r + gamma) where gamma > 0           (SHAPED: Guide's hinted tokens)
    loss_t = w_t [ -iw_t o + beta (e^(ref - logp) - (ref - logp) - 1) - coef H_t ]
    L = sum_t loss_t                                     (w_t: aggregation weight, 0 off the mask;
                                                          iw_t: truncated importance weight)

The epilogue of the forward kernel, once a token's vocabulary sweep has given ``logp`` and ``H``,
computes ``loss_t`` and the two coefficients the backward needs (torch's gradient conventions:
min/max split a tie evenly; the clip passes gradient inside its range):

    g_t = dL/dlogp = w [ -iw do/dlogp + beta (1 - e^(ref - logp)) ],   e_t = dL/dH = -w coef
    do/dlogp: r A where the unclipped branch is taken, 0 on a clipped or dual-clipped one,
              A gamma r / (r + gamma)^2 on a shaped token

The objective is a set of per-token tensors and constexpr switches (``PGSpec``), never an
algorithm's name: ``fasthint.loss`` lowers its terms to it.

Backward (one kernel, grid = token tiles x vocab tiles): each program recomputes its logit tile
once (2 BN BV D), forms ``dz = g (1[v=y] - p) - e p (log p + H)`` scaled by the upstream gradient
and 1/T, and adds ``dz W`` into its rows of dH and ``dz^T H`` into its rows of dW with fp32 atomics
(Cut Cross-Entropy's accumulation), so the logits are recomputed once in all:
FLOPs 2NDV forward + 6NDV backward = 8NDV (the current ``logprobs.py`` design: 10NDV, two
recomputing backward kernels and a read-modify-write of a dH block per vocabulary tile). Bytes: the
forward streams W once per token tile (N/BN passes; launch order keeps programs of neighbouring
token tiles on the same W tiles), the backward reads each (token tile, vocab tile) pair's H and W
slices once and issues N D V / BV + V D N / BN fp32 atomic adds. Memory beyond inputs and
gradients: fp32 dH and dW accumulators (N D + V D floats; cast to the input dtype at the end) and
O(N) vectors; never ``[N, V]``. Atomics make the summation order vary: results are deterministic
up to fp32 rounding. Optional gradient filtering (``filter_eps``) skips the dH/dW work of tiles
whose probabilities are all below it (no target inside), with a tested error bound. On CUDA both
kernels are autotuned over tile sizes, warps and stages per (D, V); under ``TRITON_INTERPRET=1``
(CPU tensors; fp32/fp16 there: the interpreter's bf16 ``tl.dot`` is wrong) one fixed configuration.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from fasthint_kernels.logprobs import _dz_tile, _logit_tile, _online_update
from fasthint_kernels.reference import PGSpec, pg_loss_torch


@triton.jit
def _capped_tile(H, W, B, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv, inv_t, cap,
                 HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """(z, 1 - t^2): the tile's logits after the optional soft-cap ``z = cap tanh(a / cap) / T``
    (masked columns -inf) and the cap's derivative factor (1 without a cap)."""
    if SOFTCAP:
        a = _logit_tile(H, W, B, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv, 1.0,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PREC)
        x = tl.where(mask_v[None, :], a / cap, 0.0)
        t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)  # tanh, saturating cleanly at +-1
        return tl.where(mask_v[None, :], cap * t * inv_t, float("-inf")), 1.0 - t * t
    z = _logit_tile(H, W, B, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv, inv_t,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PREC)
    return z, 1.0


@triton.jit
def _objective(lp, ent, old, adv, w, iw, gam, ref, eps_low, eps_high, dual_c, beta, coef,
               DUAL: tl.constexpr, SHAPED: tl.constexpr, KL: tl.constexpr, ENT: tl.constexpr):
    """(loss_t, dL/dlogp, dL/dH) of one block of tokens (the formulas above)."""
    r = tl.exp(lp - old)
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    rc = tl.minimum(tl.maximum(r, lo), hi)
    un = r * adv
    cl = rc * adv
    o = tl.minimum(un, cl)
    inside = (r >= lo) & (r <= hi)
    d_un = r * adv
    d_cl = tl.where(inside, r * adv, 0.0)
    do = tl.where(un < cl, d_un, tl.where(un > cl, d_cl, 0.5 * (d_un + d_cl)))
    if DUAL:
        floor = dual_c * adv
        neg = adv < 0
        do = tl.where(neg & (o < floor), 0.0, tl.where(neg & (o == floor), 0.5 * do, do))
        o = tl.where(neg, tl.maximum(o, floor), o)
    if SHAPED:
        shaped = gam > 0
        gs = tl.where(shaped, gam, 1.0)
        o = tl.where(shaped, adv * r / (r + gs), o)
        do = tl.where(shaped, adv * gs * r / ((r + gs) * (r + gs)), do)
    loss = -iw * o
    g = -iw * do
    if KL:
        d = ref - lp
        ed = tl.exp(d)
        loss += beta * (ed - d - 1.0)
        g += beta * (1.0 - ed)
    e = tl.zeros_like(g)
    if ENT:
        loss -= coef * ent
        e = -coef * w
    on = w != 0
    return tl.where(on, w * loss, 0.0), tl.where(on, w * g, 0.0), e


@triton.jit
def _fwd(H, W, B, Y, OLD, ADV, WT, IW, GAM, REF, LOGP, LSE, ENTR, LOSS, G, GE,
         N, V, D, stride_hn, stride_wv, inv_t, cap, eps_low, eps_high, dual_c, beta, coef,
         HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_IW: tl.constexpr, DUAL: tl.constexpr, SHAPED: tl.constexpr,
         KL: tl.constexpr, ENT: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
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
        z, _ = _capped_tile(H, W, B, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv, inv_t, cap,
                            HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PREC)
        m, s, q, zy = _online_update(z, y, offs_v, mask_v, m, s, q, zy, True)
    lse = m + tl.log(s)
    lp = zy - lse
    ent = tl.log(s) - q / s
    # ---- epilogue: the per-token objective and the backward's coefficients ----
    old = tl.load(OLD + offs_n, mask=mask_n, other=0.0)
    adv = tl.load(ADV + offs_n, mask=mask_n, other=0.0)
    w = tl.load(WT + offs_n, mask=mask_n, other=0.0)
    iw = tl.full((BLOCK_N,), 1.0, tl.float32)
    if HAS_IW:
        iw = tl.load(IW + offs_n, mask=mask_n, other=1.0)
    gam = w
    if SHAPED:
        gam = tl.load(GAM + offs_n, mask=mask_n, other=0.0)
    ref = w
    if KL:
        ref = tl.load(REF + offs_n, mask=mask_n, other=0.0)
    loss, g, e = _objective(lp, ent, old, adv, w, iw, gam, ref, eps_low, eps_high, dual_c, beta, coef,
                            DUAL, SHAPED, KL, ENT)
    tl.store(LOGP + offs_n, lp, mask=mask_n)
    tl.store(LSE + offs_n, lse, mask=mask_n)
    tl.store(ENTR + offs_n, ent, mask=mask_n)
    tl.store(LOSS + offs_n, loss, mask=mask_n)
    tl.store(G + offs_n, g, mask=mask_n)
    tl.store(GE + offs_n, e, mask=mask_n)


@triton.jit
def _accumulate(H, W, DH, DW, DB, dz, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv,
                NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """dH[rows] += dz W[cols], dW[cols] += dz^T H[rows], db[cols] += sum dz (fp32 atomics)."""
    if NEED_DB:
        tl.atomic_add(DB + offs_v, tl.sum(dz, axis=0), mask=mask_v)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        if NEED_DH:
            w = tl.load(W + offs_v[:, None] * stride_wv + offs_d[None, :], mask=mask_v[:, None] & mask_d[None, :],
                        other=0.0)
            tl.atomic_add(DH + offs_n[:, None] * D + offs_d[None, :],
                          tl.dot(dz.to(w.dtype), w, input_precision=DOT_PREC), mask=mask_n[:, None] & mask_d[None, :])
        if NEED_DW:
            h = tl.load(H + offs_n[:, None] * stride_hn + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                        other=0.0)
            tl.atomic_add(DW + offs_v[:, None] * D + offs_d[None, :],
                          tl.dot(tl.trans(dz.to(h.dtype)), h, input_precision=DOT_PREC),
                          mask=mask_v[:, None] & mask_d[None, :])


@triton.jit
def _bwd(H, W, B, Y, LSE, ENTR, G, GE, DH, DW, DB, N, V, D, stride_hn, stride_wv, inv_t, cap, scale, filter_eps,
         HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ENT: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
         NEED_DB: tl.constexpr, FILTER: tl.constexpr, GROUP_N: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    # grouped launch order: GROUP_N consecutive token tiles walk the vocabulary tiles together, so the
    # W tiles they share stay in L2
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    v_tiles = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * v_tiles
    first = (pid // per_group) * GROUP_N
    size = tl.minimum(n_tiles - first, GROUP_N)
    pid_n = first + (pid % per_group) % size
    pid_v = (pid % per_group) // size
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    y = tl.load(Y + offs_n, mask=mask_n, other=0)
    lse = tl.load(LSE + offs_n, mask=mask_n, other=0.0)
    g = tl.load(G + offs_n, mask=mask_n, other=0.0) * scale
    e = g
    ent = g
    if ENT:
        e = tl.load(GE + offs_n, mask=mask_n, other=0.0) * scale
        ent = tl.load(ENTR + offs_n, mask=mask_n, other=0.0)
    z, dcap = _capped_tile(H, W, B, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv, inv_t, cap,
                           HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PREC)
    dz = _dz_tile(z, y, offs_v, lse, g, e, ent, inv_t, ENT) * dcap
    valid = mask_n[:, None] & mask_v[None, :]
    dz = tl.where(valid, dz, 0.0)
    if FILTER:  # Cut Cross-Entropy's gradient filtering: a tile whose every p is below filter_eps and
        #        that holds no target adds less than its bound (tests/test_fused_pg.py): skip its 4 BN BV D
        p_max = tl.max(tl.max(tl.where(valid, tl.exp(z - lse[:, None]), 0.0), axis=1), axis=0)
        hits = tl.sum(tl.sum(tl.where(valid & (offs_v[None, :] == y[:, None]), 1, 0), axis=1), axis=0)
        if (p_max >= filter_eps) | (hits > 0):
            _accumulate(H, W, DH, DW, DB, dz, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv,
                        NEED_DH, NEED_DW, NEED_DB, BLOCK_D, DOT_PREC)
    else:
        _accumulate(H, W, DH, DW, DB, dz, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv,
                    NEED_DH, NEED_DW, NEED_DB, BLOCK_D, DOT_PREC)


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _tile_configs(shapes: list[tuple[int, int, int, int, int]]) -> list:
    return [triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_D": d}, num_warps=w, num_stages=s)
            for n, v, d, w, s in shapes]


# Autotuned on CUDA per (D, V) (N changes every micro-batch; the best tile hardly does): tile sizes,
# warps and pipeline stages that fit Hopper's and Ampere's shared memory in bf16 and fp32. The
# backward's accumulators are zeroed between trial runs (its atomics add).
_fwd_tuned = triton.autotune(
    configs=_tile_configs([(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 256, 32, 8, 3),
                           (64, 128, 32, 4, 4), (128, 64, 64, 4, 3)]),
    key=["D", "V"])(_fwd)
_bwd_tuned = triton.autotune(
    configs=_tile_configs([(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3), (128, 64, 64, 4, 3),
                           (64, 128, 32, 4, 4), (128, 128, 32, 8, 4)]),
    key=["D", "V"], reset_to_zero=["DH", "DW", "DB"])(_bwd)


def _dot_prec(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 setting: full fp32 dots unless the user allowed TF32."""
    exact = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" \
        and not torch.backends.cuda.matmul.allow_tf32
    return "ieee" if exact else "tf32"


def _fixed(d: int) -> dict:
    """The one tile configuration under the interpreter, where every tile iteration costs the same
    (so vocabulary tiles are large)."""
    return dict(BLOCK_N=64, BLOCK_V=1024, BLOCK_D=64 if d >= 64 else max(16, triton.next_power_of_2(d)))


def _vec(x: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return like if x is None else x.detach().float().contiguous()


class TritonFusedPGLoss(torch.autograd.Function):
    """The summed loss (0-dim), with per-token log-probs and entropies (no gradient) beside it."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, spec: PGSpec, temperature: float, filter_eps: Optional[float],
                softcap: Optional[float]):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        targets = targets.contiguous().long()
        n, d = hidden.shape
        v = weight.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        logp, lse, ent, loss, g, ge = (torch.empty(n, **f32) for _ in range(6))
        old = _vec(spec.old_logp, lse)
        flags = dict(HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, HAS_IW=spec.is_weights is not None,
                     DUAL=spec.dual_clip is not None, SHAPED=spec.gamma is not None,
                     KL=spec.ref_logp is not None and spec.beta > 0, ENT=spec.entropy_coef > 0)
        fixed = _fixed(d) if INTERPRET else {}
        kernel = _fwd if INTERPRET else _fwd_tuned
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
            hidden, weight, bias if bias is not None else lse, targets, old, _vec(spec.advantages, lse),
            _vec(spec.weights, lse), _vec(spec.is_weights, lse), _vec(spec.gamma, lse), _vec(spec.ref_logp, lse),
            logp, lse, ent, loss, g, ge, n, v, d, hidden.stride(0), weight.stride(0), 1.0 / temperature,
            float(softcap or 1.0), float(spec.eps_low), float(spec.eps_high), float(spec.dual_clip or 0.0),
            float(spec.beta), float(spec.entropy_coef), **flags, DOT_PREC=_dot_prec(hidden.dtype), **fixed)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent, g, ge)
        ctx.temperature, ctx.ent, ctx.filter_eps, ctx.softcap = temperature, flags["ENT"], filter_eps, softcap
        ctx.mark_non_differentiable(logp, ent)
        return loss.sum(), logp, ent

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp=None, _grad_ent=None):
        hidden, weight, bias, targets, lse, ent, g, ge = ctx.saved_tensors
        n, d = hidden.shape
        v = weight.shape[0]
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        # unused outputs get their own dummies: the autotuner zeroes DH, DW and DB between trials
        dh = torch.zeros((n, d), **f32) if need_dh else torch.zeros(1, **f32)
        dw = torch.zeros((v, d), **f32) if need_dw else torch.zeros(1, **f32)
        db = torch.zeros(v, **f32) if need_db else torch.zeros(1, **f32)
        fixed = _fixed(d) if INTERPRET else {}
        kernel = _bwd if INTERPRET else _bwd_tuned
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"]),)](
                   hidden, weight, bias if bias is not None else lse, targets, lse, ent, g, ge, dh, dw, db,
                   n, v, d, hidden.stride(0), weight.stride(0), 1.0 / ctx.temperature, float(ctx.softcap or 1.0),
                   float(grad_loss), float(ctx.filter_eps or 0.0), HAS_BIAS=bias is not None,
                   SOFTCAP=ctx.softcap is not None, ENT=ctx.ent, NEED_DH=need_dh,
                   NEED_DW=need_dw, NEED_DB=need_db, FILTER=ctx.filter_eps is not None, GROUP_N=8,
                   DOT_PREC=_dot_prec(hidden.dtype), **fixed)
        return (dh.to(hidden.dtype) if need_dh else None, dw.to(weight.dtype) if need_dw else None,
                db.to(bias.dtype) if need_db else None, None, None, None, None, None)


def fused_pg_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, spec: PGSpec, *,
                  bias: Optional[torch.Tensor] = None, temperature: float = 1.0, impl: str = "auto",
                  filter_eps: Optional[float] = None, softcap: Optional[float] = None):
    """``(loss, logp, entropy)``: the summed per-token objective of ``spec`` over ``[N, D]`` hidden
    states of trained tokens, with per-token log-probs and entropies (no gradient). ``impl``:
    ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``torch`` (materialised logits:
    ``fasthint_kernels.reference.pg_loss_torch``) or ``auto`` (triton on CUDA, else torch).
    ``filter_eps`` (Triton; e.g. ``2**-12``, below bf16's resolution): the backward skips the dH/dW
    work of a (token tile, vocabulary tile) whose every probability is below it and which holds no
    target; a skipped (token, column) pair leaves out ``|dz| <= (|g| + |e| |log p + H|) p / T`` (tested)."""
    if impl == "auto":
        impl = "triton" if hidden.is_cuda else "torch"
    if impl == "triton":
        return TritonFusedPGLoss.apply(hidden, weight, bias, targets, spec, float(temperature), filter_eps, softcap)
    if impl == "torch":
        return pg_loss_torch(hidden, weight, targets, spec, bias=bias, temperature=temperature, softcap=softcap)
    raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
