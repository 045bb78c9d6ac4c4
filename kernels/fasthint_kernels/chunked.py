"""Bounded-memory pure-torch path: the CPU implementation of fasthint's ops.

Log-probs of a linear head without keeping ``[N, V]`` logits (docs/ALGORITHMS.md §5), with
optional final-logit soft-capping (Gemma-2; ``softcap=c``, the identity for ``None``):

    a = H W^T + b,  t = tanh(a / c),  z = c t / T   (no cap: z = a / T, and the factor 1 - t^2 below is 1)
    lse = logsumexp(z),  logp = z_y - lse,  entropy = -sum_v p_v log p_v
    dL/dz_v = g (1[v=y] - p_v) - e p_v (log p_v + entropy),   g = dL/dlogp, e = dL/dentropy
    dA = dZ (1 - t^2) / T,   dH = dA W,   dW = dA^T H,   db = sum_t dA

Forward and backward walk token chunks of ``chunk_elems / V`` rows; backward recomputes each chunk's
logits from the saved ``lse``. Every chunk reuses ONE ``[rows, V]`` workspace transformed in place
(logits -> exp -> probabilities -> logit gradient; by default max(8M logits, 256 rows): 32 MiB fp32
up to V = 32768, 256 V floats beyond) plus a ``[rows, 8192]``
block for the entropy terms, so the chunks can be large enough for BLAS to run at full speed
(small row counts pay for packing the whole head on every call). With a soft-cap, the backward
(and the loss-fused forward, ``fused_loss.py``) keeps ONE more ``[rows, V]`` buffer holding
``1 - t^2`` of the chunk (the workspace itself becomes the gradient, so t is gone by then); the
log-prob forward needs none. Memory beyond inputs and gradients: those buffers plus O(N), never
``[N, V]``. Accumulation is in fp32 (float64 inputs stay float64).
"""
from __future__ import annotations

from typing import Optional

import torch

from fasthint_kernels.native import usable
from fasthint_kernels.reference import check_softcap

DEFAULT_CHUNK_ELEMS = 1 << 23  # 8M logits (32 MiB fp32) per chunk buffer ...
MIN_CHUNK_ROWS = 256  # ... but at least 256 rows (chunk_elems=None): each chunk streams the whole head
# through three matmuls, so fewer rows per chunk make BLAS memory-bound (measured at D=1024,
# V=152064, N=1024: 55-row chunks 9.7 s, 256-row chunks 6.7 s; workspace 156 MiB there)
VOCAB_BLOCK = 8192  # columns per entropy block: a [rows, 8192] temporary
# On CUDA: 256M logits (1 GiB fp32) per chunk. Each chunk reads and writes the fp32 dW accumulator
# once (8 V D bytes: 4.4 GB for Qwen2.5-7B's head), so small chunks would make the backward
# memory-bound; at 1,765 rows of V = 152,064 that is ~10 passes at N = 16k.
CUDA_CHUNK_ELEMS = 1 << 28
_OUT_DTYPE_MM = True  # CUDA addmm/mm with out_dtype=float32 (bf16/fp16 inputs); off after a failure


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(n: int, v: int, chunk_elems: Optional[int], cuda: bool = False) -> int:
    """Rows per chunk: ``chunk_elems // V``; None: the default policy (CPU: 8M logits, at least 256 rows;
    CUDA: ``CUDA_CHUNK_ELEMS``)."""
    if chunk_elems is None:
        if cuda:
            return max(1, min(n, max(CUDA_CHUNK_ELEMS // max(1, v), MIN_CHUNK_ROWS)))
        return max(1, min(n, max(DEFAULT_CHUNK_ELEMS // max(1, v), MIN_CHUNK_ROWS)))
    return max(1, min(n, chunk_elems // max(1, v)))


def _logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], temperature: float,
            out: torch.Tensor, softcap: Optional[float] = None, dcap: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softcap_c(h W^T + b) / T`` written into the workspace ``out`` (first ``len(h)`` rows; returned).
    With ``softcap`` and ``dcap`` (a second ``[rows, V]`` buffer), ``1 - tanh^2`` goes into ``dcap``'s rows."""
    z = out[:h.shape[0]]
    if h.dtype == z.dtype and w.dtype == z.dtype:
        torch.mm(h, w.t(), out=z)
    elif not _mm_f32(h, w.t(), z, accumulate=False):  # CUDA: tensor cores, fp32 logits, no bf16 temporary
        z.copy_(h @ w.t())  # bf16/fp16 inputs: the product rounds like torch's own matmul, fp32 from here on
    if b is not None:
        z.add_(b.to(z.dtype))
    if softcap is not None:
        z.div_(softcap).tanh_()
        if dcap is not None:
            torch.mul(z, z, out=dcap[:z.shape[0]]).neg_().add_(1.0)
        return z.mul_(softcap / temperature)
    return z.div_(temperature) if temperature != 1.0 else z


def _cap_buffer(buf: torch.Tensor, softcap: Optional[float]) -> Optional[torch.Tensor]:
    """The ``[rows, V]`` buffer for ``1 - t^2`` that a soft-capped gradient needs (None without a cap)."""
    return torch.empty_like(buf) if softcap is not None else None


def _workspace(rows: int, v: int, dtype: torch.dtype, device: torch.device):
    """The one ``[rows, V]`` chunk buffer and the ``[rows, VOCAB_BLOCK]`` entropy block, reused by
    every chunk (fresh buffers per chunk fragment the CPU heap: peak RSS grows by a buffer)."""
    return (torch.empty(rows, v, dtype=dtype, device=device),
            torch.empty(rows, min(v, VOCAB_BLOCK), dtype=dtype, device=device))


def softmax_(z: torch.Tensor) -> torch.Tensor:
    """Turns logits ``z [rows, V]`` into probabilities in place; returns ``lse [rows]``."""
    m = z.amax(-1, keepdim=True)
    s = z.sub_(m).exp_().sum(-1, keepdim=True)
    z.div_(s)
    return (m + s.log()).squeeze(-1)


def neg_plogp(p: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum_v p_v log p_v`` of probability rows ``[rows, V]``, block by block in ``tmp``."""
    ent = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
    for c in range(0, p.shape[1], VOCAB_BLOCK):
        blk = p[:, c:c + VOCAB_BLOCK]
        ent -= torch.special.xlogy(blk, blk, out=tmp[:blk.shape[0], :blk.shape[1]]).sum(-1)  # 0 log 0 = 0
    return ent


def _entropy_dz_(p: torch.Tensor, g: torch.Tensor, e: torch.Tensor, ent: torch.Tensor, tmp: torch.Tensor) -> None:
    """In place: ``p <- -(g + e H) p - e p log p`` (the logit gradient without its ``g 1[v=y]`` term)."""
    c = g + e * ent
    for b0 in range(0, p.shape[1], VOCAB_BLOCK):
        blk = p[:, b0:b0 + VOCAB_BLOCK]
        t = torch.special.xlogy(blk, blk, out=tmp[:blk.shape[0], :blk.shape[1]]).mul_(e)
        blk.mul_(-c).sub_(t)


class ChunkedLinearLogprobs(torch.autograd.Function):
    """logp (and entropy) of targets under softmax(softcap_c(H W^T + b) / T), chunked over tokens."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, return_entropy: bool,
                chunk_elems: Optional[int], native: bool = False, softcap: Optional[float] = None):
        n, v = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden.dtype)
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        ent = torch.empty(n, dtype=acc, device=hidden.device) if return_entropy else None
        rows = _chunk_rows(n, v, chunk_elems, hidden.is_cuda)
        buf, tmp = _workspace(rows, v, acc, hidden.device)
        for s in range(0, n, rows):
            y = targets[s:s + rows].long()
            if native:  # csrc/fused_logprobs.cpp: scale, bias, lse, z_y, entropy in two passes per row
                z = _logits(hidden[s:s + rows], weight, _cap_bias(bias, softcap), 1.0, buf, softcap)
                lse_c, zy, e = torch.ops.fasthint_native.softmax_stats_(
                    z, _native_bias(bias, softcap), 1.0 / temperature, y.contiguous(), ent is not None)
                lse[s:s + rows] = lse_c
                if ent is not None:
                    ent[s:s + rows] = e
            else:
                z = _logits(hidden[s:s + rows], weight, bias, temperature, buf, softcap)
                zy = z.gather(-1, y.unsqueeze(-1)).squeeze(-1)
                lse[s:s + rows] = lse_c = softmax_(z)
                if ent is not None:
                    ent[s:s + rows] = neg_plogp(z, tmp)
            logp[s:s + rows] = zy - lse_c
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.temperature, ctx.return_entropy, ctx.chunk_elems = temperature, return_entropy, chunk_elems
        ctx.native, ctx.softcap = native, softcap
        ctx.mark_non_differentiable(targets)
        return (logp, ent) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        T, cap = ctx.temperature, ctx.softcap
        n, v = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        db = torch.zeros(v, dtype=acc, device=weight.device) if need_b else None
        g_all = grad_logp.to(acc) if grad_logp is not None else torch.zeros(n, dtype=acc, device=hidden.device)
        with_ent = ctx.return_entropy and grad_ent is not None
        rows = _chunk_rows(n, v, ctx.chunk_elems, hidden.is_cuda)
        buf, tmp = _workspace(rows, v, acc, hidden.device)
        dcap = _cap_buffer(buf, cap)
        for s in range(0, n, rows):
            h, y = hidden[s:s + rows], targets[s:s + rows].long().unsqueeze(-1)
            if ctx.native:  # z -> dz in one pass per row (p and log p recomputed from z and lse)
                dz = _logits(h, weight, _cap_bias(bias, cap), 1.0, buf, cap, dcap)
                e = grad_ent[s:s + rows].to(acc).contiguous() if with_ent else None
                torch.ops.fasthint_native.logit_grad_(dz, _native_bias(bias, cap), 1.0 / T, True,
                                                      y.squeeze(-1).contiguous(), lse[s:s + rows],
                                                      g_all[s:s + rows].contiguous(), e,
                                                      ent[s:s + rows] if with_ent else None)
                _accumulate_grads(_uncap_(dz, dcap), h, weight, dh, dw, db, s)
                continue
            p = _logits(h, weight, bias, T, buf, cap, dcap).sub_(lse[s:s + rows].unsqueeze(-1)).exp_()
            g = g_all[s:s + rows].unsqueeze(-1)
            if with_ent:  # dz = g 1[v=y] - (g + e H) p - e p log p
                _entropy_dz_(p, g, grad_ent[s:s + rows].to(acc).unsqueeze(-1), ent[s:s + rows].unsqueeze(-1), tmp)
            else:
                p.mul_(-g)
            dz = p.scatter_add_(-1, y, g)
            if T != 1.0:
                dz.div_(T)
            _accumulate_grads(_uncap_(dz, dcap), h, weight, dh, dw, db, s)
        return (dh, dw.to(weight.dtype) if need_w else None, db.to(bias.dtype) if need_b else None,
                None, None, None, None, None, None)


def _cap_bias(bias: Optional[torch.Tensor], softcap: Optional[float]) -> Optional[torch.Tensor]:
    """The bias torch adds before the native row kernels: all of it under a soft-cap (the cap follows
    the bias, so the kernels cannot add it), none without (the kernels add it)."""
    return bias if softcap is not None else None


def _native_bias(bias: Optional[torch.Tensor], softcap: Optional[float]) -> Optional[torch.Tensor]:
    """The bias handed to the native row kernels (float32): None once torch has added it (soft-cap)."""
    return None if softcap is not None else _f32(bias)


def _uncap_(dz: torch.Tensor, dcap: Optional[torch.Tensor]) -> torch.Tensor:
    """In place: the gradient w.r.t. the capped logits times ``1 - t^2`` (no-op without a cap)."""
    return dz.mul_(dcap[:dz.shape[0]]) if dcap is not None else dz


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> bool:
    """``out (+)= a @ b`` for bf16/fp16 ``a``, ``b`` and an fp32 ``out`` on CUDA: one tensor-core GEMM
    accumulating in fp32 (torch's ``out_dtype``). False (nothing done) where that is unavailable."""
    global _OUT_DTYPE_MM
    if not (_OUT_DTYPE_MM and out.is_cuda and out.dtype == torch.float32 and a.dtype == b.dtype
            and a.dtype in (torch.bfloat16, torch.float16)):
        return False
    try:
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    except (TypeError, NotImplementedError, RuntimeError) as e:
        if not out_dtype_unsupported(e):
            raise  # out of memory, a bad launch: the caller's error, not a reason to drop the fast GEMM
        _OUT_DTYPE_MM = False  # this torch or GPU has no out_dtype GEMM: the fp32 path from now on
        return False
    return True


def out_dtype_unsupported(e: BaseException) -> bool:
    """Whether ``torch.mm(..., out_dtype=)`` failed because it does not exist or is not supported for
    these inputs here (an older torch: TypeError; a backend without it: NotImplementedError or a
    RuntimeError naming out_dtype), rather than for this call (out of memory, an illegal access)."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return False
    return isinstance(e, (TypeError, NotImplementedError)) or "out_dtype" in str(e)


def _accumulate_grads(dz: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, dh: Optional[torch.Tensor],
                      dw: Optional[torch.Tensor], db: Optional[torch.Tensor], start: int) -> None:
    """dH rows ``start:`` = dz W; dW += dz^T h; db += sum dz (dz: the gradient w.r.t. ``H W^T + b``,
    i.e. already divided by T and, with a soft-cap, multiplied by ``1 - t^2``). bf16/fp16 heads: dz
    is rounded to the head's dtype once, as torch's autograd rounds the logits' gradient, and both
    products run in that dtype (on CUDA dW accumulates in fp32 inside the GEMM)."""
    low = dz.to(weight.dtype) if dz.dtype != weight.dtype else dz
    if dh is not None:
        rows = dz.shape[0]
        dh[start:start + rows] = low @ weight if low.dtype == dh.dtype else (low @ weight).to(dh.dtype)
    if dw is not None and not _mm_f32(low.t(), h.to(weight.dtype), dw, accumulate=True):
        dw.addmm_(dz.t(), h.to(dw.dtype))
    if db is not None:
        db += dz.sum(0)


def linear_logprobs_chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                            bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                            return_entropy: bool = False, chunk_elems: Optional[int] = None,
                            native: bool = False, softcap: Optional[float] = None):
    """Bounded-memory log-probs (and entropy) of ``targets`` under a linear head; see module doc.
    ``native``: the per-row work in C++ (``fasthint_kernels.native``; CPU, float32 workspace; the
    torch code where it cannot be used). ``softcap=c``: logits ``c tanh((H W^T + b) / c)`` before ``/ T``."""
    softcap = check_softcap(softcap)
    native = native and _native_usable(hidden, weight)
    return ChunkedLinearLogprobs.apply(hidden, weight, bias, targets, float(temperature), bool(return_entropy),
                                       chunk_elems, bool(native), softcap)


def _native_usable(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    return usable(hidden, weight)


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().float().contiguous()


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
