"""Triton kernels: the backward of a linear head's log-probs and entropy, without ``[N, V]`` logits
(shared by ``fasthint_kernels.logprobs`` and ``fasthint_kernels.fused_pg``).

Math (docs/ALGORITHMS.md §5), per token t, from the forward's log-sum-exp (``logprobs.py``):

    g = dL/dlogp, e = dL/dentropy per token, log p_v = z_v - lse recomputed tile by tile:
    dz_v = g (1[v=y] - p_v) - e p_v (log p_v + entropy)     (soft-capped: times 1 - tanh^2)
    dH = dz W / T,  dW = dz^T H / T,  db = sum_t dz / T

Two backwards, both recomputing each logit tile exactly once (``head_backward``):

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
+ 2NDV (dH) + 2NDV (dW) = 8NDV in both: the floor of a head that never holds ``[N, V]`` logits (the
logits, their recompute, dH, dW: four bare GEMMs, ``bench/logprobs.py``'s "x floor"); a design that
keeps a chunk's logits through its backward does 6NDV with ``[chunk, V]`` buffers.
At Qwen2.5-7B's head (N = 16k, D = 3,584, V = 152,064, bf16):
- split: 4NDV of the 8 on cuBLAS; HBM traffic beside the GEMMs' operands: dz written once and read
  twice (6 N V bytes = 15 GB, ~3.5 ms at 4.3 TB/s) and the fp32 dH accumulator read and written once
  per chunk (~10 chunks x 8 N D bytes = 4.7 GB); extra memory: the dz buffer (0.5 GB) and fp32 dH
  (0.24 GB). At N = 64k the chunks are 4k columns wide (C N <= 2^28), 38 of them: the dH
  accumulator's traffic grows to 38 x 8 N D = 71 GB and dz's to 60 GB, together ~30 ms at 4.3 TB/s
  against ~0.4 s for the backward's 6NDV of GEMMs at ~700 TFLOP/s (7%). Kept as it is: a wider chunk
  costs N C 2 bytes more (2 GB at C = 16k), and blocking the tokens instead needs an fp32 dW
  accumulator across blocks (2.2 GB).
- atomic: the backward issues N D V (1/BV + 1/BN) fp32
  atomic adds: 1.4e11 with 128 x 128 tiles, the design's risk (L2 reductions on that scale can cost
  more than the GEMMs) unless gradient filtering skips most tiles, as Cut Cross-Entropy relies on for a
  trained head's peaked softmax; extra memory: fp32 dH and dW accumulators (0.24 + 2.2 GB).
Neither holds ``[N, V]``. ``bench/logprobs.py`` times both (providers ``triton``, ``triton_atomic``,
``triton_filter``); ``FASTHINT_HEAD_BACKWARD=atomic`` makes the atomic one the default.

The op is ``torch.ops.fasthint.head_backward`` (a custom op with a fake implementation that
allocates its outputs and workspaces, so ``python -m fasthint.rehearse`` counts them and
torch.compile can trace it).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from fasthint_kernels.chunked import _mm_f32
from fasthint_kernels.tiles import (FWD_CONFIGS, INTERPRET, _capped_tile, dot_precision, fixed_tiles, prune_by_shared,
                                    tile_configs)


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
    """dH[rows] += dz W[cols], dW[cols] += dz^T H[rows], db[cols] += sum dz (fp32 atomics, relaxed: a sum
    needs atomicity, not ordering; the default acq_rel adds a fence to every add)."""
    if NEED_DB:
        tl.atomic_add(DB + offs_v, tl.sum(dz, axis=0), mask=mask_v, sem="relaxed")
    rows_n, rows_v = offs_n.to(tl.int64)[:, None], offs_v.to(tl.int64)[:, None]  # int64: V x D reaches 2^31
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        if NEED_DH:
            w = tl.load(W + rows_v * stride_wv + offs_d[None, :], mask=mask_v[:, None] & mask_d[None, :],
                        other=0.0)
            tl.atomic_add(DH + rows_n * D + offs_d[None, :],
                          tl.dot(dz.to(w.dtype), w, input_precision=DOT_PREC), mask=mask_n[:, None] & mask_d[None, :],
                          sem="relaxed")
        if NEED_DW:
            h = tl.load(H + rows_n * stride_hn + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                        other=0.0)
            tl.atomic_add(DW + rows_v * D + offs_d[None, :],
                          tl.dot(tl.trans(dz.to(h.dtype)), h, input_precision=DOT_PREC),
                          mask=mask_v[:, None] & mask_d[None, :], sem="relaxed")


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
def _grouped(pid, n_tiles, v_tiles, GROUP_N: tl.constexpr):
    """(token tile, vocabulary tile) of program ``pid`` in grouped order: GROUP_N neighbouring token
    tiles walk the vocabulary together. The programs resident at once then read GROUP_N token tiles of
    H and a run of W's tiles, which stay in L2, instead of every token tile of H per vocabulary tile.
    At Qwen2.5-7B's head (N = 16k, D = 3,584, bf16, 64 x 128 tiles, ~264 programs resident on an H100):
    token-major order keeps all of H (117 MB) in flight against 50 MB of L2, so H streams from HBM once
    per vocabulary tile (N D 2 V / BV bytes: 14.7 GB per 16k-column chunk); grouped, the resident set
    is 8 H tiles (3.7 MB) and ~33 W tiles (30 MB), and each operand is read from HBM about once."""
    per_group = GROUP_N * v_tiles
    first = (pid // per_group) * GROUP_N
    size = tl.minimum(n_tiles - first, GROUP_N)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _bwd(H, W, B, Y, LSE, ENTR, G, GE, DH, DW, DB, SCALE, N, V, D, stride_hn, stride_wv, inv_t, cap, filter_eps,
         HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ENT: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
         NEED_DB: tl.constexpr, FILTER: tl.constexpr, GROUP_N: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_n, pid_v = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
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
              inv_t, cap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ENT: tl.constexpr, GROUP_N: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """The split backward's first half: dz of vocabulary columns [v_start, v_start + VC) for all
    tokens, written in the inputs' dtype to ``DZ [N, VC]`` (the GEMMs with W and H follow in torch);
    programs in grouped order (``_grouped``)."""
    pid_n, pid_c = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(VC, BLOCK_V), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_v = v_start + offs_c
    mask_n = offs_n < N
    mask_v = (offs_c < VC) & (offs_v < V)
    dz, _, _, _, valid = _tile_grad(H, W, B, Y, LSE, ENTR, G, GE, SCALE, offs_n, offs_v, mask_n, mask_v, D,
                                    stride_hn, stride_wv, inv_t, cap, HAS_BIAS, SOFTCAP, ENT, BLOCK_N, BLOCK_V,
                                    BLOCK_D, DOT_PREC)
    tl.store(DZ + offs_n.to(tl.int64)[:, None] * stride_dz + offs_c[None, :], dz.to(DZ.dtype.element_ty), mask=valid)


BWD_EXTRA_TILE = 5  # shared bytes per dz element beside the operand tiles (tiles.shared_estimate)
_bwd_tuned = triton.autotune(
    configs=tile_configs([(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3), (128, 64, 64, 4, 3),
                          (64, 128, 32, 4, 4), (128, 128, 32, 8, 4)]),
    key=["D", "V"], reset_to_zero=["DH", "DW", "DB"],
    prune_configs_by={"early_config_prune": prune_by_shared(BWD_EXTRA_TILE)})(_bwd)
# keyed by the head's shape, not by the chunk width VC: VC follows N (SPLIT_ELEMS // N), so a VC key
# re-tuned for most new batch sizes (about 150 keys for N between 8k and 20k, ~1 s of tuning each)
_dz_chunk_tuned = triton.autotune(configs=FWD_CONFIGS, key=["D", "V"],
                                  prune_configs_by={"early_config_prune": prune_by_shared(store_tile=True)})(_dz_chunk)
SPLIT_ELEMS = 1 << 28  # the split backward's dz buffer: at most this many elements (512 MiB in bf16)
# which backward runs by default ("split" or "atomic"; the module doc argues the default, a GPU
# measurement settles it: bench/logprobs.py's triton and triton_atomic providers)
DEFAULT_BACKWARD = os.environ.get("FASTHINT_HEAD_BACKWARD", "split")


def head_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                  lse: torch.Tensor, ent: torch.Tensor, g: torch.Tensor, ge: Optional[torch.Tensor], *,
                  temperature: float, softcap: Optional[float], scale: Optional[torch.Tensor],
                  filter_eps: Optional[float], needs: tuple[bool, bool, bool], backward: Optional[str] = None):
    """(dH, dW, db) of ``sum_t g_t logp_t + ge_t H_t`` (times the one-element ``scale``, None: 1), each
    None where ``needs`` says so; ``ge`` None: no entropy term. ``backward``: ``"split"`` or
    ``"atomic"`` (module doc; None: ``DEFAULT_BACKWARD``); gradient filtering (``filter_eps``) runs on
    the atomic one. Runs the custom op ``torch.ops.fasthint.head_backward``."""
    backward = backward or DEFAULT_BACKWARD
    if backward not in ("split", "atomic"):
        raise ValueError(f"backward must be 'split' or 'atomic', got {backward!r}")
    needs = (needs[0], needs[1], needs[2] and bias is not None)
    grads = torch.ops.fasthint.head_backward(hidden, weight, bias, targets, lse, ent, g, ge, scale, temperature,
                                             softcap, filter_eps, *needs, backward)[:3]
    return tuple(t if need else None for t, need in zip(grads, needs))


@torch.library.custom_op("fasthint::head_backward", mutates_args=())
def _head_backward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                      lse: torch.Tensor, ent: torch.Tensor, g: torch.Tensor, ge: Optional[torch.Tensor],
                      scale: Optional[torch.Tensor], temperature: float, softcap: Optional[float],
                      filter_eps: Optional[float], need_dh: bool, need_dw: bool, need_db: bool,
                      backward: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dH, dW, db, workspace, workspace), an unneeded gradient empty. The workspaces (the split
    backward's dz buffer or the atomic one's fp32 dW; an fp32 dH that was cast) are returned rather
    than freed inside, so that a fake run (:func:`_head_backward_fake`) counts them at the peak."""
    f32 = dict(dtype=torch.float32, device=hidden.device)
    scale = torch.ones(1, **f32) if scale is None else scale.detach().float().reshape(1)
    args = (hidden, weight, bias if bias is not None else lse, targets, lse, ent, g, ge if ge is not None else g)
    flags = dict(HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, ENT=ge is not None,
                 DOT_PREC=dot_precision(hidden.dtype), **fixed_tiles(hidden.shape[1]))
    consts = (1.0 / temperature, float(softcap or 1.0))
    n, d = hidden.shape
    v = weight.shape[0]
    if n == 0:  # no token: zero gradients, no launch (a zero grid)
        return (hidden.new_zeros((0, d)) if need_dh else _none(hidden), weight.new_zeros((v, d)) if need_dw else
                _none(hidden), bias.new_zeros(v) if need_db else _none(hidden), _none(hidden), _none(hidden))
    if backward == "split" and filter_eps is None:
        return _backward_split(args, scale, bias, consts, flags, need_dh, need_dw, need_db)
    # unneeded outputs get their own dummies: the autotuner zeroes DH, DW and DB between trials
    dh = torch.zeros((n, d), **f32) if need_dh else torch.zeros(1, **f32)
    dw = torch.zeros((v, d), **f32) if need_dw else torch.zeros(1, **f32)
    db = torch.zeros(v, **f32) if need_db else torch.zeros(1, **f32)
    kernel = _bwd if INTERPRET else _bwd_tuned
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"]),)](
        *args, dh, dw, db, scale, n, v, d, hidden.stride(0), weight.stride(0), *consts, float(filter_eps or 0.0),
        NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db, FILTER=filter_eps is not None, GROUP_N=8, **flags)
    return (_cast(dh, hidden.dtype, need_dh), _cast(dw, weight.dtype, need_dw),
            _cast(db, bias.dtype if need_db else db.dtype, need_db), _spent(dw, weight.dtype, need_dw),
            _spent(dh, hidden.dtype, need_dh))


def _none(like: torch.Tensor) -> torch.Tensor:
    """The op's stand-in for an output it does not produce: an empty fp32 tensor."""
    return like.new_empty(0, dtype=torch.float32)


def _cast(t: torch.Tensor, dtype: torch.dtype, need: bool) -> torch.Tensor:
    return t.to(dtype) if need else _none(t)


def _spent(acc: torch.Tensor, dtype: torch.dtype, need: bool) -> torch.Tensor:
    """An fp32 accumulator that was cast to ``dtype`` (a workspace output), else an empty tensor."""
    return acc if need and acc.dtype != dtype else _none(acc)


def _split_cols(n: int, v: int) -> int:
    """Vocabulary columns per chunk of the split backward (its ``[N, cols]`` dz buffer)."""
    return max(256, min(v, SPLIT_ELEMS // max(n, 1)) // 256 * 256)


@_head_backward_op.register_fake
def _head_backward_fake(hidden, weight, bias, targets, lse, ent, g, ge, scale, temperature, softcap, filter_eps,
                        need_dh, need_dw, need_db, backward):
    """The op's outputs and workspaces as shapes (FakeTensorMode: ``python -m fasthint.rehearse``)."""
    n, d = hidden.shape
    v = weight.shape[0]
    split = backward == "split" and filter_eps is None
    dh = hidden.new_empty((n, d)) if need_dh else _none(hidden)
    dw = weight.new_empty((v, d)) if need_dw else _none(hidden)
    db = bias.new_empty(v) if need_db else _none(hidden)
    if n == 0:
        return dh, dw, db, _none(hidden), _none(hidden)
    cast_dw = need_dw and not split and weight.dtype != torch.float32
    ws = hidden.new_empty((n, min(_split_cols(n, v), v))) if split else \
        hidden.new_empty((v, d) if cast_dw else 0, dtype=torch.float32)
    return dh, dw, db, ws, hidden.new_empty((n, d) if need_dh and hidden.dtype != torch.float32 else 0,
                                            dtype=torch.float32)


def _backward_split(args: tuple, scale: torch.Tensor, bias: Optional[torch.Tensor], consts: tuple, flags: dict,
                    need_dh: bool, need_dw: bool, need_db: bool):
    """Vocabulary chunk by chunk: ``_dz_chunk`` writes dz of all tokens (inputs' dtype), then
    dW[chunk] = dz^T H (each row written once, fp32 accumulation inside the GEMM) and dH += dz W[chunk]
    (into an fp32 accumulator; tensor cores with ``out_dtype`` on CUDA). Returns the op's five tensors."""
    hidden, weight = args[:2]
    n, d = hidden.shape
    v = weight.shape[0]
    cols = _split_cols(n, v)
    dz = torch.empty((n, min(cols, v)), dtype=hidden.dtype, device=hidden.device)
    dh = torch.zeros((n, d), dtype=torch.float32, device=hidden.device) if need_dh else _none(dz)
    dw = torch.empty_like(weight) if need_dw else _none(dz)
    db = torch.empty(v, dtype=torch.float32, device=hidden.device) if need_db else _none(dz)
    kernel = _dz_chunk if INTERPRET else _dz_chunk_tuned
    for v0 in range(0, v, cols):
        c = min(cols, v - v0)
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(c, meta["BLOCK_V"]),)](
            *args, dz, scale, n, v, d, v0, c, hidden.stride(0), weight.stride(0), dz.stride(0), *consts, GROUP_N=8,
            **flags)
        z = dz[:, :c]
        if need_dw:
            torch.mm(z.t(), hidden, out=dw[v0:v0 + c])
        if need_dh and not _mm_f32(z, weight[v0:v0 + c], dh, accumulate=True):
            dh.addmm_(z.float(), weight[v0:v0 + c].float())
        if need_db:
            db[v0:v0 + c] = z.sum(0, dtype=torch.float32)
    return (_cast(dh, hidden.dtype, need_dh), dw, _cast(db, bias.dtype if need_db else db.dtype, need_db), dz,
            _spent(dh, hidden.dtype, need_dh))
