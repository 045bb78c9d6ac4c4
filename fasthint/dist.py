"""Data parallelism on ``torch.distributed``, applied from outside the model.

``torchrun --nproc_per_node=N -m fasthint.train`` starts N processes (gloo on CPU, NCCL on GPU).
Every process draws the same global batch of prompts and keeps whole prompts (so whole groups):
rank ``r`` takes prompts ``r, r+N, ...``. The policy is sharded with FSDP2 ``fully_shard`` (each
decoder layer, then the :class:`fasthint.loss.PolicyLoss` root that owns embeddings and head); gradients are
*summed* over ranks (FSDP averages them, so each rank's loss is scaled by the world size) because
every rank's loss is already divided by the global normaliser.

Rollouts and other forward-only work run inside :func:`gathered`: every FSDP module is unsharded
once and kept whole, so ranks may run different numbers of forward passes (different prompt and
completion lengths) without collective calls.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import datetime
import os
import sys
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init(timeout_minutes: float = 60) -> torch.device:
    """Joins the process group when launched with WORLD_SIZE > 1; returns this process's device.

    On CUDA the group has a backend for each device, ``cpu:gloo,cuda:nccl``: NCCL alone takes no CPU
    tensor ("No backend type associated with device type cpu"), and the trainer's small reductions
    of Python floats and object gathers are CPU work. ``device_id`` binds the group to this rank's
    GPU (NCCL's communicator is made eagerly, and a rank on the wrong GPU fails here, not mid-step).
    ``timeout_minutes`` is how long a collective waits for the slowest rank (torch's default of 10
    minutes is shorter than a rank-0 phase of a 7B run, such as a first evaluation or a 30 GB save)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if cuda:
            dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device, timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return device


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """Ends a torchrun worker whose work is done and whose process group is closed, without the
    interpreter's final teardown: atexit handlers run (reward workers, loggers), streams are flushed,
    then ``os._exit``. Gloo's threads can outlive ``destroy_process_group`` and abort the process
    while the interpreter is torn down ('terminate called without an active exception', exit -6; seen
    here on CPU ranks, a known PyTorch race), which makes torchrun report a finished run as failed.
    A single process (no ``WORLD_SIZE`` > 1) returns and exits normally."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    atexit._run_exitfuncs()  # logging's own handler (shutdown) among them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_max(value: float) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable Python data; small: metrics and group summaries)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(policy: torch.nn.Module, lazy_init: bool = True, bf16: bool = False) -> None:
    """FSDP2: each decoder layer is one unit, the root holds the rest. FSDP averages gradients over
    ranks; :func:`fasthint.update.train_step` multiplies each rank's loss by the world size, so the
    result is their sum (a divide factor of 1 would need PREMUL_SUM, which gloo lacks).

    ``bf16``: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: the sharded parameters,
    their gradients and the optimiser states stay fp32; each unit's all-gather and compute are bf16
    (also inside :func:`gathered`: rollouts run the bf16 copy), gradients are reduced in fp32."""
    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    base = getattr(policy.lm, policy.lm.base_model_prefix)
    for layer in base.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(policy, mesh=mesh, mp_policy=mp)
    if not lazy_init:
        return
    # FSDP initialises lazily on the first forward through the root; rollouts call the LM directly,
    # so initialise now. (A no-grad dummy root forward instead left the tied embedding/head update
    # different from one process's in tests/test_distributed.py; not investigated further.)
    policy._get_fsdp_state()._lazy_init()


@torch.no_grad()
def shard_from_rank0(policy: torch.nn.Module, full: Optional[torch.nn.Module], device: torch.device,
                     bf16: bool = False) -> None:
    """Shards ``policy`` (built on the meta device on every rank) without a full copy on any rank but
    rank 0: the shards are allocated on ``device`` and filled from rank 0's ``full`` model (loaded
    on CPU; None on the other ranks) by ``set_model_state_dict(..., broadcast_from_rank0=True)``;
    buffers outside the state dict (rotary frequencies) are broadcast from rank 0 as well. ``bf16``:
    as in :func:`shard`."""
    shard(policy, lazy_init=False, bf16=bf16)
    policy.to_empty(device=device)
    sd = {f"lm.{k}": v for k, v in full.state_dict().items()} if rank() == 0 else {}
    set_model_state_dict(policy, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buf in policy.lm.named_buffers():
        if rank() == 0:
            buf.copy_(full.get_buffer(name))
        dist.broadcast(buf, src=0)
    policy._get_fsdp_state()._lazy_init()


def _fsdp_modules(module: torch.nn.Module) -> list:
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(policy: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Whole parameters on every rank for forward-only work (rollouts, evaluation, log-prob
    recomputation); a no-op without FSDP or when not ``enabled``. Resharded on exit."""
    mods = _fsdp_modules(policy) if enabled else []
    if not mods:
        yield
        return
    for m in mods:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True)


@torch.no_grad()
def full_parameters(module: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``module``'s parameters and persistent buffers, whole, named as in its state dict (a tied
    weight once), each a fresh tensor in ``dtype`` (default: as held): what an inference engine
    loads. Under FSDP2 one unit at a time: each decoder layer is all-gathered once (in bf16 under
    ``--bf16``: the mixed-precision gather), its tensors yielded, then resharded, so at most one
    layer is whole; parameters owned by a unit above ``module`` (the root's embeddings and head when
    ``module`` is the LM) are gathered one tensor each. Collective: every rank runs the iteration to
    its end, in the same order."""
    def fresh(t: torch.Tensor) -> torch.Tensor:  # a copy: FSDP frees the unsharded storage on reshard
        return t.detach().to(dtype or t.dtype, copy=True)

    done: set[str] = set()
    for prefix, m in module.named_modules():
        if not isinstance(m, FSDPModule):
            continue
        m.unshard()
        try:
            for name, p in m.named_parameters(prefix=prefix, remove_duplicate=False):
                if not isinstance(p, DTensor) and name not in done:
                    done.add(name)
                    yield name, fresh(p)
        finally:
            m.reshard()
    rest = [(n, p) for n, p in module.named_parameters(remove_duplicate=False) if n not in done]
    uses = collections.Counter(id(p) for _, p in rest)
    whole: dict[int, torch.Tensor] = {}  # a tied weight (embeddings = head) is gathered once
    for name, p in rest:
        t = whole.get(id(p))
        if t is None:
            t = p.full_tensor() if isinstance(p, DTensor) else p
        uses[id(p)] -= 1
        if uses[id(p)]:
            whole[id(p)] = t
        else:
            whole.pop(id(p), None)
        yield name, fresh(t)
    persistent = module.state_dict().keys()
    for name, b in module.named_buffers():
        if name in persistent:
            yield name, fresh(b.full_tensor() if isinstance(b, DTensor) else b)


def full_state_dict(policy: torch.nn.Module) -> dict:
    """The LM's full state dict on CPU (rank 0; empty elsewhere) for saving; collective under FSDP."""
    if not _fsdp_modules(policy):
        return policy.lm.state_dict()

    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("lm."): v for k, v in sd.items()}
