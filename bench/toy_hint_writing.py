"""How well the warm-started toy writes SAGE-style hints: share of valid 3-level JSON answers.

Usage: python bench/toy_hint_writing.py [--cache_dir ~/.cache/fasthint] [--warmstart_steps 1000]
Builds (or reuses) the cached toy model, asks it greedily for hints on 40 held-out problems, prints
the share of answers that parse as JSON with keys level_1..level_3 and a few examples.
"""
import argparse
import json

import torch

from fasthint.data import load_dataset, render_chat
from fasthint.engines.base import SamplingConfig
from fasthint.engines.hf import HFEngine
from fasthint.hints import hint_request
from fasthint.models import load_policy
from fasthint.toy.model import ensure_toy_model
from fasthint.toy.task import ensure_toy_data

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache_dir", default="~/.cache/fasthint")
    ap.add_argument("--warmstart_steps", type=int, default=1000)
    args = ap.parse_args()
    model, tok = load_policy(ensure_toy_model(args.cache_dir, 0, args.warmstart_steps), torch.device("cpu"))
    rows = load_dataset(ensure_toy_data(args.cache_dir, 0, 4000)[1])[::10]
    prompts = [render_chat(tok, hint_request(r["question"], r["solution"])) for r in rows]
    comps = HFEngine(model, tok).generate(prompts, SamplingConfig(n=1, temperature=0.0, max_new_tokens=160))
    texts = [tok.decode(c.token_ids, skip_special_tokens=True) for c in comps]
    ok = 0
    for t in texts:
        try:
            ok += set(json.loads(t)) == {"level_1", "level_2", "level_3"}
        except (json.JSONDecodeError, TypeError):
            pass
    print(f"valid 3-level JSON hints: {ok}/{len(rows)}")
    for r, t in list(zip(rows, texts))[::8]:
        print(f"  {r['question']:<16} -> {t}")
