"""Rehearse one optimizer step of a run on a fake cluster, and say whether it fits the GPUs.

    python -m fasthint.rehearse --config recipes/sage_qwen2.5-7b-instruct.yaml --nproc_per_node 8 --gpu_memory_gb 80

It takes what ``fasthint.train`` takes, plus the cluster (``--nproc_per_node``, ``--nnodes``,
``--gpu_memory_gb``) and ``--json PATH``. It needs no download and no ``--data``: the model's shapes
come from ``recipes/models/<name>.json`` (a hub id ``org/<name>`` resolves there; a checkpoint
directory or ``toy`` is read as it is), and every rollout is at its longest (``max_prompt_length``
prompt tokens + ``max_new_tokens``): the length mix that decides the peak.

How. One CPU process joins PyTorch's fake process group at the world size asked for, as rank 0 and
then as rank 1; builds the policy on the meta device; shards it with the trainer's own
``dist.shard`` (FSDP2, the run's mixed precision, activation checkpointing); and materialises it
under ``FakeTensorMode``, so that no memory is allocated and no FLOP is spent. Each phase of a step
runs the trainer's code on the largest micro-batch the caps allow, inside ``FSDPMemTracker``, which
counts bytes by kind (docs/MEMORY.md lists what each phase runs). Peak memory depends on the largest
micro-batch, not on how many there are; the counts are reported beside it.

Bytes are counted on a CPU mesh: FSDP2 under ``FakeTensorMode`` would need torch's CUDA build for a
'cuda' mesh. The head runs as on a GPU: each phase is rehearsed with the Triton kernels (custom ops
whose fake kernels allocate their workspaces) and with the chunked torch path at its CUDA chunk, which
``impl="auto"`` chooses between there, and the larger counts (column ``head``). Packed attention is one
causal SDPA per row, as flash-attn's varlen kernel holds it. What lives outside the trainer's tensors is
added per phase from stated figures (:data:`ASSUMPTIONS`). GB means 10^9 bytes throughout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from fasthint.precheck import exit_on_bad_args, load_yaml, without_flags

if __name__ == "__main__":  # bad training flags or files are answered before torch loads
    exit_on_bad_args(without_flags(sys.argv[1:], ("--nproc_per_node", "--nnodes", "--gpu_memory_gb", "--json")))

import torch
import torch.distributed as tdist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.testing._internal.distributed.fake_pg import FakeStore
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from fasthint import dist, ops
from fasthint_kernels import chunked
from fasthint.algorithms import REGISTRY
from fasthint.batch import Sample, make_micro_batches
from fasthint.config import TrainConfig, parse_args
from fasthint.errors import ConfigError, FastHintError, ModelError
from fasthint.loss import PolicyLoss, clip_terms, micro_batch_logprobs, token_capped_chunks
from fasthint.models import enable_gradient_checkpointing, resolve_attn_implementation, trainer_attention
from fasthint.update import micro_batch_loss

GB = 1e9
MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "models")
ASSUMPTIONS = {
    "cuda_context_gb": (2.0, "per process: CUDA context (~0.5), NCCL communicators and buffers, cuBLAS workspaces; "
                             "not measured here"),
    "allocator_margin": (0.05, "fraction of the trainer's tensor peak kept for the caching allocator's "
                               "fragmentation"),
    "vllm_asleep_gb": (2.0, "what vLLM keeps after sleep(level=1): its CUDA graphs and non-torch memory "
                            "(weights go to CPU, the KV cache is dropped); not measured here"),
}
KINDS = {"params": ("Sharded Param",), "grads": ("Sharded Grad", "Unsharded Grad"), "optimizer": ("OptState",),
         "gathered": ("Unsharded Param", "All Gather"), "red.-scat.": ("Reduce Scatter",),
         "act+temp": ("Activation", "Temp", "Inputs", "Buffer")}


class _Propagation:
    """DTensor's sharding propagation runs each op on global-shape fake tensors in the active fake
    mode, which is ours here: the tracker would count them (a clip or AdamW step then "allocates"
    the whole unsharded model). They are shape arithmetic, not memory: skipped while it runs."""

    depth = 0

    @classmethod
    @contextlib.contextmanager
    def marked(cls):
        real = ShardingPropagator._propagate_tensor_meta_non_cached

        def wrapped(self, op_schema):
            cls.depth += 1
            try:
                return real(self, op_schema)
            finally:
                cls.depth -= 1
        ShardingPropagator._propagate_tensor_meta_non_cached = wrapped
        try:
            yield
        finally:
            ShardingPropagator._propagate_tensor_meta_non_cached = real


PACKED_ATTENTION = "fasthint_rehearsal_packed"


def _packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """A packed forward's attention as flash-attn's varlen kernel holds it: one causal SDPA over the
    row ([1, T, H, d] out, an fp32 [1, H, T] log-sum-exp, no [T, T] mask). Under fake tensors only shapes
    and bytes matter; the per-sequence boundaries (``cu_seq_lens_*``) would need the data."""
    for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(k, None)
    return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                  is_causal=True, **kwargs)


AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, lambda *args, **kwargs: None)


HEADS = ("triton", "torch")


@contextlib.contextmanager
def _gpu_head(head: str):
    """The head as a GPU runs it. There ``impl="auto"`` picks the Triton kernels or the chunked torch path
    by a one-time probe (``fasthint.autoselect``), so every phase is rehearsed with each (``head``) and
    the larger counts: Triton through its custom ops' fake kernels, which allocate its workspaces (the
    dz buffer, the fp32 dH accumulator); torch with the CUDA chunk (a ``[chunk, V]`` fp32 buffer of
    2^28 logits), not the CPU one."""
    resolve, elems = ops._resolve_head_impl, chunked.DEFAULT_CHUNK_ELEMS
    ops._resolve_head_impl = lambda impl, *args, **kwargs: head if impl == "auto" else impl
    chunked.DEFAULT_CHUNK_ELEMS = chunked.CUDA_CHUNK_ELEMS
    try:
        yield
    finally:
        ops._resolve_head_impl, chunked.DEFAULT_CHUNK_ELEMS = resolve, elems


class _Tracker(FSDPMemTracker):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _Propagation.depth:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def label_unsharded(self, policy: torch.nn.Module) -> None:
        """Counts the whole parameters of ``dist.gathered`` (unsharded outside FSDP's forward hooks,
        which is where the tracker labels) as gathered parameters, not activations."""
        for m in policy.modules():
            group = m._get_fsdp_state()._fsdp_param_group if isinstance(m, FSDPModule) else None
            for fp in group.fsdp_params if group is not None else ():
                self._update_and_maybe_create_winfos(fp.unsharded_param, _FSDPRefType.UNSHARDED_PARAM)


@dataclass
class Phase:
    """One phase of a step on one rank: the trainer's peak tensor bytes by kind, what vLLM reserves."""

    name: str
    rank: int
    kinds: dict
    vllm: float
    note: str = ""
    head: str = ""  # the head path of the larger of HEADS ("either": the same bytes)

    @property
    def trainer(self) -> float:
        return sum(self.kinds.values())

    @property
    def overhead(self) -> float:
        return ASSUMPTIONS["cuda_context_gb"][0] * GB + ASSUMPTIONS["allocator_margin"][0] * self.trainer

    @property
    def total(self) -> float:
        return self.trainer + self.vllm + self.overhead


@dataclass
class Plan:
    """The shapes of one step on one rank, all rollouts at their longest."""

    samples: int            # completions on this rank per rollout batch
    per_step: int           # ... per optimizer step (mini-batch)
    seq_len: int
    micro_batches: int      # per optimizer step
    largest: object         # the largest update micro-batch (batch.MicroBatch)
    chunks: int             # no-grad forwards of the old-log-prob recompute (all samples)
    largest_chunk: object
    after_backward: dict = field(default_factory=dict)  # bytes by kind when the update's backward is done
    after_step: dict = field(default_factory=dict)  # ... and after its optimizer step


def model_config(model: str, config_file: Optional[str]):
    """The model's config without weights: a checkpoint directory, ``toy``, or a hub id resolved to
    ``recipes/models/<name>.json`` (beside the recipe first)."""
    if model == "toy":
        model = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "warmstart")
    if os.path.isdir(model):
        return AutoConfig.from_pretrained(model)
    name = model.rstrip("/").split("/")[-1] + ".json"
    dirs = ([os.path.join(os.path.dirname(os.path.abspath(config_file)), "models")] if config_file else []) + \
        [MODELS_DIR]
    for d in dirs:
        path = os.path.join(d, name)
        if os.path.isfile(path):
            with open(path) as f:
                raw = json.load(f)
            return AutoConfig.for_model(raw.pop("model_type"), **raw)
    raise ModelError(f"no shapes for model {model!r}: put its config.json at {os.path.join(MODELS_DIR, name)} "
                     "(copied from the hub) or pass --model a checkpoint directory")


def plan(cfg: TrainConfig, world: int, rank: int, pad: int) -> Plan:
    """This rank's prompts (``rows[rank::world]``), completions and micro-batches, through the trainer's
    own batching (``batch.make_micro_batches``, ``loss.token_capped_chunks``)."""
    prompts = len(range(rank, cfg.prompts_per_step, world))
    samples = prompts * cfg.num_generations
    per_step = math.ceil(prompts / cfg.steps_per_generation) * cfg.num_generations
    prompt, new = [pad] * cfg.max_prompt_length, [pad] * cfg.max_new_tokens
    one = [Sample(prompt, new, [0.0] * cfg.max_new_tokens, 1.0, truncated=True) for _ in range(max(per_step, 1))]
    mbs = make_micro_batches(one, cfg.micro_batch_size, pad, max_tokens=cfg.micro_batch_tokens,
                             packed=cfg.padding_free)
    chunks = token_capped_chunks(one, cfg.micro_batch_size, cfg.micro_batch_tokens, cfg.padding_free)
    largest_chunk = make_micro_batches(chunks[0], len(chunks[0]), pad, packed=cfg.padding_free)[0]
    n_chunks = len(chunks) * math.ceil(samples / max(per_step, 1))
    return Plan(samples, per_step, cfg.max_prompt_length + cfg.max_new_tokens, len(mbs),
                max(mbs, key=lambda m: m.input_ids.numel()), n_chunks, largest_chunk)


def _by_kind(tracker: FSDPMemTracker, which: str = "peak") -> dict:
    snap = next(iter(tracker.get_tracker_snapshot(which).values()), {})
    named = {str(getattr(k, "value", k)): v for k, v in snap.items()}
    return {kind: float(sum(named.get(n, 0) for n in names)) for kind, names in KINDS.items()}


@contextlib.contextmanager
def _tracked(policy, optimizer, out: dict, whole=None):
    """Tracks one phase; its peak bytes by kind land in ``out``. ``whole``: a module held whole on
    every rank outside FSDP through the phase (the frozen reference under ``--beta``): its bytes are
    added to the gathered weights (they are there before the phase starts: the tracker sees no
    allocation of them)."""
    tracker = _Tracker(policy, optimizer)
    with tracker:
        yield tracker
    out.update(_by_kind(tracker))
    if whole is not None:
        out["gathered"] += float(sum(t.untyped_storage().nbytes() for t in
                                     {id(t): t for t in [*whole.parameters(), *whole.buffers()]}.values()))


def _build(model_cfg, cfg: TrainConfig, mode: FakeTensorMode):
    """The policy as the trainer builds it under torchrun (``models.load_trainable_policy`` with
    ``meta=True``, then ``dist.shard``), materialised with fake storage; AdamW with its states created
    (a step with zero gradients), so that every phase sees the states a second step sees."""
    attn = PACKED_ATTENTION if cfg.padding_free else \
        trainer_attention(resolve_attn_implementation(cfg.attn_implementation, torch.device("cpu"), model_cfg), False)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(model_cfg, dtype=torch.float32, attn_implementation=attn)
        ref = AutoModelForCausalLM.from_config(model_cfg, dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                                               attn_implementation=attn) if cfg.beta > 0 else None
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    policy = PolicyLoss(lm)
    dist.shard(policy, lazy_init=False, bf16=cfg.bf16)
    with mode:
        policy.to_empty(device="cpu")
        policy._get_fsdp_state()._lazy_init()
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate)
        for p in policy.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ref is not None:  # build.build: the frozen reference, whole on every rank
            ref.to_empty(device="cpu").requires_grad_(False).eval()
            ref.tie_weights()  # to_empty unties a tied head
    return policy, optimizer, ref


def _vllm(cfg: TrainConfig, state: str, gpu_gb: float, weight_bytes: float) -> float:
    """What the in-process vLLM engine holds: ``awake`` = ``gpu_memory_utilization`` x card (what it
    reserves, whatever it uses); ``asleep`` = what sleep level 1 keeps; ``weights`` = asleep plus its
    bf16 weights (``VLLMEngine.update_weights`` wakes the weights first, the KV cache after loading)."""
    if cfg.engine != "vllm":
        return 0.0
    asleep = ASSUMPTIONS["vllm_asleep_gb"][0] * GB
    if state == "awake" or not cfg.vllm_sleep_mode:
        return cfg.vllm_gpu_memory_utilization * gpu_gb * GB
    return asleep + (weight_bytes if state == "weights" else 0.0)


def rehearse_rank(cfg: TrainConfig, model_cfg, world: int, rank: int, gpu_gb: float) -> tuple[list[Phase], Plan]:
    """Every phase of one step on ``rank`` of a fake ``world``: the trainer's peak bytes and vLLM's."""
    tdist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        built = _build(model_cfg, cfg, mode)
        pl = plan(cfg, world, rank, model_cfg.pad_token_id or 0)
        runs = []
        for head in HEADS:
            with mode, _Propagation.marked(), _gpu_head(head):
                runs.append(_phases(cfg, built, pl, gpu_gb, head))
        return [_larger(same) for same in zip(*runs)], pl
    finally:
        tdist.destroy_process_group()


def _larger(same: tuple) -> Phase:
    """One phase rehearsed with each head: the one that needs more (head "either" when they tie)."""
    top = max(same, key=lambda p: p.total)
    if all(p.total == top.total for p in same):
        top.head = "either"
    return top


def _phases(cfg: TrainConfig, built: tuple, pl: Plan, gpu_gb: float, head: str) -> list[Phase]:
    policy, optimizer, ref = built
    lm = policy.lm
    world, rank = dist.world_size(), dist.rank()
    n_params = sum(p.numel() for p in lm.parameters())
    weights = n_params * 2.0  # vLLM's bf16 copy (TP 1)
    algo = REGISTRY[cfg.algo]
    engine_runs_policy = cfg.engine == "hf" or cfg.vllm_importance_sampling_correction
    phases: list[Phase] = []

    def phase(name: str, vllm_state: str, note: str = ""):
        kinds: dict = {}
        phases.append(Phase(name, rank, kinds, _vllm(cfg, vllm_state, gpu_gb, weights), note, head))
        return _tracked(policy, optimizer, kinds, ref)

    @contextlib.contextmanager
    def gathered(tracker, enabled: bool = True):
        with dist.gathered(policy, enabled=enabled):
            if enabled:
                tracker.label_unsharded(policy)
            yield

    def forward(tracker, mb) -> None:  # a no-grad forward of the gathered policy (loss.recompute_logprobs' body)
        with gathered(tracker):
            micro_batch_logprobs(lm, mb, cfg.temperature, False)

    with phase("rollout", "awake", "the policy gathered: the engine runs it" if engine_runs_policy else
               "vLLM samples from its own weights") as tr:
        with gathered(tr, enabled=engine_runs_policy):
            if cfg.vllm_importance_sampling_correction:  # ISCorrectedEngine rescores every rollout
                micro_batch_logprobs(lm, pl.largest_chunk, cfg.temperature, False)
    if cfg.engine == "vllm" and not algo.samples_run_policy:  # engines.sync_check after the first sync
        with phase("sync check", "asleep", "the trainer scores some engine rollouts (bounded by the largest "
                   "recompute chunk)") as tr:
            forward(tr, pl.largest_chunk)
    if algo.samples_run_policy:
        with phase("algorithm forwards", "asleep", f"{cfg.algo} rescores completions (vLLM asleep in sleep mode)") \
                as tr:
            forward(tr, pl.largest_chunk)
    if cfg.steps_per_generation * cfg.num_iterations > 1:
        with phase("old log-probs", "asleep", f"{pl.chunks} no-grad forwards, the largest rehearsed") as tr:
            forward(tr, pl.largest_chunk)
    terms = clip_terms(cfg.eps_low, cfg.eps_high, cfg.dual_clip, cfg.beta, entropy_coef=cfg.entropy_coef)
    with phase("update", "asleep", f"{pl.micro_batches} micro-batches per optimizer step, the largest rehearsed") as tr:
        mb = pl.largest
        # the aggregation's normaliser changes no memory; seq-mean-token-mean reads it from the data
        loss, _ = micro_batch_loss(policy, mb, cfg, terms, float(mb.targets.numel()), float(mb.num_seqs), ref,
                                   False, loss_agg="token-mean", impl=head)
        (loss * world).backward()
        pl.after_backward = _by_kind(tr, "current")
        torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.grad is not None], 1.0)
        optimizer.step()
        pl.after_step = _by_kind(tr, "current")  # AdamW's temporaries gone (its peak counts them)
        optimizer.zero_grad(set_to_none=True)
    with phase("weight sync", "weights", "dist.full_parameters streams one layer at a time to vLLM"):
        dtype = torch.bfloat16 if cfg.bf16 else None
        for _name, t in dist.full_parameters(lm, dtype):
            del t
    with phase("checkpoint", "awake", "full state dict: each parameter gathered whole, then copied to CPU"):
        for p in policy.parameters():
            t = p.full_tensor()
            del t
    return phases


def hand_count(model_cfg, world: int) -> dict:
    """Sharded fp32 state per rank by hand: 4 B (parameter), 4 B (gradient), 8 B (AdamW) per parameter / world."""
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(model_cfg).parameters())
    return {"parameters": n, "params": 4.0 * n / world, "grads": 4.0 * n / world, "optimizer": 8.0 * n / world}


def report(phases: list[Phase], gpu_gb: float) -> tuple[str, Optional[Phase]]:
    """The table (GB = 1e9 bytes) and the phase at the peak."""
    cols = list(KINDS) + ["trainer", "vLLM", "overhead", "total"]
    lines = [f"{'phase':<20}{'rank':>5}{'head':>7}" + "".join(f"{c:>11}" for c in cols)]
    for ph in phases:
        vals = [ph.kinds.get(k, 0.0) for k in KINDS] + [ph.trainer, ph.vllm, ph.overhead, ph.total]
        lines.append(f"{ph.name:<20}{ph.rank:>5}{ph.head:>7}" + "".join(f"{v / GB:>11.2f}" for v in vals))
    peak = max(phases, key=lambda p: p.total) if phases else None
    return "\n".join(lines), peak


def run(cfg: TrainConfig, world: int, gpu_gb: float) -> dict:
    """Rehearses rank 0 and rank 1 (one rank in a world of one); the numbers behind the table."""
    model_cfg = model_config(cfg.model, getattr(cfg, "_config_file", None))
    t0 = time.perf_counter()
    phases, plans = [], {}
    for rank in ([0, 1] if world > 1 else [0]):
        ph, pl = rehearse_rank(cfg, model_cfg, world, rank, gpu_gb)
        phases += ph
        plans[rank] = pl
    table, peak = report(phases, gpu_gb)
    hand = hand_count(model_cfg, world)
    pl = plans[0]
    got = {"params": pl.after_step["params"], "grads": pl.after_backward["grads"],
           "optimizer": pl.after_step["optimizer"]}
    return {"world": world, "gpu_memory_gb": gpu_gb, "model": cfg.model, "algo": cfg.algo,
            "table": table, "seconds": time.perf_counter() - t0,
            "phases": [{"phase": p.name, "rank": p.rank, "head": p.head, "note": p.note,
                        **{k: v / GB for k, v in p.kinds.items()}, "trainer": p.trainer / GB,
                        "vllm": p.vllm / GB, "overhead": p.overhead / GB, "total": p.total / GB} for p in phases],
            "peak": {"phase": peak.name, "rank": peak.rank, "gb": peak.total / GB},
            "fits": peak.total <= gpu_gb * GB, "spare": 1 - peak.total / (gpu_gb * GB),
            "hand_count": {k: v / GB if k != "parameters" else v for k, v in hand.items()},
            "sharded_state_gb": {k: v / GB for k, v in got.items()},
            "plan": {"completions_per_rank": pl.samples, "per_optimizer_step": pl.per_step, "seq_len": pl.seq_len,
                     "micro_batches_per_step": pl.micro_batches,
                     "largest_micro_batch_tokens": int(pl.largest.input_ids.numel()),
                     "recompute_forwards": pl.chunks,
                     "largest_recompute_tokens": int(pl.largest_chunk.input_ids.numel())},
            "assumptions": {k: {"value": v, "why": why} for k, (v, why) in ASSUMPTIONS.items()}}


def _cluster_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--nproc_per_node", type=int, default=8)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--gpu_memory_gb", type=float, default=80.0)
    p.add_argument("--json", default=None)
    def error(message: str):
        raise ConfigError(f"{message}: --nproc_per_node/--nnodes take whole numbers, --gpu_memory_gb a number "
                          "(e.g. 80), --json a file path")
    p.error = error  # type: ignore[method-assign]
    ns, rest = p.parse_known_args(argv)
    if ns.nproc_per_node < 1 or ns.nnodes < 1 or ns.gpu_memory_gb <= 0:
        raise ConfigError("--nproc_per_node and --nnodes must be >= 1 and --gpu_memory_gb > 0 "
                          "(e.g. --nproc_per_node 8 --gpu_memory_gb 80)")
    return ns, rest


def main(argv: Optional[list[str]] = None) -> int:
    """CLI: prints the table and the verdict; 0 fits, 3 does not fit, 2 bad input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        ns, rest = _cluster_args(argv)
        config_file = rest[rest.index("--config") + 1] if "--config" in rest[:-1] else None
        if not any(a == "--bf16" or a.startswith("--bf16=") for a in rest) and \
                "bf16" not in (load_yaml(config_file) if config_file else {}):
            rest = rest + ["--bf16", "true"]  # a GPU's default (on this CPU ModelConfig.check would pick fp32)
        cfg = parse_args(rest)
        cfg.validate()
        cfg._config_file = config_file
        out = run(cfg, ns.nproc_per_node * ns.nnodes, ns.gpu_memory_gb)
    except FastHintError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"rehearsal of {out['algo']} on {out['model']}, world {out['world']}, {ns.gpu_memory_gb:g} GB per GPU "
          f"(GB = 1e9 bytes; bytes counted on a CPU mesh; {out['seconds']:.0f} s)")
    pl = out["plan"]
    print(f"per rank: {pl['completions_per_rank']} completions of up to {pl['seq_len']} tokens, "
          f"{pl['micro_batches_per_step']} micro-batches per optimizer step "
          f"(largest {pl['largest_micro_batch_tokens']} tokens), {pl['recompute_forwards']} recompute forwards "
          f"(largest {pl['largest_recompute_tokens']} tokens)")
    print(out["table"])
    hc, got = out["hand_count"], out["sharded_state_gb"]
    print("sharded fp32 state per rank, rehearsed vs hand count (4/4/8 B per parameter / world): " + ", ".join(
        f"{k} {got[k]:.2f} vs {hc[k]:.2f} GB" for k in ("params", "grads", "optimizer")))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(out, f, indent=1)
    pk = out["peak"]
    if out["fits"]:
        print(f"fits: peak {pk['gb']:.1f} GB of {ns.gpu_memory_gb:g} ({pk['phase']}, rank {pk['rank']}; "
              f"{100 * out['spare']:.0f}% to spare)")
        return 0
    print(f"does not fit: {pk['phase']} (rank {pk['rank']}) needs {pk['gb']:.1f} GB of {ns.gpu_memory_gb:g}")
    return 3


if __name__ == "__main__":
    sys.exit(main())
