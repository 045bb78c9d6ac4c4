"""The real training path on one device, and its peak memory against the rehearsal's prediction.

    python scripts/gpu_smoke.py                 # CUDA: a random Qwen2.5-0.5B-shaped model, bf16, 3 steps
    python scripts/gpu_smoke.py --tiny          # any machine: the toy's shape (CI runs this on CPU)

It writes a random-initialised model of ``recipes/models/Qwen2.5-0.5B-Instruct.json``'s shape (with
the toy's tokenizer: no download), trains it for three steps with the HF engine, ``--padding_free``,
``--bf16``, gradient checkpointing, ``--steps_per_generation 2`` and the head's ``auto`` kernels (the
Triton head on CUDA), then rehearses the same configuration (``fasthint.rehearse``, world 1, on CPU)
and prints torch's peak allocated bytes over the rehearsal's largest trainer peak, as a ratio. The
one-process run autocasts fp32 weights where the rehearsal's FSDP holds bf16 gathers: expect the
ratio near, not at, 1. The row goes to ``bench/results/gpu_smoke.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import fasthint  # noqa: E402
from fasthint import rehearse  # noqa: E402
from fasthint.toy.model import build_tokenizer  # noqa: E402


def write_model(path: str, tiny: bool) -> None:
    tok = build_tokenizer()
    if tiny:
        cfg = AutoConfig.from_pretrained(os.path.join(ROOT, "fasthint", "toy", "warmstart"))
    else:
        with open(os.path.join(ROOT, "recipes", "models", "Qwen2.5-0.5B-Instruct.json")) as f:
            raw = json.load(f)
        cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = tok.pad_token_id, tok.eos_token_id, None
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)


def id_parity(completions, completion_ids, **columns) -> list[float]:
    """A reward a random model earns half the time (its tokens mostly decode to nothing): groups
    with mixed rewards, so every step trains."""
    return [float(sum(ids) % 2) for ids in completion_ids]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the toy's shape (CPU smoke test)")
    ap.add_argument("--gpu_memory_gb", type=float, default=80.0)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        write_model(model, args.tiny)
        kw = dict(model=model, data="toy", eval_data="", max_steps=3, prompts_per_step=8, num_generations=4,
                  max_new_tokens=32 if args.tiny else 256, max_prompt_length=128, steps_per_generation=2,
                  padding_free=True, bf16=cuda, gradient_checkpointing=True, micro_batch_tokens=2048,
                  output_dir=os.path.join(tmp, "out"), cache_dir=os.path.join(tmp, "cache"), progress_bar=False,
                  save_steps=0, learning_rate=1e-5)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        res = fasthint.train(fasthint.TrainConfig(**kw), reward_funcs=[id_parity])
        peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
        last = res["last"]
        rcfg = fasthint.TrainConfig(**{**kw, "bf16": True}).validate()
        pred = rehearse.run(rcfg, 1, args.gpu_memory_gb)
    trainer = max(p["trainer"] for p in pred["phases"])
    ratio = peak / trainer if cuda else float("nan")
    print(f"3 steps: loss {last['loss']:.4g}, grad_norm {last['grad_norm']:.4g}, "
          f"{last['num_tokens/trained']} tokens trained in the last step")
    print(f"peak allocated {peak:.2f} GB; rehearsal's trainer peak {trainer:.2f} GB; ratio {ratio:.2f}")
    if not cuda:  # a CPU run checks the path only: no peak to record
        return 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    path = os.path.join(ROOT, "bench", "results", "gpu_smoke.md")
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write("| date | device | torch | commit | shape | peak allocated GB | rehearsed GB | ratio |\n"
                    "|---|---|---|---|---|---:|---:|---:|\n")
        f.write(f"| {datetime.date.today()} | {torch.cuda.get_device_name()} | {torch.__version__} | "
                f"{commit.stdout.strip() or '?'} | {'toy' if args.tiny else 'Qwen2.5-0.5B'} | {peak:.2f} | "
                f"{trainer:.2f} | {ratio:.2f} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
