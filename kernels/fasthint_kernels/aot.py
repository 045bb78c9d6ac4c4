"""Ahead-of-time compilation of every Triton kernel for the GPUs it targets, on a machine without one.

Triton compiles from source to PTX and, with its bundled ``ptxas``, to a cubin, for any
``GPUTarget("cuda", cc, 32)``: no driver, no device. :func:`compile_one` does that for one kernel,
one set of switches, one input dtype and one tile configuration, and reports what the GPU would
launch: the shared memory it needs (``metadata.shared``) against the target's limit
(:data:`SHARED_LIMIT`), and the registers and spill bytes that ``ptxas -v`` prints for the PTX.

The signatures are written here by each parameter's role, as the launchers pass them: input pointers
in the input dtype (``*{x}``), token ids int64, fp32 vectors, int32 sizes and strides, fp32 scalars.
``python scripts/kernels_compile.py`` runs the matrix (every kernel x variant x dtype x kept config x
target) into ``bench/results/kernels_compile.csv``; ``tests/test_kernels_compile.py`` compiles a subset
in CI (every kept config with every switch on, each switch alone in one config).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource

from fasthint_kernels import advantages, fused_pg, head_backward, logprobs
from fasthint_kernels.tiles import SHARED_LIMIT, dot_precision, shared_estimate

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Kernel:
    """One Triton kernel as the launchers call it: parameter types (``{x}``: the input dtype), its bool
    switches, its other constexprs, and its tile configurations (the autotuner's, or its one launch)."""

    name: str
    fn: object
    types: dict
    switches: tuple = ()
    fixed: dict = field(default_factory=dict)
    configs: list = field(default_factory=list)
    dtypes: tuple = ("bf16", "fp16", "fp32")
    prune: Optional[Callable] = None  # the autotuner's early_config_prune (None: a fixed launch)
    extra_tile: int = 0  # shared bytes per dz element beside the operand tiles (tiles.shared_estimate)
    store_tile: bool = False  # a [BLOCK_N, BLOCK_V] tile stored through shared memory (tiles.shared_estimate)


def _types(spec: str) -> dict:
    """``"H W:*{x} Y:*i64 N:i32"`` -> {name: type}; a name without a type takes the next one's."""
    out, pending = {}, []
    for tok in spec.split():
        name, _, ty = tok.partition(":")
        pending.append(name)
        if ty:
            out.update({p: ty for p in pending})
            pending = []
    return out


_HEAD = "H W B:*{x} Y:*i64"
_SIZES = "N V D stride_hn stride_wv:i32"


def kernels() -> list[Kernel]:
    """Every Triton kernel fasthint launches on CUDA."""
    launch = [triton.Config({}, num_warps=4, num_stages=3)]  # triton's defaults (fixed-grid kernels)
    return [
        Kernel("logprobs._fwd", logprobs._fwd,
               _types(f"{_HEAD} PART:*fp32 N V D splits stride_hn stride_wv:i32 inv_t cap:fp32"),
               ("HAS_BIAS", "SOFTCAP", "WITH_ENT"), configs=logprobs._fwd_tuned.configs,
               prune=logprobs._fwd_tuned.early_config_prune),
        Kernel("logprobs._finish", logprobs._finish, _types("PART LOGP LSE ENT:*fp32 N SPLITS:i32"),
               ("WITH_ENT",), {"BLOCK": 128}, launch, ("fp32",)),
        Kernel("fused_pg._epilogue", fused_pg._epilogue,
               _types("PART OLD ADV WT IW GAM REF LOGP LSE ENTR LOSS G GE:*fp32 N SPLITS:i32 "
                      "eps_low eps_high dual_c beta coef:fp32"),
               ("PG_WEIGHT", "DUAL_CLIP", "SHAPED_RATIO", "K3_PENALTY", "ENTROPY_BONUS"), {"BLOCK": 128}, launch,
               ("fp32",)),
        Kernel("head_backward._bwd", head_backward._bwd,
               _types(f"{_HEAD} LSE ENTR G GE DH DW DB SCALE:*fp32 {_SIZES} inv_t cap filter_eps:fp32"),
               ("HAS_BIAS", "SOFTCAP", "ENT", "NEED_DH", "NEED_DW", "NEED_DB", "FILTER"), {"GROUP_N": 8},
               head_backward._bwd_tuned.configs, prune=head_backward._bwd_tuned.early_config_prune,
               extra_tile=head_backward.BWD_EXTRA_TILE),
        Kernel("head_backward._dz_chunk", head_backward._dz_chunk,
               _types(f"{_HEAD} LSE ENTR G GE:*fp32 DZ:*{{x}} SCALE:*fp32 N V D v_start VC stride_hn stride_wv "
                      "stride_dz:i32 inv_t cap:fp32"),
               ("HAS_BIAS", "SOFTCAP", "ENT"), {"GROUP_N": 8}, configs=head_backward._dz_chunk_tuned.configs,
               prune=head_backward._dz_chunk_tuned.early_config_prune, store_tile=True),
        Kernel("advantages._group_adv", advantages._group_adv,
               _types("R:*fp64 ORDER STARTS:*i64 OUT:*fp32 inv_batch_std eps:fp32"), (),
               {"MODE": 0, "BLOCK": 64}, launch, ("fp32",)),
    ]


@dataclass
class Compiled:
    kernel: str
    target: int
    dtype: str
    switches: str
    config: str
    ok: bool
    shared: int = 0
    estimate: int = 0  # tiles.shared_estimate: what the autotuner's pruner assumes
    limit: int = 0
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    seconds: float = 0.0
    error: str = ""

    @property
    def fits(self) -> bool:
        return self.ok and self.shared <= self.limit


def config_name(cfg) -> str:
    tiles = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D") if k in cfg.kwargs)
    return f"{tiles + ' ' if tiles else ''}w{cfg.num_warps} s{cfg.num_stages}"


def compile_one(k: Kernel, target: int, dtype: str, switches: dict, cfg, usage: bool = True) -> Compiled:
    """Compiles ``k`` for ``sm_{target}``; never raises (a failure is ``ok=False`` with its error).
    ``usage``: also registers and spills (``ptxas -v`` once more on the PTX, about a second)."""
    sig = {name: ty.replace("{x}", dtype) for name, ty in k.types.items()}
    const = {**k.fixed, **switches, **cfg.kwargs}
    if "DOT_PREC" in k.fn.arg_names:
        const["DOT_PREC"] = dot_precision(DTYPES[dtype])
    sig.update({name: "constexpr" for name in const})
    label = ",".join(s for s, on in switches.items() if on) or "-"
    out = Compiled(k.name, target, dtype, label, config_name(cfg), False, limit=SHARED_LIMIT[target])
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(k.fn, sig, const), target=GPUTarget("cuda", target, 32),
                                  options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    except Exception as e:  # noqa: BLE001 - a compile failure is the finding
        cause = f" <- {type(e.__cause__).__name__}: {e.__cause__}" if e.__cause__ is not None else ""
        out.error = " ".join(f"{type(e).__name__}: {str(e)[-200:]}{cause[:300]}".split())
        out.seconds = time.perf_counter() - t0
        return out
    out.ok, out.shared = True, int(compiled.metadata.shared)
    out.estimate = shared_estimate(cfg, DTYPES[dtype].itemsize, k.extra_tile, k.store_tile) \
        if "BLOCK_D" in cfg.kwargs else 0
    if usage:
        out.registers, out.spill_stores, out.spill_loads = ptxas_usage(compiled.asm["ptx"], target)
    out.seconds = time.perf_counter() - t0
    return out


def ptxas_usage(ptx: str, target: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from Triton's bundled ``ptxas -v`` on ``ptx``."""
    arch = sm_arch_from_capability(target)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # Triton's own ptxas flags (make_cubin), with -v
        res = subprocess.run([get_ptxas(target).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                              src, "-o", src + ".o"],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (int(regs.group(1)) if regs else -1, *(tuple(map(int, spills.groups())) if spills else (-1, -1)))


def variants(k: Kernel, full: bool) -> list[dict]:
    """Switch settings: every switch on first, then each alone; ``full``: every combination."""
    names = k.switches
    every = {s: True for s in names}
    if full:
        return [every] + [{s: bool(i >> j & 1) for j, s in enumerate(names)} for i in range((1 << len(names)) - 1)]
    return [every] + [v for v in ({s: s == one for s in names} for one in names) if v != every]


LEVELS = ("ci", "configs", "full")


def plan(level: str = "ci", targets=(80, 90), only: Optional[str] = None) -> list[tuple]:
    """(kernel, target, dtype, switches, config) to compile, at a ``level``:

    - ``ci`` (minutes on 2 cores): in bf16 every kept configuration with every switch on, for both
      targets; in fp32 the kept configuration with the most shared memory; on sm_90 each switch alone
      in the first configuration;
    - ``configs``: every kept configuration in every dtype, with every switch on and each alone;
    - ``full``: every combination of switches too (hours: one ``_bwd`` compile takes seconds)."""
    jobs = []
    for k in kernels():
        if only and only not in k.name:
            continue
        vs = variants(k, level == "full")
        for target in targets:
            for dtype in k.dtypes:
                configs = kept_configs(k, target, dtype)
                if level != "ci":
                    jobs += [(k, target, dtype, v, c) for c in configs for v in vs]
                    continue
                if dtype == "fp32" and len(k.dtypes) > 1:
                    configs = [max(configs, key=lambda c: shared_estimate(c, 4, k.extra_tile, k.store_tile))]
                elif dtype != k.dtypes[0]:
                    continue
                jobs += [(k, target, dtype, vs[0], c) for c in configs]
                if target == targets[-1] and dtype == k.dtypes[0]:
                    jobs += [(k, target, dtype, v, configs[0]) for v in vs[1:]]
    return jobs


def kept_configs(k: Kernel, target: int, dtype: str) -> list:
    """The configurations the autotuner keeps on ``target`` for ``dtype`` inputs (``k.prune``: the
    kernel's ``tiles.prune_by_shared`` rule at the target's limit); a fixed launch is always kept."""
    if k.prune is None:
        return list(k.configs)
    args = {"H": torch.empty(0, dtype=DTYPES[dtype])}
    return k.prune(k.configs, args, limit=SHARED_LIMIT[target])
