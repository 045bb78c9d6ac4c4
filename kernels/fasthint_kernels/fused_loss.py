"""Loss-fused chunked head: a per-token loss of a linear head's log-probs in one pass over the logits.

The kernel knows no algorithm. It is handed ``token_loss``, a function of each token's own
log-prob (the caller folds in advantages, clipping, KL, weights and the normaliser; in fasthint
that is ``fasthint.loss``, docs/ALGORITHMS.md):

    L = sum_t l_t(logp_t [, H_t]),    logp_t = log softmax(z_t)[y_t],   H_t = -sum_v p_v log p_v

(the entropy only when ``uses_entropy``, e.g. an entropy bonus), so g_t = dL/dlogp_t and
e_t = dL/dH_t are known as soon as a chunk's ``logp`` is, and the chunk's logit gradient follows at
once (a = H W^T + b; with a soft-cap ``c``: t = tanh(a / c), z = c t / T, without one z = a / T and
1 - t^2 := 1; p = softmax z):

    dz_v = g (1[v=y] - p_v) - e p_v (log p_v + H),   dA = dz (1 - t^2) / T,
    dH = dA W,   dW = dA^T H,   db = sum_t dA

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
from torch._subclasses.fake_tensor import is_fake

from fasthint_kernels.chunked import (
    _acc_dtype,
    _accumulate_grads,
    _cap_bias,
    _cap_buffer,
    _chunk_rows,
    _entropy_dz_,
    _logits,
    _native_bias,
    _native_usable,
    _uncap_,
    _workspace,
    neg_plogp,
    softmax_,
)
from fasthint_kernels.reference import check_softcap

TokenLoss = Callable[[torch.Tensor, int, int], torch.Tensor]


def _token_loss_grads(token_loss: Callable, lp: torch.Tensor, ent: Optional[torch.Tensor], s: int, e: int,
                      need_grad: bool):
    """The chunk's summed loss (detached) and its gradients ``dL/dlogp`` and, when the loss reads the
    entropy (``ent`` given), ``dL/dH`` (None when it does not depend on it), by autograd on ``[rows]``."""
    with torch.enable_grad():
        lp_leaf = lp.detach().requires_grad_(need_grad)
        if ent is None:
            total = token_loss(lp_leaf, s, e).sum()
            g = torch.autograd.grad(total, lp_leaf)[0] if need_grad else None
            return g, None, total.detach()
        ent_leaf = ent.detach().requires_grad_(need_grad)
        total = token_loss(lp_leaf, s, e, ent_leaf).sum()
        if not need_grad:
            return None, None, total.detach()
        g, ge = torch.autograd.grad(total, (lp_leaf, ent_leaf), allow_unused=True)
        return (g if g is not None else torch.zeros_like(lp_leaf)), ge, total.detach()


class ChunkedFusedLinearLoss(torch.autograd.Function):
    """Scalar loss ``sum_t w_t l_t(logp_t)`` of a linear head (logits ``softcap_c(H W^T + b) / T``);
    gradients formed in the forward pass.

    ``token_loss(logp_chunk, start, stop)`` returns the chunk's per-token ``w_t l_t`` (already masked);
    outputs are ``(loss, logp, entropy)`` with ``logp``/``entropy`` detached.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, return_entropy: bool,
                token_loss: Callable, need_grad: bool, chunk_elems: Optional[int], native: bool = False,
                softcap: Optional[float] = None, uses_entropy: bool = False):
        n, v = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden.dtype)
        dev = hidden.device
        logp = torch.empty(n, dtype=acc, device=dev)
        ent = torch.empty(n, dtype=acc, device=dev) if return_entropy or uses_entropy else None
        loss = torch.zeros((), dtype=acc, device=dev)
        need_h = need_grad and hidden.requires_grad
        need_w = need_grad and weight.requires_grad
        need_b = need_grad and bias is not None and bias.requires_grad
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=dev) if need_w else None
        db = torch.zeros(v, dtype=acc, device=dev) if need_b else None
        rows = _chunk_rows(n, v, chunk_elems, hidden.is_cuda)
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
            g, ge, total = _token_loss_grads(token_loss, lp, ent[s:e] if uses_entropy else None, s, e, need_grad)
            loss += total.to(acc)
            if g is None:
                continue
            if native:  # z -> g (1[v=y] - p) - ge p (log p + H), over T, in one pass per row
                torch.ops.fasthint_native.logit_grad_(p, None, 1.0 / temperature, False, y.squeeze(-1).contiguous(),
                                                      lse, g.to(acc).contiguous(),
                                                      ge.to(acc).contiguous() if ge is not None else None,
                                                      ent[s:e] if ge is not None else None)
                _accumulate_grads(_uncap_(p, dcap), h, weight, dh, dw, db, s)
                continue
            g = g.to(acc).unsqueeze(-1)
            if ge is not None:  # dz = g 1[v=y] - (g + ge H) p - ge p log p
                _entropy_dz_(p, g, ge.to(acc).unsqueeze(-1), ent[s:e].unsqueeze(-1), tmp)
                dz = p.scatter_add_(-1, y, g)
            else:
                dz = p.mul_(-g).scatter_add_(-1, y, g)  # g (1[v=y] - p), in place
            if temperature != 1.0:
                dz.div_(temperature)
            _accumulate_grads(_uncap_(dz, dcap), h, weight, dh, dw, db, s)
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ent = ent if return_entropy else None
        ctx.mark_non_differentiable(logp, *([ent] if ent is not None else []))
        return loss, logp, ent

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp=None, _grad_ent=None):
        dh, dw, db = ctx.saved_tensors
        # loss.backward(): hand over the stored gradients, no copy; a fake gradient (fasthint.rehearse)
        # has no value, so the copy is counted
        unit = not is_fake(grad_loss) and bool(grad_loss == 1)

        def scaled(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
            if t is None:
                return None
            return (t if unit else t * grad_loss.to(t.dtype)).to(dtype)

        return (scaled(dh, dh.dtype if dh is not None else None), scaled(dw, ctx.dtypes[0]),
                scaled(db, ctx.dtypes[1]), None, None, None, None, None, None, None, None, None)


def fused_linear_loss_chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              token_loss: TokenLoss, *, bias: Optional[torch.Tensor] = None,
                              temperature: float = 1.0, return_entropy: bool = False,
                              chunk_elems: Optional[int] = None, native: bool = False,
                              softcap: Optional[float] = None, uses_entropy: bool = False):
    """``sum_t token_loss(logp)_t`` of a linear head in one chunked pass (see module doc).

    ``token_loss(logp_chunk, start, stop)`` returns the per-token losses of rows ``start:stop``,
    already weighted and masked (a function of each token's own log-prob only; it is differentiated
    by autograd on the chunk's ``[rows]`` log-probs, never on logits). Returns ``(loss, logp, entropy)``
    (``entropy`` None unless ``return_entropy``; both detached). ``native``: the per-row work in C++
    (``fasthint_kernels.native``; CPU, float32 workspace). ``softcap=c``: logits ``c tanh((H W^T + b) / c)``
    before ``/ T`` (None: no cap). ``uses_entropy``: the loss also reads each token's entropy ``H_t``;
    ``token_loss`` is then called as ``token_loss(logp, start, stop, entropy)`` and ``dL/dH_t`` joins the
    logit gradient (``dz_v += -(dL/dH_t) p_v (log p_v + H_t)``).
    """
    softcap = check_softcap(softcap)
    native = native and _native_usable(hidden, weight)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    return ChunkedFusedLinearLoss.apply(hidden, weight, bias, targets, float(temperature), bool(return_entropy),
                                        token_loss, need_grad, chunk_elems, bool(native), softcap, bool(uses_entropy))
