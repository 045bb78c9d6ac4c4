"""Triton kernels: the hint-masked policy-gradient loss of a linear head, objective in the kernel.

Per trained token t (N of them; hint and prompt tokens never reach the head) with
a = h_t W^T + b, z = a / T (with a soft-cap c: z = c tanh(a / c) / T, whose factor 1 - tanh^2
multiplies the backward's dz), p = softmax(z), logp_t = z_y - lse_t, H_t = -sum_v p_v log p_v:

    r = exp(logp - old)
    clip:    o = min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
    dual:    o = max(o, c A) where A < 0                     (DUAL_CLIP, c > 1)
    shaped:  o = A r / (r + gamma) where gamma > 0           (SHAPED_RATIO)
    loss_t = w_t [ -iw_t o + beta (e^(ref - logp) - (ref - logp) - 1) - coef H_t ]
                                                          (PG_WEIGHT, K3_PENALTY, ENTROPY_BONUS)
    L = sum_t loss_t                                     (w_t: aggregation weight, 0 off the mask;
                                                          iw_t: truncated importance weight)

The forward is the vocabulary sweep of ``logprobs.py`` (``forward_sweep``) and one epilogue kernel
that merges its partials into ``logp`` and ``H`` and computes ``loss_t`` and the two coefficients the
backward needs (torch's gradient conventions: min/max split a tie evenly; the clip passes gradient
inside its range):

    g_t = dL/dlogp = w [ -iw do/dlogp + beta (1 - e^(ref - logp)) ],   e_t = dL/dH = -w coef
    do/dlogp: r A where the unclipped branch is taken, 0 on a clipped or dual-clipped one,
              A gamma r / (r + gamma)^2 on a shaped token

The objective is a set of per-token tensors and constexpr switches (``spec.PGSpec``), each named for
an operation, never for an algorithm: ``fasthint.loss`` lowers its terms to it.

Backward: the head's backward (``fasthint_kernels.head_backward``), handed g_t and e_t:
each logit tile is recomputed once and ``dz = g (1[v=y] - p) - e p (log p + H)``, scaled by the
upstream gradient and 1/T, goes into dH and dW, either through an ``[N, chunk]`` dz buffer and cuBLAS
(``split``, the default) or with fp32 atomics (``atomic``). FLOPs 2NDV forward + 6NDV backward =
8NDV; bytes, memory (split: 0.75 GB extra for Qwen2.5-7B's head at N = 16k; atomic: 2.4 GB; never
``[N, V]``), the autotuning and the choice against Liger's design are argued in ``logprobs.py``.
Optional gradient filtering (``filter_eps``, atomic backward) skips the dH/dW work of tiles whose
probabilities are all below it (no target inside), with a tested error bound.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fasthint_kernels.head_backward import head_backward
from fasthint_kernels.logprobs import _combine, _splits, forward_sweep
from fasthint_kernels.reference import pg_loss_torch
from fasthint_kernels.spec import PGSpec


@triton.jit
def _objective(lp, ent, old, adv, w, iw, gam, ref, eps_low, eps_high, dual_c, beta, coef,
               DUAL_CLIP: tl.constexpr, SHAPED_RATIO: tl.constexpr, K3_PENALTY: tl.constexpr,
               ENTROPY_BONUS: tl.constexpr):
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
    if DUAL_CLIP:
        floor = dual_c * adv
        neg = adv < 0
        do = tl.where(neg & (o < floor), 0.0, tl.where(neg & (o == floor), 0.5 * do, do))
        o = tl.where(neg, tl.maximum(o, floor), o)
    if SHAPED_RATIO:
        shaped = gam > 0
        gs = tl.where(shaped, gam, 1.0)
        o = tl.where(shaped, adv * r / (r + gs), o)
        do = tl.where(shaped, adv * gs * r / ((r + gs) * (r + gs)), do)
    loss = -iw * o
    g = -iw * do
    if K3_PENALTY:
        d = ref - lp
        ed = tl.exp(d)
        loss += beta * (ed - d - 1.0)
        g += beta * (1.0 - ed)
    e = tl.zeros_like(g)
    if ENTROPY_BONUS:
        loss -= coef * ent
        e = -coef * w
    on = w != 0
    return tl.where(on, w * loss, 0.0), tl.where(on, w * g, 0.0), e


@triton.jit
def _epilogue(PART, OLD, ADV, WT, IW, GAM, REF, LOGP, LSE, ENTR, LOSS, G, GE, N, SPLITS,
              eps_low, eps_high, dual_c, beta, coef, PG_WEIGHT: tl.constexpr, DUAL_CLIP: tl.constexpr,
              SHAPED_RATIO: tl.constexpr, K3_PENALTY: tl.constexpr, ENTROPY_BONUS: tl.constexpr,
              BLOCK: tl.constexpr):
    """The forward's epilogue, once the vocabulary sweep (``logprobs.forward_sweep``) has left its
    partials: each token's log-prob, log-sum-exp and entropy, then the objective and the backward's
    coefficients."""
    offs_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask_n = offs_n < N
    lse, lp, ent = _combine(PART, offs_n, mask_n, N, SPLITS)
    old = tl.load(OLD + offs_n, mask=mask_n, other=0.0)
    adv = tl.load(ADV + offs_n, mask=mask_n, other=0.0)
    w = tl.load(WT + offs_n, mask=mask_n, other=0.0)
    iw = tl.full((BLOCK,), 1.0, tl.float32)
    if PG_WEIGHT:
        iw = tl.load(IW + offs_n, mask=mask_n, other=1.0)
    gam = w
    if SHAPED_RATIO:
        gam = tl.load(GAM + offs_n, mask=mask_n, other=0.0)
    ref = w
    if K3_PENALTY:
        ref = tl.load(REF + offs_n, mask=mask_n, other=0.0)
    loss, g, e = _objective(lp, ent, old, adv, w, iw, gam, ref, eps_low, eps_high, dual_c, beta, coef,
                            DUAL_CLIP, SHAPED_RATIO, K3_PENALTY, ENTROPY_BONUS)
    tl.store(LOGP + offs_n, lp, mask=mask_n)
    tl.store(LSE + offs_n, lse, mask=mask_n)
    tl.store(ENTR + offs_n, ent, mask=mask_n)
    tl.store(LOSS + offs_n, loss, mask=mask_n)
    tl.store(G + offs_n, g, mask=mask_n)
    tl.store(GE + offs_n, e, mask=mask_n)


def _vec(x: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return like if x is None else x.detach().float().contiguous()


@torch.library.custom_op("fasthint::pg_forward", mutates_args=())
def _pg_forward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                   old_logp: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
                   is_weights: Optional[torch.Tensor], gamma: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor],
                   eps_low: float, eps_high: float, dual_clip: Optional[float], beta: float, entropy_coef: float,
                   temperature: float, softcap: Optional[float]) -> list[torch.Tensor]:
    """[loss_t, logp, lse, entropy, g, e, partials]: the vocabulary sweep and ``_epilogue``; the sweep's
    ``[4, splits, N]`` partials are returned (a workspace) so that a fake run counts them."""
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logp, lse, ent, loss, g, ge = (torch.empty(n, **f32) for _ in range(6))
    if n == 0:  # an empty micro-batch: no launch (a zero grid)
        return [loss, logp, lse, ent, g, ge, lse.new_empty((4, _splits(hidden, weight), 0))]
    flags = dict(PG_WEIGHT=is_weights is not None, DUAL_CLIP=dual_clip is not None, SHAPED_RATIO=gamma is not None,
                 K3_PENALTY=ref_logp is not None and beta > 0, ENTROPY_BONUS=entropy_coef > 0)
    part, splits = forward_sweep(hidden, weight, bias, targets, temperature, softcap, True)
    _epilogue[(triton.cdiv(n, 128),)](
        part, _vec(old_logp, lse), _vec(advantages, lse), _vec(weights, lse), _vec(is_weights, lse),
        _vec(gamma, lse), _vec(ref_logp, lse), logp, lse, ent, loss, g, ge, n, splits,
        float(eps_low), float(eps_high), float(dual_clip or 0.0), float(beta), float(entropy_coef), **flags, BLOCK=128)
    return [loss, logp, lse, ent, g, ge, part]


@_pg_forward_op.register_fake
def _pg_forward_fake(hidden, weight, bias, targets, old_logp, advantages, weights, is_weights, gamma, ref_logp,
                     eps_low, eps_high, dual_clip, beta, entropy_coef, temperature, softcap):
    n = hidden.shape[0]
    vecs = [hidden.new_empty(n, dtype=torch.float32) for _ in range(6)]
    return vecs + [hidden.new_empty((4, _splits(hidden, weight), n), dtype=torch.float32)]


class TritonFusedPGLoss(torch.autograd.Function):
    """The summed loss (0-dim), with per-token log-probs and entropies (no gradient) beside it; the
    forward is the custom op ``fasthint::pg_forward``, the backward ``fasthint::head_backward``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, spec: PGSpec, temperature: float, filter_eps: Optional[float],
                softcap: Optional[float], backward: Optional[str]):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        targets = targets.contiguous().long()
        loss, logp, lse, ent, g, ge, _ = torch.ops.fasthint.pg_forward(
            hidden, weight, bias, targets, spec.old_logp, spec.advantages, spec.weights, spec.is_weights, spec.gamma,
            spec.ref_logp, float(spec.eps_low), float(spec.eps_high), None if spec.dual_clip is None else
            float(spec.dual_clip), float(spec.beta), float(spec.entropy_coef), float(temperature), softcap)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent, g, ge)
        ctx.temperature, ctx.ent, ctx.filter_eps, ctx.softcap = temperature, spec.entropy_coef > 0, filter_eps, softcap
        ctx.backward = backward
        ctx.mark_non_differentiable(logp, ent)
        return loss.sum(), logp, ent

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp=None, _grad_ent=None):
        hidden, weight, bias, targets, lse, ent, g, ge = ctx.saved_tensors
        grads = head_backward(hidden, weight, bias, targets, lse, ent, g, ge if ctx.ent else None,
                              temperature=ctx.temperature, softcap=ctx.softcap, scale=grad_loss,
                              filter_eps=ctx.filter_eps, needs=tuple(ctx.needs_input_grad[:3]),
                              backward=ctx.backward)
        return (*grads, None, None, None, None, None, None)


def fused_pg_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, spec: PGSpec, *,
                  bias: Optional[torch.Tensor] = None, temperature: float = 1.0, impl: str = "auto",
                  filter_eps: Optional[float] = None, softcap: Optional[float] = None,
                  backward: Optional[str] = None):
    """``(loss, logp, entropy)``: the summed per-token objective of ``spec`` over ``[N, D]`` hidden
    states of trained tokens, with per-token log-probs and entropies (no gradient). ``impl``:
    ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``torch`` (materialised logits:
    ``fasthint_kernels.reference.pg_loss_torch``) or ``auto`` (triton on CUDA, else torch).
    ``filter_eps`` (Triton; e.g. ``2**-12``, below bf16's resolution): the backward skips the dH/dW
    work of a (token tile, vocabulary tile) whose every probability is below it and which holds no
    target; a skipped (token, column) pair leaves out ``|dz| <= (|g| + |e| |log p + H|) p / T`` (tested;
    it runs the atomic backward). ``backward``: ``"split"`` or ``"atomic"`` (``logprobs.py``; None: the
    default there)."""
    if impl == "auto":
        impl = "triton" if hidden.is_cuda else "torch"
    if impl == "triton":
        return TritonFusedPGLoss.apply(hidden, weight, bias, targets, spec, float(temperature), filter_eps, softcap,
                                       backward)
    if impl == "torch":
        return pg_loss_torch(hidden, weight, targets, spec, bias=bias, temperature=temperature, softcap=softcap)
    raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
