"""Evaluation without hints: accuracy during training, and ``python -m fasthint.eval`` for benchmarks.

``python -m fasthint.eval --model CKPT --data FILE_OR_DIR [--n 16 --temperature 0.6 --top_p 0.95]``
samples ``n`` completions per problem with the training engines and reward (never a hint) and reports,
per benchmark, avg@n and the unbiased pass@k = 1 - C(n-c, k) / C(n, k) for k = 1, 2, 4, ..., n
(Chen et al. 2021); it writes ``eval_results.json`` (with every problem's correct count) and a PNG
of the pass@k curves. ``--compare CKPT_BEFORE`` adds the Guide paper's analysis (docs/ALGORITHMS.md
§3): problems unsolved at pass@1 before and solved after are *self-distillation* when some
sample before was correct (pass@n > 0, pass@16 for n = 16) and *capability gain* when none was;
*regressions* go the other way. "Solved at pass@1" means pass@1 >= ``--solved_threshold`` (0.5).
"""
from __future__ import annotations

import logging
import math
import os
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
import transformers

from fasthint import dist
from fasthint.benchmarks import load_benchmarks
from fasthint.checkpoint import write_json_atomic
from fasthint.config import parse_args
from fasthint.data import PromptFormat, check_prompt_format, render_prompt
from fasthint.engines import make_engine
from fasthint.engines.base import RolloutConfig, SamplingConfig, completion_seed
from fasthint.errors import FastHintError
from fasthint.metrics import save_figure
from fasthint.models import load_policy, resolve_model_path
from fasthint.options import need, option
from fasthint.rewards import RewardScorer


def evaluate_accuracy(engine, tokenizer, rows: list[dict], reward_fn: Callable[[list[str], list[dict]], list[float]],
                      *, max_new_tokens: int, prompt_template: "PromptFormat | str" = "{question}",
                      temperature: float = 0.0, n: int = 1, seed: int = 0) -> dict:
    """Mean reward of ``n`` samples per prompt (greedy by default): ``eval/accuracy`` and, when
    rows carry a ``level``, ``eval/accuracy_level_{L}``; with ``n > 1`` also the unbiased
    ``eval/pass@k`` (k in :func:`ks_for`, a sample counts as correct at reward >= 1).

    Under ``torch.distributed`` every rank samples and scores its share of the prompts (rank r takes
    prompts r, r + N, ...) and the rewards are gathered: every rank returns the whole evaluation.
    Prompt i's completions are drawn from seed ``completion_seed(seed, i)`` (``SamplingConfig.seeds``),
    so 1 rank and N ranks sample the same completions, and the training RNG is left as it was."""
    rank, world = dist.rank(), dist.world_size()
    mine = list(range(rank, len(rows), world))
    rewards_of: list[list[float]] = [[] for _ in mine]
    if mine:
        prompts = [render_prompt(tokenizer, rows[i]["question"], prompt_template) for i in mine]
        comps = engine.generate(prompts, SamplingConfig(n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                                                        seeds=[completion_seed(seed, i) for i in mine]))
        texts = tokenizer.batch_decode([c.token_ids for c in comps], skip_special_tokens=True)
        rewards = reward_fn(texts, [rows[mine[c.prompt_index]] for c in comps])
        rewards = getattr(rewards, "correct", rewards)  # fasthint.reward_funcs.Scores: correctness, not the total
        for c, r in zip(comps, rewards):
            rewards_of[c.prompt_index].append(float(r))
    per_prompt: list[list[float]] = [[] for _ in rows]
    for idx, part in dist.all_gather((mine, rewards_of)):
        for i, r in zip(idx, part):
            per_prompt[i] = r
    return accuracy_metrics(rows, per_prompt, n)


def accuracy_metrics(rows: list[dict], per_prompt: list[list[float]], n: int) -> dict:
    """:func:`evaluate_accuracy`'s figures from each prompt's rewards (``per_prompt[i]``: row i's ``n``)."""
    flat = [r for rs in per_prompt for r in rs]
    by_level: dict = defaultdict(list)
    for row, rs in zip(rows, per_prompt):
        by_level[row.get("level")].extend(rs)
    out = {"eval/accuracy": sum(flat) / max(1, len(flat)), "eval/num_prompts": len(rows)}
    for level in sorted(k for k in by_level if k is not None):
        out[f"eval/accuracy_level_{level}"] = sum(by_level[level]) / len(by_level[level])
    if n > 1:
        counts = [sum(int(r >= 1.0) for r in rs) for rs in per_prompt]
        out.update({f"eval/{k}": v for k, v in benchmark_metrics(counts, n).items() if k.startswith("pass@")})
    return out


# ---- library: pass@k and the before/after classifier ----------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k)
    (1.0 when n - c < k). Needs 0 <= c <= n and 1 <= k <= n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def ks_for(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    return ks + ([n] if ks[-1] != n else [])


def benchmark_metrics(counts: list[int], n: int) -> dict:
    """avg@n and pass@k (k in :func:`ks_for`) averaged over problems, from per-problem correct counts."""
    m = max(1, len(counts))
    out: dict[str, Any] = {"num_problems": len(counts), "n": n, f"avg@{n}": sum(counts) / (n * m)}
    for k in ks_for(n):
        out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in counts) / m
    return out


CATEGORIES = ("self_distillation", "capability_gain", "regression", "solved_both", "unsolved_both")


def classify(before: int, after: int, n: int, threshold: float = 0.5) -> str:
    """One problem's category from its correct counts before and after (``n`` samples each)."""
    solved_before, solved_after = before / n >= threshold, after / n >= threshold
    if solved_before and solved_after:
        return "solved_both"
    if solved_before:
        return "regression"
    if not solved_after:
        return "unsolved_both"
    return "self_distillation" if before > 0 else "capability_gain"


def compare_counts(before: dict[str, int], after: dict[str, int], n: int, threshold: float = 0.5) -> dict:
    """Counts and fractions (of all problems) of each category, keyed by problem uid; plus ``n``."""
    if before.keys() != after.keys():
        raise ValueError("before and after must score the same problems")
    cats = {u: classify(before[u], after[u], n, threshold) for u in before}
    total = max(1, len(cats))
    out: dict[str, Any] = {"n": n, "num_problems": len(cats), "solved_threshold": threshold}
    for c in CATEGORIES:
        k = sum(v == c for v in cats.values())
        out[c] = k
        out[f"{c}_frac"] = k / total
    out["problems"] = cats
    return out


# ---- the CLI ----------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    """``python -m fasthint.eval`` options (``--key value``; ``--config FILE.yaml``)."""

    model: str = option("toy", "checkpoint directory to evaluate (HF format, e.g. OUTPUT_DIR/final), or toy.")
    data: str = option("", "benchmark file (JSONL/Parquet) or a directory of them (see fasthint.benchmarks).")
    compare: str = option("", "a second checkpoint (before training): adds the self-distillation / capability "
                              "gain / regression analysis.")
    n: int = option(16, "samples per problem.")
    temperature: float = option(0.6, "sampling temperature.")
    top_p: float = option(0.95, "nucleus sampling.")
    max_new_tokens: int = option(1024, "maximum completion length.")
    prompt_template: str = option("{question}", "user-turn text, as in training; {question} is replaced.")
    system_prompt: str = option("", "system turn, as in training ('' = none).")
    chat_template: str = option("auto", "as in training: 'auto' (the tokenizer's) or 'none' (plain text).")
    chat_template_kwargs: str = option("", "as in training: JSON object for apply_chat_template.")
    solved_threshold: float = option(0.5, "--compare: a problem is solved at pass@1 when pass@1 >= this.")
    max_problems: int = option(0, "evaluate only the first N problems of each benchmark (0 = all).")
    engine: str = option("hf", "hf (the model's own decode loop) or vllm.")
    vllm_gpu_memory_utilization: float = option(0.9, "vllm: share of GPU memory for the engine.")
    generation_batch_size: int = option(256, "hf: sequences per generate call.")
    reward_timeout_s: float = option(5.0, "math-verify deadline per completion.")
    output_dir: str = option("eval_out", "where eval_results.json and pass_at_k.png go.")
    cache_dir: str = option("~/.cache/fasthint", "toy model cache (--model toy).")
    seed: int = option(0, "sampling seed.")

    def validate(self) -> "EvalConfig":
        need(bool(self.data), "--data is required: a benchmark file or a directory of them")
        need(self.n >= 1, f"--n must be >= 1 (got {self.n})")
        need(self.temperature > 0 or self.n == 1, "--temperature 0 (greedy) needs --n 1")
        need(self.temperature >= 0, f"--temperature must be >= 0 (got {self.temperature})")
        need(0 < self.top_p <= 1, f"--top_p must be in (0, 1] (got {self.top_p})")
        need(self.max_new_tokens >= 1, f"--max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        need(0 < self.solved_threshold <= 1, f"--solved_threshold must be in (0, 1] (got {self.solved_threshold})")
        need(self.max_problems >= 0, f"--max_problems must be >= 0 (got {self.max_problems})")
        need(self.engine in ("hf", "vllm"), f"--engine {self.engine!r}: use hf or vllm")
        check_prompt_format(self.prompt_template, self.chat_template, self.chat_template_kwargs)
        return self

    @property
    def prompt_format(self) -> PromptFormat:
        return PromptFormat(self.prompt_template, self.system_prompt, self.chat_template, self.chat_template_kwargs)


def correct_counts(cfg: EvalConfig, model_path: str, benches: dict[str, list[dict]], score) -> dict[str, dict]:
    """``{benchmark: {uid: correct samples out of n}}`` for one checkpoint (never a hint)."""
    device = dist.init()
    model, tok = load_policy(model_path, device)
    model.eval()
    longest = max(len(render_prompt(tok, r["question"], cfg.prompt_format))
                  for rows in benches.values() for r in rows)
    rollout = RolloutConfig(engine=cfg.engine, generation_batch_size=cfg.generation_batch_size,
                            vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
    rollout.check()
    engine = make_engine(rollout, model, tok, model_path, seed=cfg.seed, max_model_len=longest + cfg.max_new_tokens)
    torch.manual_seed(cfg.seed)
    sampling = SamplingConfig(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    out: dict[str, dict] = {}
    try:
        for name, rows in benches.items():
            prompts = [render_prompt(tok, r["question"], cfg.prompt_format) for r in rows]
            comps = engine.generate(prompts, sampling)
            texts = tok.batch_decode([c.token_ids for c in comps], skip_special_tokens=True)
            rewards = score(texts, [rows[c.prompt_index] for c in comps])
            counts = {r["uid"]: 0 for r in rows}
            for c, rew in zip(comps, rewards):
                counts[rows[c.prompt_index]["uid"]] += int(rew >= 1.0)
            out[name] = counts
    finally:
        engine.close()
    return out


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluates ``cfg.model`` (and ``cfg.compare``) on every benchmark; writes JSON and a PNG."""
    benches = load_benchmarks(cfg.data)
    if cfg.max_problems:
        benches = {k: v[:cfg.max_problems] for k, v in benches.items()}
    paths = {"after": cfg.model, **({"before": cfg.compare} if cfg.compare else {})}
    paths = {k: resolve_model_path(p, os.path.expanduser(cfg.cache_dir), 0, 1000) for k, p in paths.items()}
    scorer = RewardScorer(timeout_s=cfg.reward_timeout_s)
    try:
        counts = {k: correct_counts(cfg, p, benches, lambda t, rows: scorer.score(t, [r["answer"] for r in rows]))
                  for k, p in paths.items()}
    finally:
        scorer.close()
    res: dict[str, Any] = {"config": asdict(cfg), "n": cfg.n}
    for k in paths:
        res[k] = {"model": paths[k], "benchmarks": {b: benchmark_metrics(list(c.values()), cfg.n)
                                                     for b, c in counts[k].items()}, "correct_counts": counts[k]}
    if cfg.compare:
        res["compare"] = {b: compare_counts(counts["before"][b], counts["after"][b], cfg.n, cfg.solved_threshold)
                          for b in benches}
    os.makedirs(cfg.output_dir, exist_ok=True)
    write_json_atomic(os.path.join(cfg.output_dir, "eval_results.json"), res)
    res["plot"] = _plot(res, os.path.join(cfg.output_dir, "pass_at_k.png"))
    return res


def _plot(res: dict, path: str) -> str:
    import matplotlib  # lazy: pyplot sets a process-wide backend; only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: see above

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, m) in enumerate(res["after"]["benchmarks"].items()):
        ks = ks_for(res["n"])
        ax.plot(ks, [m[f"pass@{k}"] for k in ks], marker="o", color=f"C{i}", label=name)
        if "before" in res:
            b = res["before"]["benchmarks"][name]
            ax.plot(ks, [b[f"pass@{k}"] for k in ks], ls="--", color=f"C{i}", label=f"{name} (before)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def format_tables(res: dict) -> str:
    """The per-benchmark pass@k table (and the compare table) as Markdown."""
    ks, avg = ks_for(res["n"]), f"avg@{res['n']}"
    lines = ["| model | benchmark | problems | " + f"{avg} | " + " | ".join(f"pass@{k}" for k in ks) + " |",
             "|---" * (4 + len(ks)) + "|"]
    for label in ("before", "after"):
        for name, m in res.get(label, {}).get("benchmarks", {}).items():
            lines.append(f"| {label} | {name} | {m['num_problems']} | {m[avg]:.3f} | "
                         + " | ".join(f"{m[f'pass@{k}']:.3f}" for k in ks) + " |")
    if "compare" in res:
        lines += ["", "| benchmark | n | " + " | ".join(CATEGORIES) + " |", "|---" * (2 + len(CATEGORIES)) + "|"]
        for name, c in res["compare"].items():
            lines.append(f"| {name} | {c['n']} | " + " | ".join(f"{c[k]} ({c[k + '_frac']:.1%})" for k in CATEGORIES)
                         + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m fasthint.eval``: exit status 0, or 2 with one line on stderr for bad input."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        cfg = parse_args(argv, cls=EvalConfig, cli=("python -m fasthint.eval", "Evaluate checkpoints on math "
                                                    "benchmarks without hints: avg@n, pass@k, before/after."))
        res = run_eval(cfg)
    except FastHintError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_tables(res))
    print(f"wrote {os.path.join(cfg.output_dir, 'eval_results.json')} and {res['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
