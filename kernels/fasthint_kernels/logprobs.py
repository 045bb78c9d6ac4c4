"""Triton kernels: log-probs (and entropy) of a linear head without materialising the logits, and the
head's backward (shared with ``fasthint_kernels.fused_pg``).

Math (docs/ALGORITHMS.md §5), per token t with a = h_t W^T + b and z = a / T (with Gemma-2's
soft-cap c: z = c tanh(a / c) / T, whose factor 1 - tanh^2 multiplies the backward's dz):

    forward:  online over vocab tiles, fp32, identity m = -inf:
              m' = max(m, max_v z_v);  s' = s e^(m-m') + sum_v e^(z_v-m')
              q' = e^(m-m') (q + s (m-m')) + sum_v e^(z_v-m') (z_v-m')      [q = sum e^(z-m)(z-m)]
              lse = m + log s,  logp = z_y - lse,  entropy = log s - q / s
    backward: g = dL/dlogp, e = dL/dentropy per token, log p_v = z_v - lse recomputed tile by tile:
              dz_v = g (1[v=y] - p_v) - e p_v (log p_v + entropy)
              dH = dz W / T,  dW = dz^T H / T,  db = sum_t dz / T

Kernels: ``_fwd`` (grid: token tiles x vocabulary splits, autotuned per (D, V); each program sweeps its
split once and leaves partial (m, s, q, z_y), which ``_combine`` merges per token in a small second
kernel: ``_finish`` here, the objective's epilogue in ``fused_pg``). On a GPU the splits keep the SMs
busy when N is small (``forward_splits``: at N = 4k, 64 token tiles of 64 would fill half an H100);
the forward reads W once per token tile (N / BN passes, shared in L2 by the tiles that run together).
Then two backwards, both recomputing each logit tile exactly once (``head_backward``):

- ``split`` (default): per vocabulary chunk of C columns (C N <= 2^28), ``_dz_chunk`` writes dz of
  every token into an ``[N, C]`` buffer in the inputs' dtype (rounded once, as torch's autograd rounds
  a bf16 matmul's output gradient), then two cuBLAS GEMMs: dW[chunk] = dz^T H (each row of dW written
  once, fp32 accumulation inside the GEMM, no fp32 dW accumulator) and dH += dz W[chunk] into an fp32
  ``[N, D]`` accumulator (``out_dtype`` tensor-core GEMM on CUDA). No atomics: deterministic.
- ``atomic`` (Cut Cross-Entropy's accumulation): one kernel over token tiles x vocab tiles, in grouped
  order (GROUP_N neighbouring token tiles walk the vocabulary together so shared W tiles stay in L2);
  each program adds ``dz W`` into its rows of dH and ``dz^T H`` into its rows of dW with fp32 atomics.
  Gradient filtering (``filter_eps``) runs here: a tile whose every p is below it and that holds no
  target skips its products, with a tested error bound (tests/test_fused_pg.py).

Cost (N tokens, D hidden, V vocabulary; BN x BV tiles). FLOPs: forward 2NDV, backward 2NDV (recompute)
+ 2NDV (dH) + 2NDV (dW) = 8NDV in both, against the floor of any head loss, 6NDV (logits, dH, dW:
three bare GEMMs), i.e. 4/3 of it. At Qwen2.5-7B's head (N = 16k, D = 3,584, V = 152,064, bf16):
- split: 4NDV of the 8 on cuBLAS; HBM traffic beside the GEMMs' operands: dz written once and read
  twice (6 N V bytes = 15 GB, ~3.5 ms at 4.3 TB/s) and the fp32 dH accumulator read and written once
  per chunk (~10 chunks x 8 N D bytes = 4.7 GB); extra memory: the dz buffer (0.5 GB) and fp32 dH
  (0.24 GB).
- atomic: the backward issues N D V (1/BV + 1/BN) fp32
  atomic adds: 1.4e11 with 128 x 128 tiles, the design's risk (L2 reductions on that scale can cost
  more than the GEMMs) unless gradient filtering skips most tiles, as Cut Cross-Entropy relies on for a
  trained head's peaked softmax; extra memory: fp32 dH and dW accumulators (0.24 + 2.2 GB).
Neither holds ``[N, V]``. ``bench/logprobs.py`` times both (providers ``triton``, ``triton_atomic``,
``triton_filter``); ``FASTHINT_HEAD_BACKWARD=atomic`` makes the atomic one the default.

Why not Liger's design (the gradient formed while a token chunk's logits are materialised: 6NDV on
cuBLAS, no recompute): it needs each token's loss coefficient before the backward, which log-probs
under an arbitrary upstream gradient do not have; for the policy loss, whose coefficients the forward
knows, it is the chunked torch path (``fused_loss.py``), which ``impl="auto"`` measures against these
kernels once per head shape (``fasthint.autoselect``). It holds a ``[chunk, V]`` fp32 buffer beside an
fp32 dW accumulator and streams each logit through HBM several times (~20 bytes per logit).

Under ``TRITON_INTERPRET=1`` (CPU tensors; tests use fp32/fp16 there: the interpreter's bf16
``tl.dot`` is wrong) the kernels run one fixed configuration with wide vocabulary tiles.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from fasthint_kernels.chunked import _mm_f32

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
def _fwd(H, W, B, Y, PART, N, V, D, stride_hn, stride_wv, inv_t, cap,
         HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENT: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """The sweep of token tile program_id(0) over vocabulary split program_id(1) of num_programs(1):
    its partial (m, s, q, zy) go to ``PART [4, splits, N]``; ``_combine`` merges the splits."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    per = tl.cdiv(tl.cdiv(V, splits), BLOCK_V) * BLOCK_V
    v_lo = split * per
    v_hi = tl.minimum(V, v_lo + per)
    y = tl.load(Y + offs_n, mask=mask_n, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    q = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_hi
        z, _ = _capped_tile(H, W, B, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv, inv_t, cap,
                            HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PREC)
        m, s, q, zy = _online_update(z, y, offs_v, mask_v, m, s, q, zy, WITH_ENT)
    row = split * N + offs_n
    tl.store(PART + row, m, mask=mask_n)
    tl.store(PART + splits * N + row, s, mask=mask_n)
    tl.store(PART + 2 * splits * N + row, q, mask=mask_n)
    tl.store(PART + 3 * splits * N + row, zy, mask=mask_n)


@triton.jit
def _combine(PART, offs_n, mask_n, N, SPLITS):
    """(lse, logp, entropy) of a block of tokens from the splits' partial sweeps: with m = max m_i,
    s = sum s_i e^(m_i - m), q = sum e^(m_i - m) (q_i + s_i (m_i - m)), z_y = sum z_y,i (an empty
    split has s_i = 0 and adds nothing)."""
    m = tl.full(offs_n.shape, float("-inf"), tl.float32)
    for i in range(0, SPLITS):
        m = tl.maximum(m, tl.load(PART + i * N + offs_n, mask=mask_n, other=0.0))
    s = tl.zeros(offs_n.shape, tl.float32)
    q = tl.zeros(offs_n.shape, tl.float32)
    zy = tl.zeros(offs_n.shape, tl.float32)
    for i in range(0, SPLITS):
        row = i * N + offs_n
        si = tl.load(PART + SPLITS * N + row, mask=mask_n, other=0.0)
        d = tl.where(si > 0, tl.load(PART + row, mask=mask_n, other=0.0) - m, 0.0)
        a = tl.where(si > 0, tl.exp(d), 0.0)
        s += si * a
        q += a * (tl.load(PART + 2 * SPLITS * N + row, mask=mask_n, other=0.0) + si * d)
        zy += tl.load(PART + 3 * SPLITS * N + row, mask=mask_n, other=0.0)
    s = tl.where(mask_n, s, 1.0)
    lse = m + tl.log(s)
    return lse, zy - lse, tl.log(s) - q / s


@triton.jit
def _finish(PART, LOGP, LSE, ENT, N, SPLITS, WITH_ENT: tl.constexpr, BLOCK: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask_n = offs_n < N
    lse, lp, ent = _combine(PART, offs_n, mask_n, N, SPLITS)
    tl.store(LOGP + offs_n, lp, mask=mask_n)
    tl.store(LSE + offs_n, lse, mask=mask_n)
    if WITH_ENT:
        tl.store(ENT + offs_n, ent, mask=mask_n)


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
def _tile_grad(H, W, B, Y, LSE, ENTR, G, GE, SCALE, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv, inv_t,
               cap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ENT: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """(dz, z, lse, y, valid) of one (token tile, vocab tile): the logits recomputed once and the
    gradient w.r.t. ``H W^T + b`` (0 outside the valid rows and columns)."""
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
    return tl.where(valid, dz, 0.0), z, lse, y, valid


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
    dz, z, lse, y, valid = _tile_grad(H, W, B, Y, LSE, ENTR, G, GE, SCALE, offs_n, offs_v, mask_n, mask_v, D,
                                      stride_hn, stride_wv, inv_t, cap, HAS_BIAS, SOFTCAP, ENT, BLOCK_N, BLOCK_V,
                                      BLOCK_D, DOT_PREC)
    if FILTER:  # a tile whose every p is below filter_eps and that holds no target: skip its 4 BN BV D
        p_max = tl.max(tl.max(tl.where(valid, tl.exp(z - lse[:, None]), 0.0), axis=1), axis=0)
        hits = tl.sum(tl.sum(tl.where(valid & (offs_v[None, :] == y[:, None]), 1, 0), axis=1), axis=0)
        if (p_max >= filter_eps) | (hits > 0):
            _accumulate(H, W, DH, DW, DB, dz, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv,
                        NEED_DH, NEED_DW, NEED_DB, BLOCK_D, DOT_PREC)
    else:
        _accumulate(H, W, DH, DW, DB, dz, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv,
                    NEED_DH, NEED_DW, NEED_DB, BLOCK_D, DOT_PREC)


@triton.jit
def _dz_chunk(H, W, B, Y, LSE, ENTR, G, GE, DZ, SCALE, N, V, D, v_start, VC, stride_hn, stride_wv, stride_dz,
              inv_t, cap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ENT: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """The split backward's first half: dz of vocabulary columns [v_start, v_start + VC) for all
    tokens, written in the inputs' dtype to ``DZ [N, VC]`` (the GEMMs with W and H follow in torch)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_v = v_start + offs_c
    mask_n = offs_n < N
    mask_v = (offs_c < VC) & (offs_v < V)
    dz, _, _, _, valid = _tile_grad(H, W, B, Y, LSE, ENTR, G, GE, SCALE, offs_n, offs_v, mask_n, mask_v, D,
                                    stride_hn, stride_wv, inv_t, cap, HAS_BIAS, SOFTCAP, ENT, BLOCK_N, BLOCK_V,
                                    BLOCK_D, DOT_PREC)
    tl.store(DZ + offs_n[:, None] * stride_dz + offs_c[None, :], dz.to(DZ.dtype.element_ty), mask=valid)


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
_dz_chunk_tuned = triton.autotune(configs=FWD_CONFIGS, key=["D", "VC"])(_dz_chunk)
SPLIT_ELEMS = 1 << 28  # the split backward's dz buffer: at most this many elements (512 MiB in bf16)
# which backward runs by default ("split" or "atomic"; the module doc argues the default, a GPU
# measurement settles it: bench/logprobs.py's triton and triton_atomic providers)
DEFAULT_BACKWARD = os.environ.get("FASTHINT_HEAD_BACKWARD", "split")


FWD_SPLITS: Optional[int] = None  # tests: a fixed number of vocabulary splits in the forward


def forward_splits(n: int, v: int, device: torch.device) -> int:
    """Vocabulary splits of the forward sweep: enough (token tile, split) programs for two per SM when
    N is small (N = 4k gives 64 token tiles of 64 on an H100's 132 SMs), 1 on CPU, at most 16."""
    if FWD_SPLITS:
        return FWD_SPLITS
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(16, triton.cdiv(2 * sms, triton.cdiv(n, 64)), triton.cdiv(v, 1024)))


def forward_sweep(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                  temperature: float, softcap: Optional[float], with_ent: bool) -> tuple[torch.Tensor, int]:
    """``_fwd`` over every (token tile, vocabulary split): the ``[4, splits, N]`` partials and splits."""
    n, d = hidden.shape
    v = weight.shape[0]
    splits = forward_splits(n, v, hidden.device)
    part = torch.empty((4, splits, n), dtype=torch.float32, device=hidden.device)
    kernel = _fwd if INTERPRET else _fwd_tuned
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)](
        hidden, weight, bias if bias is not None else part, targets, part, n, v, d, hidden.stride(0),
        weight.stride(0), 1.0 / temperature, float(softcap or 1.0), HAS_BIAS=bias is not None,
        SOFTCAP=softcap is not None, WITH_ENT=with_ent, DOT_PREC=dot_precision(hidden.dtype), **fixed_tiles(d))
    return part, splits


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
                  filter_eps: Optional[float], needs: tuple[bool, bool, bool], backward: Optional[str] = None):
    """(dH, dW, db) of ``sum_t g_t logp_t + ge_t H_t`` (times the one-element ``scale``, None: 1), each
    None where ``needs`` says so; ``ge`` None: no entropy term. ``backward``: ``"split"`` or
    ``"atomic"`` (module doc; None: ``DEFAULT_BACKWARD``); gradient filtering (``filter_eps``) runs on
    the atomic one."""
    backward = backward or DEFAULT_BACKWARD
    if backward not in ("split", "atomic"):
        raise ValueError(f"backward must be 'split' or 'atomic', got {backward!r}")
    need_dh, need_dw, need_db = needs
    f32 = dict(dtype=torch.float32, device=hidden.device)
    scale = torch.ones(1, **f32) if scale is None else scale.detach().float().reshape(1)
    args = (hidden, weight, bias if bias is not None else lse, targets, lse, ent, g, ge if ge is not None else g)
    flags = dict(HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, ENT=ge is not None,
                 DOT_PREC=dot_precision(hidden.dtype), **fixed_tiles(hidden.shape[1]))
    consts = (1.0 / temperature, float(softcap or 1.0))
    need_db = need_db and bias is not None
    if backward == "split" and filter_eps is None:
        return _backward_split(args, scale, bias, consts, flags, need_dh, need_dw, need_db)
    n, d = hidden.shape
    v = weight.shape[0]
    # unneeded outputs get their own dummies: the autotuner zeroes DH, DW and DB between trials
    dh = torch.zeros((n, d), **f32) if need_dh else torch.zeros(1, **f32)
    dw = torch.zeros((v, d), **f32) if need_dw else torch.zeros(1, **f32)
    db = torch.zeros(v, **f32) if need_db else torch.zeros(1, **f32)
    kernel = _bwd if INTERPRET else _bwd_tuned
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"]),)](
        *args, dh, dw, db, scale, n, v, d, hidden.stride(0), weight.stride(0), *consts, float(filter_eps or 0.0),
        NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db, FILTER=filter_eps is not None, GROUP_N=8, **flags)
    return (dh.to(hidden.dtype) if need_dh else None, dw.to(weight.dtype) if need_dw else None,
            db.to(bias.dtype) if need_db else None)


def _backward_split(args: tuple, scale: torch.Tensor, bias: Optional[torch.Tensor], consts: tuple, flags: dict,
                    need_dh: bool, need_dw: bool, need_db: bool):
    """Vocabulary chunk by chunk: ``_dz_chunk`` writes dz of all tokens (inputs' dtype), then
    dW[chunk] = dz^T H (each row written once, fp32 accumulation inside the GEMM) and dH += dz W[chunk]
    (into an fp32 accumulator; tensor cores with ``out_dtype`` on CUDA)."""
    hidden, weight = args[:2]
    n, d = hidden.shape
    v = weight.shape[0]
    cols = max(256, min(v, SPLIT_ELEMS // max(n, 1)) // 256 * 256)
    dz = torch.empty((n, min(cols, v)), dtype=hidden.dtype, device=hidden.device)
    dh = torch.zeros((n, d), dtype=torch.float32, device=hidden.device) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty(v, dtype=torch.float32, device=hidden.device) if need_db else None
    kernel = _dz_chunk if INTERPRET else _dz_chunk_tuned
    for v0 in range(0, v, cols):
        c = min(cols, v - v0)
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(c, meta["BLOCK_V"]))](
            *args, dz, scale, n, v, d, v0, c, hidden.stride(0), weight.stride(0), dz.stride(0), *consts, **flags)
        z = dz[:, :c]
        if need_dw:
            torch.mm(z.t(), hidden, out=dw[v0:v0 + c])
        if need_dh and not _mm_f32(z, weight[v0:v0 + c], dh, accumulate=True):
            dh.addmm_(z.float(), weight[v0:v0 + c].float())
        if need_db:
            db[v0:v0 + c] = z.sum(0, dtype=torch.float32)
    return (dh.to(hidden.dtype) if need_dh else None, dw,
            db.to(bias.dtype) if need_db else None)


class TritonLinearLogprobs(torch.autograd.Function):
    """Autograd wrapper of ``_fwd`` and ``head_backward``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, return_entropy: bool,
                softcap: Optional[float], backward: Optional[str]):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        targets = targets.contiguous().long()
        n = hidden.shape[0]
        logp, lse, ent = (torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3))
        part, splits = forward_sweep(hidden, weight, bias, targets, temperature, softcap, return_entropy)
        _finish[(triton.cdiv(n, 128),)](part, logp, lse, ent, n, splits, WITH_ENT=return_entropy, BLOCK=128)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.temperature, ctx.return_entropy, ctx.softcap, ctx.backward = temperature, return_entropy, softcap, backward
        ctx.mark_non_differentiable(targets)
        return (logp, ent) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        g = (grad_logp if grad_logp is not None else torch.zeros_like(lse)).float().contiguous()
        ge = grad_ent.float().contiguous() if ctx.return_entropy and grad_ent is not None else None
        dh, dw, db = head_backward(hidden, weight, bias, targets, lse, ent, g, ge, temperature=ctx.temperature,
                                   softcap=ctx.softcap, scale=None, filter_eps=None,
                                   needs=tuple(ctx.needs_input_grad[:3]), backward=ctx.backward)
        return dh, dw, db, None, None, None, None, None


def linear_logprobs_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                           bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                           return_entropy: bool = False, softcap: Optional[float] = None,
                           backward: Optional[str] = None):
    """Fused log-probs (and entropy) of ``targets`` under ``softmax(softcap_c(hidden @ weight.T + bias) / T)``
    (``softcap_c(a) = c tanh(a / c)``; None: no cap); ``backward``: ``"split"`` or ``"atomic"`` (module
    doc; None: ``DEFAULT_BACKWARD``)."""
    return TritonLinearLogprobs.apply(hidden, weight, bias, targets, float(temperature), bool(return_entropy),
                                      softcap, backward)
