"""Triton kernels: log-probs (and entropy) of a linear head without materialising the logits; the
backward is ``head_backward.py`` (shared with ``fasthint_kernels.fused_pg``).

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
busy when N is small and keep the resident programs' H tiles within L2 (``forward_splits``; programs
numbered split-minor, ``_fwd``); W is read once per wave of resident token tiles, shared in L2 by the
programs of one split.
The backward recomputes each logit tile once (``head_backward.py``: the split and atomic forms, their
bytes and extra memory). Ops: ``torch.ops.fasthint.head_logprobs`` and ``fasthint::head_backward``,
custom ops with fake implementations (FakeTensorMode: ``python -m fasthint.rehearse``; torch.compile).

Cost (N tokens, D hidden, V vocabulary; BN x BV tiles). FLOPs: forward 2NDV, backward 2NDV (recompute)
+ 2NDV (dH) + 2NDV (dW) = 8NDV, against the floor of any head loss, 6NDV (logits, dH, dW: three bare
GEMMs), i.e. 4/3 of it. Memory: O(N) vectors and the ``[4, splits, N]`` fp32 partials in the forward;
never ``[N, V]``. Why not Liger's design (materialised chunks, 6NDV): docs/KERNELS.md, "FLOPs".

Under ``TRITON_INTERPRET=1`` (CPU tensors; tests use fp32/fp16 there: the interpreter's bf16
``tl.dot`` is wrong) the kernels run one fixed configuration with wide vocabulary tiles.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fasthint_kernels.head_backward import head_backward
from fasthint_kernels.tiles import FWD_CONFIGS, INTERPRET, _capped_tile, dot_precision, fixed_tiles, prune_by_shared


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
def _fwd(H, W, B, Y, PART, N, V, D, splits, stride_hn, stride_wv, inv_t, cap,
         HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENT: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """The sweep of one token tile over one of ``splits`` vocabulary splits: its partial (m, s, q, zy)
    go to ``PART [4, splits, N]``; ``_combine`` merges the splits. Programs are numbered split-minor
    (program p: token tile p // splits, split p % splits), so the programs resident together hold
    resident / splits token tiles of H, which each of their vocabulary tiles reads again; token-major
    they held every token tile (117 MB at N = 16k, D = 3,584, bf16, against 50 MB of L2: H then streamed
    from HBM once per vocabulary tile, N D 2 V / BV = 139 GB at BV = 128). ``forward_splits`` picks
    enough splits for those tiles to stay in L2; W's tiles are shared by the programs of one split."""
    pid = tl.program_id(0)
    split = pid % splits
    offs_n = (pid // splits) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
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


_fwd_tuned = triton.autotune(configs=FWD_CONFIGS, key=["D", "V"],
                             prune_configs_by={"early_config_prune": prune_by_shared()})(_fwd)


FWD_SPLITS: Optional[int] = None  # tests: a fixed number of vocabulary splits in the forward


def forward_splits(n: int, v: int, d: int, elem: int, device: torch.device) -> int:
    """Vocabulary splits of the forward sweep (1 on CPU, at most 16, at least 1024 columns each), the
    larger of two needs, for ~2 resident programs per SM and 64-token tiles of ``d x elem`` bytes:

    - fill: enough (token tile, split) programs to occupy the SMs when N is small (at N = 4k, 64 token
      tiles would fill half of an H100's 132 SMs);
    - L2: the programs launch split-minor (``_fwd``), so the resident ones hold (resident / splits)
      token tiles of H, which every vocabulary tile of the sweep reads again; enough splits keep those
      tiles within half of L2. At Qwen2.5-7B's head on an H100 (D = 3,584, bf16: 0.46 MB per tile; 264
      resident programs; 50 MB of L2) that is 5 splits: 24 MB of H resident instead of 121 MB."""
    if FWD_SPLITS:
        return FWD_SPLITS
    if device.type != "cuda":
        return 1
    props = torch.cuda.get_device_properties(device)
    resident, tiles, tile_bytes = 2 * props.multi_processor_count, max(1, triton.cdiv(n, 64)), 64 * d * elem
    fill = triton.cdiv(resident, tiles)
    budget = getattr(props, "L2_cache_size", 40 << 20) // 2
    fit = triton.cdiv(resident * tile_bytes, budget) if tiles * tile_bytes > budget else 1
    return max(1, min(16, max(fill, fit), triton.cdiv(v, 1024)))


def _splits(hidden: torch.Tensor, weight: torch.Tensor) -> int:
    return forward_splits(hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.element_size(), hidden.device)


def forward_sweep(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                  temperature: float, softcap: Optional[float], with_ent: bool) -> tuple[torch.Tensor, int]:
    """``_fwd`` over every (token tile, vocabulary split): the ``[4, splits, N]`` partials and splits."""
    n, d = hidden.shape
    v = weight.shape[0]
    splits = forward_splits(n, v, d, hidden.element_size(), hidden.device)
    part = torch.empty((4, splits, n), dtype=torch.float32, device=hidden.device)
    kernel = _fwd if INTERPRET else _fwd_tuned
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * splits,)](
        hidden, weight, bias if bias is not None else part, targets, part, n, v, d, splits, hidden.stride(0),
        weight.stride(0), 1.0 / temperature, float(softcap or 1.0), HAS_BIAS=bias is not None,
        SOFTCAP=softcap is not None, WITH_ENT=with_ent, DOT_PREC=dot_precision(hidden.dtype), **fixed_tiles(d))
    return part, splits


@torch.library.custom_op("fasthint::head_logprobs", mutates_args=())
def _head_logprobs_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                      temperature: float, softcap: Optional[float],
                      with_ent: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, lse, entropy, partials): ``_fwd``'s sweep and ``_finish``; the ``[4, splits, N]`` partials
    are returned (a workspace) so that a fake run counts them."""
    n = hidden.shape[0]
    logp, lse, ent = (torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3))
    if n == 0:  # an empty micro-batch or recompute chunk: no launch (a zero grid)
        return logp, lse, ent, lse.new_empty((4, _splits(hidden, weight), 0))
    part, splits = forward_sweep(hidden, weight, bias, targets, temperature, softcap, with_ent)
    _finish[(triton.cdiv(n, 128),)](part, logp, lse, ent, n, splits, WITH_ENT=with_ent, BLOCK=128)
    return logp, lse, ent, part


@_head_logprobs_op.register_fake
def _head_logprobs_fake(hidden, weight, bias, targets, temperature, softcap, with_ent):
    n = hidden.shape[0]
    vec = [hidden.new_empty(n, dtype=torch.float32) for _ in range(3)]
    return (*vec, hidden.new_empty((4, _splits(hidden, weight), n), dtype=torch.float32))


class TritonLinearLogprobs(torch.autograd.Function):
    """Autograd wrapper of the custom ops ``fasthint::head_logprobs`` and ``fasthint::head_backward``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, return_entropy: bool,
                softcap: Optional[float], backward: Optional[str]):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        targets = targets.contiguous().long()
        logp, lse, ent, _ = torch.ops.fasthint.head_logprobs(hidden, weight, bias, targets, temperature, softcap,
                                                             return_entropy)
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
