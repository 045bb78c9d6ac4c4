"""Benchmark: peak memory and time of one policy update of a real-sized model, per trainer option.

    python bench/memory.py                       # CPU: ~100M-parameter Qwen2, 16 rollouts of 64-512 tokens
    python bench/memory.py --preset qwen2-1.5b --seqs 64 --min_len 256 --max_len 2048   # one GPU

The model is a randomly initialised Qwen2 built from a config (no download) with the real
vocabulary (151,936): ``--preset 100m`` (hidden 512, 8 layers, tied embeddings: 102M parameters)
or ``qwen2-1.5b`` (Qwen2.5-1.5B's shape: 1.54B). The rollout batch is ``--seqs`` sequences of a
64-token prompt plus a completion of uniformly spread length in ``[--min_len, --max_len]``
(1:8 by default) with random advantages; each update is ``fasthint.update.train_step`` (fused
log-prob head, token-mean GRPO loss, AdamW) with micro-batches cut at ``--micro_batch_tokens``.

Configurations (``--configs``): ``baseline`` (fp32, padded), ``+gc`` (gradient checkpointing),
``+packed`` (padding-free), ``+bf16`` (autocast in one process), ``all``. Each runs in a fresh
subprocess: one warm-up update (allocates the AdamW states), then ``--repeat`` timed updates.
"peak MiB" is the memory high-water mark of the timed updates above what the process held before
them (weights, AdamW states, no gradients): activations, gradients, workspaces and AdamW's step;
"act MiB" the high-water mark of the forward/backward passes (before the optimiser step) less the
fp32 gradients: the activations and workspaces that the options change. CUDA:
``max_memory_allocated``; CPU: peak RSS (``VmHWM`` reset through ``/proc/self/clear_refs``, with
malloc's mmap threshold fixed so freed tensors return to the OS). "MFU" counts the model FLOPs of
the update (6 x non-embedding parameters x tokens, plus the head 6 x V x D per completion token and
causal attention 6 x layers x D x sum L^2; gradient checkpointing's recompute not counted) against
``--peak_tflops`` (CUDA default: 989, an H100/H200's dense bf16). Prints a table and appends rows
to bench/results/memory.csv with device, versions and commit.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

from _results import append_rows, versions

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "memory.csv")
FIELDS = ["time", "commit", "device", "torch", "triton", "preset", "params_m", "config", "seqs", "min_len", "max_len",
          "micro_batch_tokens", "step_s", "tokens_per_s", "peak_mib", "act_mib", "padding_frac", "mfu", "loss", "note"]
PRESETS = {  # hidden, intermediate, layers, heads, kv heads, tied embeddings
    "100m": (512, 1536, 8, 8, 2, True),
    "qwen2-1.5b": (1536, 8960, 28, 12, 2, True),
}
CONFIGS = {  # gradient checkpointing, padding-free, bf16
    "baseline": (False, False, False), "+gc": (True, False, False), "+packed": (False, True, False),
    "+bf16": (False, False, True), "all": (True, True, True),
}
VOCAB, PROMPT = 151936, 64


def _mem_mib(cuda: bool, peak: bool) -> float:
    import torch

    if cuda:
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**20
    key = "VmHWM:" if peak else "VmRSS:"
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key)) / 1024


def _reset_peak(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")


def _samples(args):
    import torch

    from fasthint.batch import Sample

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(args.seqs):
        n = int(torch.randint(args.min_len, args.max_len + 1, (), generator=g))
        out.append(Sample(torch.randint(0, VOCAB, (PROMPT,), generator=g).tolist(),
                          torch.randint(0, VOCAB, (n,), generator=g).tolist(),
                          (-3.0 - torch.rand(n, generator=g)).tolist(), float(torch.randn((), generator=g)),
                          group=i // 8))
    return out


def _flops(n_body: int, args, samples) -> float:
    d, _, layers = PRESETS[args.preset][:3]
    tokens = sum(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    completion = sum(len(s.completion_ids) for s in samples)
    attn = 6 * layers * d * sum((len(s.prompt_ids) + len(s.completion_ids)) ** 2 for s in samples)
    return 6 * n_body * tokens + 6 * VOCAB * d * completion + attn


def run_one(args) -> dict:
    """One configuration in this process: warm-up update, then timed ones; a result row."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from fasthint.config import TrainConfig
    from fasthint.loss import PolicyLoss
    from fasthint.models import enable_gradient_checkpointing, resolve_attn_implementation, trainer_attention
    import fasthint.update as update
    from fasthint.update import OptimConfig, train_step

    gc_on, packed, bf16 = CONFIGS[args.one]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    d, ffn, layers, heads, kv, tied = PRESETS[args.preset]
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                         max_position_embeddings=PROMPT + args.max_len + 8, pad_token_id=0)
    attn = trainer_attention(resolve_attn_implementation("auto", device, config), packed)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    if gc_on:
        enable_gradient_checkpointing(model)
    policy = PolicyLoss(model).train()
    cfg = TrainConfig(micro_batch_size=args.seqs, micro_batch_tokens=args.micro_batch_tokens, padding_free=packed,
                      bf16=bf16, learning_rate=1e-6, max_grad_norm=1.0).validate()
    opt, sched = OptimConfig.build(cfg, policy.parameters())
    samples = _samples(args)
    train_step(policy, samples, cfg, opt, sched)  # warm-up: AdamW states, allocator, kernels
    opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    base = _mem_mib(cuda, peak=False)
    _reset_peak(cuda)
    fwd_bwd = []  # the high-water mark when the backward passes are done, before the optimiser step
    step_fn = update._clip_and_step

    def spy(*a, **k):
        if cuda:
            torch.cuda.synchronize()
        fwd_bwd.append(_mem_mib(cuda, peak=True) - base)
        return step_fn(*a, **k)

    update._clip_and_step = spy
    times, stats = [], {}
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        stats = train_step(policy, samples, cfg, opt, sched)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = _mem_mib(cuda, peak=True) - base
    grads_mib = sum(p.numel() * 4 for p in model.parameters()) / 2**20  # fp32 gradients, live at the peak
    step = statistics.median(times)
    n_all = sum(p.numel() for p in model.parameters())
    n_body = n_all - model.get_input_embeddings().weight.numel() - (0 if tied else model.lm_head.weight.numel())
    real = sum(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    peak_tflops = args.peak_tflops or (989.0 if cuda else 0.0)
    mfu = _flops(n_body, args, samples) / step / (peak_tflops * 1e12) if peak_tflops else float("nan")
    return {"device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
            "preset": args.preset, "params_m": round(n_all / 1e6, 1), "config": args.one, "seqs": args.seqs,
            "min_len": args.min_len, "max_len": args.max_len, "micro_batch_tokens": args.micro_batch_tokens,
            "step_s": round(step, 3), "tokens_per_s": round(real / step, 1), "peak_mib": round(peak, 1),
            "act_mib": round(max(fwd_bwd) - grads_mib, 1),
            "padding_frac": round(stats["num_tokens/padding_frac"], 3), "mfu": round(mfu, 4) if mfu == mfu else "",
            "loss": round(stats["loss"], 6), "note": f"attn={attn}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="100m")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {list(CONFIGS)}")
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--min_len", type=int, default=64)
    p.add_argument("--max_len", type=int, default=512)
    p.add_argument("--micro_batch_tokens", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--peak_tflops", type=float, default=0.0, help="for MFU; 0 = 989 on CUDA, none on CPU")
    p.add_argument("--no_save", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "kernels"),
                                          os.environ.get("PYTHONPATH", "")])}
    rows = []
    for name in args.configs.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--preset", args.preset] + \
            [f"--{k}={getattr(args, k)}" for k in ("seqs", "min_len", "max_len", "micro_batch_tokens", "repeat",
                                                  "peak_tflops")]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[7:]))
        r = rows[-1]
        print(f"{name:9s} step {r['step_s']:8.2f} s  {r['tokens_per_s']:9.1f} tok/s  peak {r['peak_mib']:9.1f} MiB  "
              f"act {r['act_mib']:9.1f} MiB  "
              f"padding {r['padding_frac']:.3f}  mfu {r['mfu']}", flush=True)
    if rows and "baseline" in [r["config"] for r in rows]:
        b = next(r for r in rows if r["config"] == "baseline")
        print("\nrelative to baseline:  " + "  ".join(
            f"{r['config']}: time x{r['step_s'] / b['step_s']:.2f}, act x{r['act_mib'] / b['act_mib']:.2f}"
            for r in rows if r is not b))
    if rows and not args.no_save:
        stamp = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **versions()}
        append_rows(RESULTS, FIELDS, [{**stamp, **{k: r.get(k, "") for k in FIELDS if k not in stamp}}
                                      for r in rows])
        print(f"appended {len(rows)} rows to {os.path.relpath(RESULTS)}")
    return 0 if len(rows) == len(args.configs.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
