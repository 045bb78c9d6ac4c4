"""Evaluation without hints: accuracy of the policy on a dataset, overall and per ``level``."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

from fasthint.data import render_prompt
from fasthint.engines.base import SamplingConfig


def evaluate_accuracy(engine, tokenizer, rows: list[dict], reward_fn: Callable[[list[str], list[dict]], list[float]],
                      *, max_new_tokens: int, prompt_template: str = "{question}", temperature: float = 0.0,
                      n: int = 1) -> dict:
    """Mean reward of ``n`` samples per prompt (greedy by default): ``eval/accuracy`` and, when
    rows carry a ``level``, ``eval/accuracy_level_{L}``."""
    prompts = [render_prompt(tokenizer, r["question"], prompt_template) for r in rows]
    comps = engine.generate(prompts, SamplingConfig(n=n, temperature=temperature, max_new_tokens=max_new_tokens))
    texts = tokenizer.batch_decode([c.token_ids for c in comps], skip_special_tokens=True)
    rewards = reward_fn(texts, [rows[c.prompt_index] for c in comps])
    by_level: dict = defaultdict(list)
    for c, r in zip(comps, rewards):
        by_level[rows[c.prompt_index].get("level")].append(r)
    out = {"eval/accuracy": sum(rewards) / max(1, len(rewards)), "eval/num_prompts": len(rows)}
    for level in sorted(k for k in by_level if k is not None):
        out[f"eval/accuracy_level_{level}"] = sum(by_level[level]) / len(by_level[level])
    return out
