"""Benchmark: fasthint versus TRL's GRPOTrainer, GRPO steps on the toy, same work per step.

    pip install -c constraints.txt -e '.[bench]'     # brings trl (pinned there)
    python bench/trl_compare.py                       # 5 steps of 64 prompts x 8, 64 new tokens
    python bench/trl_compare.py --steps 3 --prompts 16

Both frameworks train the same warm-started toy checkpoint (HF generate on CPU, or on the GPU when
there is one) on the same prompts with the same group size, completion length, temperature 1,
learning rate, clipping (0.2/0.28), token-mean loss without KL, 64 completions per micro-batch, one
optimizer step per generation, and the same reward code (fasthint's math verifier). Each framework
runs in its own process; its wall time per step is the mean over steps 2..N (step 1 is a warm-up)
and its peak memory the process's peak RSS (CPU) or peak allocated CUDA memory. Prints a table and
appends rows to bench/results/trl_compare.csv with the device, versions and commit.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

from _results import append_rows, versions

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "trl_compare.csv")
FIELDS = ["time", "commit", "device", "torch", "trl", "framework", "steps", "prompts", "group", "max_new_tokens",
          "step_s", "peak_mib", "completion_len"]
LR = 5e-5


def _peak_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _toy(cache: str) -> tuple[str, str]:
    from fasthint.models import resolve_model_path
    from fasthint.toy.task import ensure_toy_data

    train, _ = ensure_toy_data(cache, 0, 4000)
    return resolve_model_path("toy", cache, 0, 1000), train


def run_fasthint(a) -> dict:
    from fasthint import TrainConfig, fit

    out = tempfile.mkdtemp(prefix="fh-bench-")
    cfg = TrainConfig(max_steps=a.steps, prompts_per_step=a.prompts, num_generations=a.group,
                      max_new_tokens=a.max_new_tokens, micro_batch_size=64, eval_data="", save_steps=0,
                      progress_bar=False, output_dir=out, cache_dir=a.cache, learning_rate=LR)
    fit(cfg)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {"step_times": [r["time/step_s"] for r in rows], "completion_len": rows[-1]["completion_len/mean"]}


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from fasthint.data import load_dataset
    from fasthint.rewards import RewardScorer

    model_path, train = _toy(a.cache)
    rows = load_dataset(train)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]}
                            for r in rows])
    scorer = RewardScorer()

    def reward(completions, answer, **_):
        return scorer.score([c[0]["content"] for c in completions], list(answer))

    timer = SimpleNamespace(times=[], lens=[], t0=None)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            timer.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            timer.times.append(time.perf_counter() - timer.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                timer.lens.append(logs["completions/mean_length"])

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), max_steps=a.steps, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0,
        max_grad_norm=1.0, per_device_train_batch_size=64, gradient_accumulation_steps=a.prompts * a.group // 64,
        num_generations=a.group, max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0,
        beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", scale_rewards="group", num_iterations=1,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(), seed=0, dataloader_num_workers=0, disable_dropout=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_path)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Timer()])
    trainer.train()
    scorer.close()
    return {"step_times": timer.times, "completion_len": timer.lens[-1] if timer.lens else float("nan")}


def _worker(a) -> None:
    res = (run_fasthint if a.worker == "fasthint" else run_trl)(a)
    res["peak_mib"] = _peak_mib()
    with open(a.json, "w") as fh:
        json.dump(res, fh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/fasthint"))
    ap.add_argument("--frameworks", default="fasthint,trl")
    ap.add_argument("--worker", choices=["fasthint", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return _worker(a)
    if a.prompts * a.group % 64:
        raise SystemExit("--prompts x --group must be a multiple of 64 (the micro-batch size)")
    import torch
    import trl

    _toy(a.cache)  # build the caches once, outside the timed runs
    ver = versions()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    rows = []
    for fw in a.frameworks.split(","):
        out = tempfile.mktemp(suffix=".json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", fw, "--json", out, "--steps", str(a.steps),
               "--prompts", str(a.prompts), "--group", str(a.group), "--max_new_tokens", str(a.max_new_tokens),
               "--cache", a.cache]
        res = subprocess.run(cmd, cwd=os.path.dirname(HERE), capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{fw} failed:\n{res.stderr[-3000:]}")
        r = json.load(open(out))
        times = r["step_times"][1:] or r["step_times"]
        rows.append({"time": datetime.datetime.now().isoformat(timespec="seconds"), "commit": ver["commit"],
                     "device": device, "torch": ver["torch"], "trl": trl.__version__, "framework": fw,
                     "steps": len(r["step_times"]), "prompts": a.prompts, "group": a.group,
                     "max_new_tokens": a.max_new_tokens, "step_s": sum(times) / len(times),
                     "peak_mib": r["peak_mib"], "completion_len": r["completion_len"]})
    base = next((r for r in rows if r["framework"] == "fasthint"), None)
    print(f"\n{device}, {a.prompts} prompts x {a.group}, {a.max_new_tokens} new tokens, mean of steps 2..{a.steps}")
    print(f"{'framework':<10} {'s/step':>8} {'x fasthint':>10} {'peak MiB':>9} {'completion len':>15}")
    for r in rows:
        ratio = r["step_s"] / base["step_s"] if base else float("nan")
        print(f"{r['framework']:<10} {r['step_s']:>8.2f} {ratio:>10.2f} {r['peak_mib']:>9.0f} "
              f"{r['completion_len']:>15.1f}")
    append_rows(RESULTS, FIELDS, rows)


if __name__ == "__main__":
    main()
