"""Loss-fused chunked policy loss: the clipped GRPO loss of a linear head in one pass over the logits.

The loss is a sum of per-token terms, each a function of that token's log-prob only (the
normaliser comes from the mask, never from the log-probs):

    L = sum_t w_t * mask_t * l_t(logp_t),    l_t = -min(r A, clip(r) A) [dual clip] + beta * k3,
    r = exp(logp_t - old_t),  w_t = seq_weight_t / normaliser_t    (ALGORITHMS.md sections 1.4-1.5)

so dL/dlogp_t = g_t is known as soon as a chunk's ``logp`` is, and the chunk's logit gradient
follows at once (a = H W^T + b; with a soft-cap ``c``: t = tanh(a / c), z = c t / T, without one
z = a / T and 1 - t^2 := 1; p = softmax z):

    dz_v = g (1[v=y] - p_v),   dA = dz (1 - t^2) / T,   dH = dA W,   dW = dA^T H,   db = sum_t dA

The forward therefore forms dH, dW and db while the chunk's logits are still in cache: 6NDV FLOPs
in all (logits, dH, dW), the same as materialised eager autograd, against 8NDV for log-probs with
an arbitrary upstream gradient (whose backward must recompute the logits). Backward only scales the
stored gradients by the upstream scalar. Memory beyond inputs and gradients: one ``[chunk, V]``
workspace transformed in place (max(8M logits, 256 rows) fp32 by default), a ``[chunk, 8192]``
entropy block and O(N) vectors; with a soft-cap and a gradient to form, ONE more ``[chunk, V]``
buffer for ``1 - t^2``; never ``[N, V]``. When no input needs a gradient
(evaluation, ``torch.no_grad``) the gradient work is skipped.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from fasthint_kernels.chunked import (_acc_dtype, _accumulate_grads, _cap_bias, _cap_buffer, _chunk_rows,
                                      _logits, _native_bias, _native_usable, _uncap_, _workspace, neg_plogp,
                                      softmax_)
from fasthint_kernels.reference import LOSS_AGGS, check_softcap, policy_loss_ref


def token_weights(mask: torch.Tensor, loss_agg: str, *, num_tokens: Optional[float] = None,
                  seq_ids: Optional[torch.Tensor] = None, num_seqs: Optional[float] = None,
                  seq_weights: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-token factor ``w_t`` with ``loss = sum_t w_t l_t`` (0 off the mask); matches ``policy_loss_ref``."""
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    m = mask.to(dtype)
    if loss_agg == "seq-mean-token-mean":
        if seq_ids is None:
            raise ValueError("loss_agg='seq-mean-token-mean' needs seq_ids (the sequence index of each token)")
        n_seq = int(seq_ids.max().item()) + 1 if seq_ids.numel() else 0
        cnt = torch.zeros(n_seq, dtype=dtype, device=m.device).index_add_(0, seq_ids, m)
        denom = float(num_seqs) if num_seqs is not None else float((cnt > 0).sum().item())
        w = m / (cnt.clamp_min(1)[seq_ids] * max(denom, 1.0))
    else:
        denom = float(num_tokens) if num_tokens is not None else float(m.sum().item())
        w = m / max(denom, 1.0)
    if seq_weights is not None:
        w = w * seq_weights.to(dtype)
    return w


def clipped_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *,
                       ref_logp: Optional[torch.Tensor] = None, beta: float = 0.0, eps_low: float = 0.2,
                       eps_high: float = 0.28, dual_clip: Optional[float] = None,
                       shaped_gamma: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token ``l_t``: negative clipped (dual-clipped) surrogate plus ``beta`` * k3 KL; tokens with
    ``shaped_gamma > 0`` use Guide's unclipped ``A r / (r + gamma)`` instead of the clipped surrogate."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype)
    obj = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    if dual_clip is not None:
        obj = torch.where(adv < 0, torch.maximum(obj, dual_clip * adv), obj)
    if shaped_gamma is not None:
        shaped = shaped_gamma > 0
        obj = torch.where(shaped, adv * ratio / (ratio + torch.where(shaped, shaped_gamma, 1.0)), obj)
    tok = -obj
    if ref_logp is not None and beta > 0:
        d = ref_logp.to(logp.dtype) - logp
        tok = tok + beta * (torch.exp(d) - d - 1)
    return tok


class ChunkedFusedPolicyLoss(torch.autograd.Function):
    """Scalar loss ``sum_t w_t l_t(logp_t)`` of a linear head (logits ``softcap_c(H W^T + b) / T``);
    gradients formed in the forward pass.

    ``token_loss(logp_chunk, start, stop)`` returns the chunk's per-token ``w_t l_t`` (already masked);
    outputs are ``(loss, logp, entropy)`` with ``logp``/``entropy`` detached.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, return_entropy: bool,
                token_loss: Callable, need_grad: bool, chunk_elems: Optional[int], native: bool = False,
                softcap: Optional[float] = None):
        n, v = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden.dtype)
        dev = hidden.device
        logp = torch.empty(n, dtype=acc, device=dev)
        ent = torch.empty(n, dtype=acc, device=dev) if return_entropy else None
        loss = torch.zeros((), dtype=acc, device=dev)
        need_h = need_grad and hidden.requires_grad
        need_w = need_grad and weight.requires_grad
        need_b = need_grad and bias is not None and bias.requires_grad
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=dev) if need_w else None
        db = torch.zeros(v, dtype=acc, device=dev) if need_b else None
        rows = _chunk_rows(n, v, chunk_elems)
        buf, tmp = _workspace(rows, v, acc, dev)
        dcap = _cap_buffer(buf, softcap) if need_grad else None
        for s in range(0, n, rows):
            e = min(n, s + rows)
            h, y = hidden[s:e], targets[s:e].long().unsqueeze(-1)
            if native:  # csrc/fused_logprobs.cpp: the workspace keeps the scaled logits
                p = _logits(h, weight, _cap_bias(bias, softcap), 1.0, buf, softcap, dcap)
                lse, zy, en = torch.ops.fasthint_native.softmax_stats_(p, _native_bias(bias, softcap),
                                                                       1.0 / temperature, y.squeeze(-1).contiguous(),
                                                                       ent is not None)
                lp = zy - lse
                if ent is not None:
                    ent[s:e] = en
            else:
                p = _logits(h, weight, bias, temperature, buf, softcap, dcap)  # the workspace, transformed in place
                zy = p.gather(-1, y).squeeze(-1)
                lp = zy - softmax_(p)
                if ent is not None:
                    ent[s:e] = neg_plogp(p, tmp)
            logp[s:e] = lp
            with torch.enable_grad():
                lp_leaf = lp.detach().requires_grad_(need_grad)
                total = token_loss(lp_leaf, s, e).sum()
                g = torch.autograd.grad(total, lp_leaf)[0] if need_grad else None
            loss += total.detach().to(acc)
            if g is None:
                continue
            if native:  # z -> g (1[v=y] - p) / T in one pass per row
                torch.ops.fasthint_native.logit_grad_(p, None, 1.0 / temperature, False, y.squeeze(-1).contiguous(),
                                                      lse, g.to(acc).contiguous(), None, None)
                _accumulate_grads(_uncap_(p, dcap), h, weight, dh, dw, db, s)
                continue
            g = g.to(acc).unsqueeze(-1)
            dz = p.mul_(-g).scatter_add_(-1, y, g)  # g (1[v=y] - p), in place
            if temperature != 1.0:
                dz.div_(temperature)
            _accumulate_grads(_uncap_(dz, dcap), h, weight, dh, dw, db, s)
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(logp, *([ent] if ent is not None else []))
        return loss, logp, ent

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp=None, _grad_ent=None):
        dh, dw, db = ctx.saved_tensors
        unit = bool(grad_loss == 1)  # loss.backward(): hand over the stored gradients, no copy

        def scaled(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
            if t is None:
                return None
            return (t if unit else t * grad_loss.to(t.dtype)).to(dtype)

        return (scaled(dh, dh.dtype if dh is not None else None), scaled(dw, ctx.dtypes[0]),
                scaled(db, ctx.dtypes[1]), None, None, None, None, None, None, None, None)


def fused_policy_loss_chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor, *,
                              bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                              return_entropy: bool = False, ref_logp: Optional[torch.Tensor] = None,
                              beta: float = 0.0, eps_low: float = 0.2, eps_high: float = 0.28,
                              dual_clip: Optional[float] = None, loss_agg: str = "token-mean",
                              num_tokens: Optional[float] = None, seq_ids: Optional[torch.Tensor] = None,
                              num_seqs: Optional[float] = None, seq_weights: Optional[torch.Tensor] = None,
                              shaped_gamma: Optional[torch.Tensor] = None, chunk_elems: Optional[int] = None,
                              native: bool = False, softcap: Optional[float] = None):
    """``policy_loss`` of ``linear_logprobs`` in one chunked pass (see module doc); ``(loss, stats)``.

    ``old_logp``, ``advantages``, ``ref_logp`` and the weights are constants (no gradient).
    ``native``: the per-row work in C++ (``fasthint_kernels.native``; CPU, float32 workspace).
    ``softcap=c``: logits ``c tanh((H W^T + b) / c)`` before ``/ T`` (None: no cap).
    """
    softcap = check_softcap(softcap)
    acc = _acc_dtype(hidden.dtype)
    native = native and _native_usable(hidden, weight)
    w = token_weights(mask, loss_agg, num_tokens=num_tokens, seq_ids=seq_ids, num_seqs=num_seqs,
                      seq_weights=seq_weights, dtype=acc)
    on = mask.bool()

    def const(x: torch.Tensor) -> torch.Tensor:  # zero off the mask: NaN there must not reach a gradient
        x = x.detach().to(acc)
        return torch.where(on, x, torch.zeros_like(x))

    old, adv = const(old_logp), const(advantages)
    ref = const(ref_logp) if ref_logp is not None else None
    gam = const(shaped_gamma) if shaped_gamma is not None else None

    def token_loss(lp: torch.Tensor, s: int, e: int) -> torch.Tensor:
        tok = clipped_token_loss(lp, old[s:e], adv[s:e], ref_logp=ref[s:e] if ref is not None else None,
                                 beta=beta, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                                 shaped_gamma=gam[s:e] if gam is not None else None)
        return torch.where(on[s:e], tok * w[s:e], torch.zeros_like(tok))  # NaN/inf off the mask stay out

    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, logp, ent = ChunkedFusedPolicyLoss.apply(hidden, weight, bias, targets, float(temperature),
                                                   bool(return_entropy), token_loss, need_grad, chunk_elems,
                                                   bool(native), softcap)
    _, stats = policy_loss_ref(logp, old, adv, mask, ref_logp=ref, beta=beta, eps_low=eps_low, eps_high=eps_high,
                               dual_clip=dual_clip, loss_agg=loss_agg, num_tokens=num_tokens, seq_ids=seq_ids,
                               num_seqs=num_seqs, seq_weights=seq_weights, shaped_gamma=gam)
    stats["logp"] = logp
    if ent is not None:
        stats["entropy"] = ent
    return loss, stats
