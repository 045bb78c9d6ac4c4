"""Triton tile helpers shared by the head's forward (``logprobs.py``, ``fused_pg.py``) and its backward
(``head_backward.py``): one logit tile (optionally soft-capped), the dot precision, the autotuner's
configurations and the interpreter's fixed tiles.

A logit tile is z[BLOCK_N, BLOCK_V] = (H W^T + b) / T in fp32, or with Gemma-2's soft-cap c
z = c tanh((H W^T + b) / c) / T, whose factor 1 - tanh^2 the backward needs beside it. No memory
beyond registers and shared memory: a tile never reaches HBM.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from fasthint_kernels.reference import fp32_dots_exact

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _logit_tile(H, W, B, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv, inv_t,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] in fp32 (masked vocab columns = -inf)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    rows_h = offs_n.to(tl.int64)[:, None] * stride_hn  # int64: V x D reaches 2^31 at D = 16k
    rows_w = offs_v.to(tl.int64)[:, None] * stride_wv
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(H + rows_h + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0)
        w = tl.load(W + rows_w + offs_d[None, :], mask=mask_v[:, None] & mask_d[None, :],
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
    (masked columns -inf) and the cap's derivative factor (ones without a cap). One return: Triton's
    code generator visits every return of a function, constexpr branches included, and refuses two
    of different types (the interpreter, which follows Python, accepted them)."""
    if SOFTCAP:
        a = _logit_tile(H, W, B, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv, 1.0,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PREC)
        t = _tanh(tl.where(mask_v[None, :], a / cap, 0.0))
        z = tl.where(mask_v[None, :], cap * t * inv_t, float("-inf"))
        dcap = 1.0 - t * t
    else:
        z = _logit_tile(H, W, B, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv, inv_t,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PREC)
        dcap = tl.full((BLOCK_N, BLOCK_V), 1.0, tl.float32)
    return z, dcap


def tile_configs(shapes: list[tuple[int, int, int, int, int]]) -> list:
    """Autotuner configurations from (BLOCK_N, BLOCK_V, BLOCK_D, warps, stages) tuples."""
    return [triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_D": d}, num_warps=w, num_stages=s)
            for n, v, d, w, s in shapes]


# Autotuned on CUDA per (D, V) (N changes every micro-batch; the best tile hardly does): tile sizes,
# warps and pipeline stages that fit Hopper's and Ampere's shared memory in bf16 and fp32. The
# backward's accumulators are zeroed between trial runs (its atomics add).
FWD_CONFIGS = tile_configs([(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 256, 32, 8, 3),
                            (64, 128, 32, 4, 4), (128, 64, 64, 4, 3)])


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 setting: full fp32 dots unless the user allowed TF32."""
    return "ieee" if dtype == torch.float32 and fp32_dots_exact() else "tf32"


def fixed_tiles(d: int) -> dict:
    """The one tile configuration under the interpreter, where every tile iteration costs the same
    (so vocabulary tiles are large); empty on CUDA, where the autotuner picks."""
    if not INTERPRET:
        return {}
    return dict(BLOCK_N=64, BLOCK_V=1024, BLOCK_D=64 if d >= 64 else max(16, triton.next_power_of_2(d)))


# The most shared memory one block may use (opt-in), bytes, by compute capability (CUDA C Programming
# Guide, "Technical Specifications per Compute Capability"): A100 (8.0) 163 KB, A10/L4/RTX (8.6, 8.9)
# 99 KB, H100/H200 (9.0) 227 KB. On a GPU the pruner asks the driver instead.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def shared_estimate(cfg, elem_bytes: int, extra_tile: int = 0, store_tile: bool = False) -> int:
    """Bytes of shared memory a tile configuration needs: an upper bound of what Triton 3.9 allocates,
    checked against every compile by ``scripts/kernels_compile.py`` (tests/test_kernels_compile.py).
    The dot's pipeline holds ``num_stages - 1`` buffers of its two operand tiles, ``(BLOCK_N + BLOCK_V)
    x BLOCK_D`` elements (measured: fp32 takes them all, bf16 and fp16 one); ``extra_tile`` bytes per
    ``BLOCK_N x BLOCK_V`` element live beside them (the atomic backward's transposed dz operand and its
    reductions: 5); ``store_tile``: a ``BLOCK_N x BLOCK_V`` tile stored in the input dtype goes through
    shared memory after the loop, reusing the pipeline's (the split backward's dz)."""
    k = cfg.kwargs
    tile = k["BLOCK_N"] * k["BLOCK_V"]
    pipeline = max(1, cfg.num_stages - 1) * (k["BLOCK_N"] + k["BLOCK_V"]) * k["BLOCK_D"] * elem_bytes
    return max(pipeline + extra_tile * tile, elem_bytes * tile if store_tile else 0)


def device_shared_limit(device=None) -> int:
    """This GPU's per-block shared memory limit (the driver's figure; the table's for its capability)."""
    props = triton.runtime.driver.active.utils.get_device_properties(
        torch.cuda.current_device() if device is None else device)
    return int(props["max_shared_mem"])


def prune_by_shared(extra_tile: int = 0, store_tile: bool = False, pointer: str = "H"):
    """An ``early_config_prune`` for ``triton.autotune``: keeps the configurations whose
    :func:`shared_estimate` fits this GPU (or ``limit=``), in the dtype of argument ``pointer``; keeps
    the smallest when none fits (the launch then fails loudly rather than tuning nothing)."""
    def prune(configs, named_args, limit: Optional[int] = None, **kwargs):
        elem = named_args[pointer].element_size()
        cap = limit if limit is not None else device_shared_limit()
        need = {id(c): shared_estimate(c, elem, extra_tile, store_tile) for c in configs}
        kept = [c for c in configs if need[id(c)] <= cap]
        return kept or [min(configs, key=lambda c: need[id(c)])]
    return prune
