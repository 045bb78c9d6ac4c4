"""Triton kernels: log-probs (and entropy) of a linear head without materialising the logits, and the
head's one backward kernel (shared with ``fasthint_kernels.fused_pg``).

Math (docs/ALGORITHMS.md §5), per token t with a = h_t W^T + b and z = a / T (with Gemma-2's
soft-cap c: z = c tanh(a / c) / T, whose factor 1 - tanh^2 multiplies the backward's dz):

    forward:  online over vocab tiles, fp32, identity m = -inf:
              m' = max(m, max_v z_v);  s' = s e^(m-m') + sum_v e^(z_v-m')
              q' = e^(m-m') (q + s (m-m')) + sum_v e^(z_v-m') (z_v-m')      [q = sum e^(z-m)(z-m)]
              lse = m + log s,  logp = z_y - lse,  entropy = log s - q / s
    backward: g = dL/dlogp, e = dL/dentropy per token, log p_v = z_v - lse recomputed tile by tile:
              dz_v = g (1[v=y] - p_v) - e p_v (log p_v + entropy)
              dH = dz W / T,  dW = dz^T H / T,  db = sum_t dz / T

Kernels: ``_fwd`` (grid: token tiles; each program sweeps the vocabulary once) and ``_bwd`` (grid:
token tiles x vocabulary tiles, in grouped order: GROUP_N neighbouring token tiles walk the vocabulary
together so the W tiles they share stay in L2). Each backward program recomputes its logit tile once
and adds ``dz W`` into its rows of dH and ``dz^T H`` into its rows of dW with fp32 atomics.

Cost (N tokens, D hidden, V vocabulary; BN x BV tiles):
- FLOPs: forward 2NDV, backward 2NDV (recompute) + 2NDV (dH) + 2NDV (dW) = 8NDV in all, against the
  floor of any head loss, 6NDV (logits, dH, dW: three bare GEMMs): 4/3 of it.
- Bytes: the forward reads W once per token tile (N/BN passes, shared in L2 by neighbouring tiles);
  the backward reads each (token tile, vocab tile) pair's H and W slices twice (recompute, then the
  products) and issues N D V (1/BV + 1/BN) fp32 atomic adds (L2-resident reductions): 1.4e11 at
  Qwen2.5-7B's head (N = 16k, D = 3,584, V = 152,064, 128 x 128 tiles), as many bytes of L2 traffic as
  the GEMMs' operand reads many times over; this is the design's risk. Cut Cross-Entropy, whose
  accumulation it is, relies on gradient filtering to skip most tiles of a trained head's peaked
  softmax; ``bench/logprobs.py`` times the kernel with (``triton_filter``) and without it.
- Memory beyond inputs and gradients: fp32 dH and dW accumulators (N D + V D floats, cast to the input
  dtype at the end) and O(N) vectors; never ``[N, V]``.

Why this backward (Cut Cross-Entropy's) and not Liger's. Liger forms the gradient while the logits of
a token chunk are materialised (6NDV on cuBLAS, no recompute), which needs each token's loss
coefficient before its backward: possible for a loss known in the forward (``fused_pg``'s epilogue,
the chunked torch path ``fused_loss.py`` does exactly this), impossible for log-probs with an
arbitrary upstream gradient. It holds a ``[chunk, V]`` fp32 buffer (1,024 tokens x 152k = 0.6 GB)
beside the same fp32 dW accumulator, and streams every chunk's logits through HBM several times
(softmax, entropy, dz: ~20 bytes per logit, 50 GB at N = 16k, V = 152k, ~12 ms on an H200 against
~70 ms of GEMMs). This design keeps every logit in registers, holds no chunk buffer (the 2.5 GB budget
of the 7B head at N = 16k: 2.4 GB of fp32 accumulators) and serves both ops with one kernel; it pays
2NDV of recompute and its atomics. Which is faster on a given GPU is a measurement:
``bench/logprobs.py`` times both (providers ``triton`` and ``chunked``), and ``impl="auto"`` measures
the two once per head shape (``fasthint.autoselect``). Atomics make the summation order vary between
runs (results agree to fp32 rounding); the chunked torch path is bitwise deterministic.

On CUDA both kernels are autotuned over tile sizes, warps and stages per (D, V); under
``TRITON_INTERPRET=1`` (CPU tensors; tests use fp32/fp16 there: the interpreter's bf16 ``tl.dot`` is
wrong) one fixed configuration with wide vocabulary tiles. Optional gradient filtering
(``filter_eps``, Cut Cross-Entropy's) skips the dH/dW work of tiles whose probabilities are all below
it and which hold no target, with a tested error bound (tests/test_fused_pg.py).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


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
def _tanh(x):
    """tanh in fp32 to a few ulp: (1 - e^-2|x|) / (1 + e^-2|x|) saturates cleanly at +-1 but cancels
    near 0, where its Taylor series to x^9 is used instead (|x| < 1/4: truncation below 1e-8 relative)."""
    ax = tl.abs(x)
    em = tl.exp(-2.0 * ax)
    x2 = x * x
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(ax < 0.25, small, (1.0 - em) / (1.0 + em))
    return tl.where(x < 0, -t, t)


@triton.jit
def _capped_tile(H, W, B, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv, inv_t, cap,
                 HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """(z, 1 - t^2): the tile's logits after the optional soft-cap ``z = cap tanh(a / cap) / T``
    (masked columns -inf) and the cap's derivative factor (1 without a cap)."""
    if SOFTCAP:
        a = _logit_tile(H, W, B, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv, 1.0,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PREC)
        t = _tanh(tl.where(mask_v[None, :], a / cap, 0.0))
        return tl.where(mask_v[None, :], cap * t * inv_t, float("-inf")), 1.0 - t * t
    z = _logit_tile(H, W, B, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv, inv_t,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PREC)
    return z, 1.0


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
def _fwd(H, W, B, Y, LOGP, LSE, ENT, N, V, D, stride_hn, stride_wv, inv_t, cap,
         HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENT: tl.constexpr,
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
        m, s, q, zy = _online_update(z, y, offs_v, mask_v, m, s, q, zy, WITH_ENT)
    lse = m + tl.log(s)
    tl.store(LOGP + offs_n, zy - lse, mask=mask_n)
    tl.store(LSE + offs_n, lse, mask=mask_n)
    if WITH_ENT:
        tl.store(ENT + offs_n, tl.log(s) - q / s, mask=mask_n)


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
def _bwd(H, W, B, Y, LSE, ENTR, G, GE, DH, DW, DB, SCALE, N, V, D, stride_hn, stride_wv, inv_t, cap, filter_eps,
         HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ENT: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
         NEED_DB: tl.constexpr, FILTER: tl.constexpr, GROUP_N: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)  # grouped launch order (module doc)
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
    scale = tl.load(SCALE)  # the upstream gradient of a summed loss, read on the device (no host sync)
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
    if FILTER:  # a tile whose every p is below filter_eps and that holds no target: skip its 4 BN BV D
        p_max = tl.max(tl.max(tl.where(valid, tl.exp(z - lse[:, None]), 0.0), axis=1), axis=0)
        hits = tl.sum(tl.sum(tl.where(valid & (offs_v[None, :] == y[:, None]), 1, 0), axis=1), axis=0)
        if (p_max >= filter_eps) | (hits > 0):
            _accumulate(H, W, DH, DW, DB, dz, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv,
                        NEED_DH, NEED_DW, NEED_DB, BLOCK_D, DOT_PREC)
    else:
        _accumulate(H, W, DH, DW, DB, dz, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv,
                    NEED_DH, NEED_DW, NEED_DB, BLOCK_D, DOT_PREC)


def tile_configs(shapes: list[tuple[int, int, int, int, int]]) -> list:
    """Autotuner configurations from (BLOCK_N, BLOCK_V, BLOCK_D, warps, stages) tuples."""
    return [triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_D": d}, num_warps=w, num_stages=s)
            for n, v, d, w, s in shapes]


# Autotuned on CUDA per (D, V) (N changes every micro-batch; the best tile hardly does): tile sizes,
# warps and pipeline stages that fit Hopper's and Ampere's shared memory in bf16 and fp32. The
# backward's accumulators are zeroed between trial runs (its atomics add).
FWD_CONFIGS = tile_configs([(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 256, 32, 8, 3),
                            (64, 128, 32, 4, 4), (128, 64, 64, 4, 3)])
_fwd_tuned = triton.autotune(configs=FWD_CONFIGS, key=["D", "V"])(_fwd)
_bwd_tuned = triton.autotune(
    configs=tile_configs([(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3), (128, 64, 64, 4, 3),
                          (64, 128, 32, 4, 4), (128, 128, 32, 8, 4)]),
    key=["D", "V"], reset_to_zero=["DH", "DW", "DB"])(_bwd)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 setting: full fp32 dots unless the user allowed TF32."""
    exact = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" \
        and not torch.backends.cuda.matmul.allow_tf32
    return "ieee" if exact else "tf32"


def fixed_tiles(d: int) -> dict:
    """The one tile configuration under the interpreter, where every tile iteration costs the same
    (so vocabulary tiles are large); empty on CUDA, where the autotuner picks."""
    if not INTERPRET:
        return {}
    return dict(BLOCK_N=64, BLOCK_V=1024, BLOCK_D=64 if d >= 64 else max(16, triton.next_power_of_2(d)))


def head_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                  lse: torch.Tensor, ent: torch.Tensor, g: torch.Tensor, ge: Optional[torch.Tensor], *,
                  temperature: float, softcap: Optional[float], scale: Optional[torch.Tensor],
                  filter_eps: Optional[float],
                  needs: tuple[bool, bool, bool]):
    """(dH, dW, db) of ``sum_t g_t logp_t + ge_t H_t`` (times the one-element ``scale``, None: 1), each
    None where ``needs`` says so; ``ge`` None: no entropy term. One launch of ``_bwd`` (module doc)."""
    n, d = hidden.shape
    v = weight.shape[0]
    need_dh, need_dw, need_db = needs
    need_db = need_db and bias is not None
    f32 = dict(dtype=torch.float32, device=hidden.device)
    # unneeded outputs get their own dummies: the autotuner zeroes DH, DW and DB between trials
    dh = torch.zeros((n, d), **f32) if need_dh else torch.zeros(1, **f32)
    dw = torch.zeros((v, d), **f32) if need_dw else torch.zeros(1, **f32)
    db = torch.zeros(v, **f32) if need_db else torch.zeros(1, **f32)
    scale = torch.ones(1, **f32) if scale is None else scale.detach().float().reshape(1)
    kernel = _bwd if INTERPRET else _bwd_tuned
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"]),)](
        hidden, weight, bias if bias is not None else lse, targets, lse, ent, g, ge if ge is not None else g,
        dh, dw, db, scale, n, v, d, hidden.stride(0), weight.stride(0), 1.0 / temperature, float(softcap or 1.0),
        float(filter_eps or 0.0), HAS_BIAS=bias is not None, SOFTCAP=softcap is not None,
        ENT=ge is not None, NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db, FILTER=filter_eps is not None,
        GROUP_N=8, DOT_PREC=dot_precision(hidden.dtype), **fixed_tiles(d))
    return (dh.to(hidden.dtype) if need_dh else None, dw.to(weight.dtype) if need_dw else None,
            db.to(bias.dtype) if need_db else None)


class TritonLinearLogprobs(torch.autograd.Function):
    """Autograd wrapper of ``_fwd`` and ``head_backward``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, return_entropy: bool,
                softcap: Optional[float]):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        targets = targets.contiguous().long()
        n, d = hidden.shape
        v = weight.shape[0]
        logp, lse, ent = (torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3))
        kernel = _fwd if INTERPRET else _fwd_tuned
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
            hidden, weight, bias if bias is not None else lse, targets, logp, lse, ent, n, v, d, hidden.stride(0),
            weight.stride(0), 1.0 / temperature, float(softcap or 1.0), HAS_BIAS=bias is not None,
            SOFTCAP=softcap is not None, WITH_ENT=return_entropy, DOT_PREC=dot_precision(hidden.dtype),
            **fixed_tiles(d))
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.temperature, ctx.return_entropy, ctx.softcap = temperature, return_entropy, softcap
        ctx.mark_non_differentiable(targets)
        return (logp, ent) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        g = (grad_logp if grad_logp is not None else torch.zeros_like(lse)).float().contiguous()
        ge = grad_ent.float().contiguous() if ctx.return_entropy and grad_ent is not None else None
        dh, dw, db = head_backward(hidden, weight, bias, targets, lse, ent, g, ge, temperature=ctx.temperature,
                                   softcap=ctx.softcap, scale=None, filter_eps=None,
                                   needs=tuple(ctx.needs_input_grad[:3]))
        return dh, dw, db, None, None, None, None


def linear_logprobs_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                           bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                           return_entropy: bool = False, softcap: Optional[float] = None):
    """Fused log-probs (and entropy) of ``targets`` under ``softmax(softcap_c(hidden @ weight.T + bias) / T)``
    (``softcap_c(a) = c tanh(a / c)``; None: no cap)."""
    return TritonLinearLogprobs.apply(hidden, weight, bias, targets, float(temperature), bool(return_entropy),
                                      softcap)
