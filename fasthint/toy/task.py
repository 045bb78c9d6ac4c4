"""Synthetic arithmetic problems at four difficulty levels, deterministic by seed.

Level 1: a+b on 0-9. Level 2: two +/- steps on 0-9. Level 3: three +/- steps on 1-20.
Level 4: a product of two numbers in 10-99, then two +/- steps on 10-99.
Each problem has a step-by-step reference solution ending in ``\\boxed{answer}`` and three hints of
increasing strength (level 1: the first operation, level 2: the first step worked out, level 3:
every step but the last result); no hint reveals the final answer.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Iterator

from fasthint.options import Options, need, option

LEVELS = (1, 2, 3, 4)


@dataclass
class ToyConfig(Options):
    """The embedded toy (``--model toy``, ``--data toy``)."""

    GROUP = "toy"
    toy_train_size: int = option(4000, "toy training problems (uniform over --toy_levels).")
    toy_levels: str = option("1,2", "toy training levels, comma-separated from 1-4 (the held-out evaluation always "
                                    "covers all four); the default keeps the levels GRPO can learn in a short "
                                    "run: use 1,2,3,4 for the hard prompts hints are for.")
    toy_warmstart_steps: int = option(1000, "supervised warm-start steps (1024 tokens each) of the toy model; "
                                            "cached by value.")
    toy_seed: int = option(0, "seed of the toy model, its warm start and its data (--seed is the training run's): "
                              "seed 0 with 1000 warm-start steps ships with fasthint, other values are built and "
                              "cached on first use.")
    toy_rebuild: bool = option(False, "build and warm-start the toy here (cached in --cache_dir) instead of loading "
                                      "the copy that ships with fasthint (the same toy, built on the recording "
                                      "machine: other CPUs round differently).")

    @property
    def toy_level_tuple(self) -> tuple[int, ...]:
        """``toy_levels`` as sorted ints."""
        return tuple(sorted(int(x) for x in str(self.toy_levels).split(",")))

    def check(self) -> None:
        need(self.toy_train_size >= 1, f"--toy_train_size must be >= 1 (got {self.toy_train_size})")
        need(self.toy_warmstart_steps >= 0, f"--toy_warmstart_steps must be >= 0 (got {self.toy_warmstart_steps})")
        need(self.toy_seed >= 0, f"--toy_seed must be >= 0 (got {self.toy_seed})")
        levels = [x.strip() for x in str(self.toy_levels).split(",")]
        need(all(x in ("1", "2", "3", "4") for x in levels) and len(set(levels)) == len(levels),
             f"--toy_levels {self.toy_levels!r}: give distinct levels from 1-4, comma-separated (e.g. 1,2,3,4)")


def make_problem(rng: random.Random, level: int) -> dict:
    """One problem as a dataset row: question, answer, solution, level, hint (the level-2 hint).

    The private key ``_hints`` holds all three hint levels (warm-start targets); it is not written.
    """
    if level == 1:
        nums, ops = [rng.randint(0, 9), rng.randint(0, 9)], ["+"]
    elif level == 2:
        nums, ops = [rng.randint(0, 9) for _ in range(3)], [rng.choice("+-") for _ in range(2)]
    elif level == 3:
        nums, ops = [rng.randint(1, 20) for _ in range(4)], [rng.choice("+-") for _ in range(3)]
    elif level == 4:
        nums, ops = [rng.randint(10, 99) for _ in range(4)], ["*"] + [rng.choice("+-") for _ in range(2)]
    else:
        raise ValueError(f"toy level must be one of {LEVELS}, got {level}")
    question = str(nums[0]) + "".join(f"{o}{n}" for o, n in zip(ops, nums[1:])) + "=?"
    steps, acc = [], nums[0]
    for o, n in zip(ops, nums[1:]):
        new = acc + n if o == "+" else acc - n if o == "-" else acc * n
        steps.append((f"{acc}{o}{n}", new))
        acc = new
    solution = "\n".join(f"{lhs}={val}" for lhs, val in steps) + f"\n\\boxed{{{acc}}}"
    last_lhs = steps[-1][0]
    hints = {
        "level_1": f"first {steps[0][0]}",
        "level_2": f"{steps[0][0]}={steps[0][1]}" if len(steps) > 1 else f"add {nums[0]} and {nums[1]}",
        "level_3": ", ".join(f"{lhs}={val}" for lhs, val in steps[:-1]) + (", " if len(steps) > 1 else "")
        + f"then {last_lhs}",
    }
    return {"question": question, "answer": str(acc), "solution": solution, "level": level,
            "hint": hints["level_2"], "_hints": hints}


def iter_problems(seed: int, levels: tuple[int, ...] = LEVELS) -> Iterator[dict]:
    """An endless deterministic stream of problems, levels drawn uniformly."""
    rng = random.Random(seed)
    while True:
        yield make_problem(rng, rng.choice(levels))


def make_splits(seed: int, train_size: int, eval_per_level: int = 100,
                levels: tuple[int, ...] = LEVELS) -> tuple[list[dict], list[dict]]:
    """Disjoint train/eval sets (level 1 has only 100 distinct questions, so those may repeat); the
    training set draws from ``levels``, the evaluation set always covers all four."""
    rng = random.Random(seed * 1000 + 17)
    evals, seen = [], set()
    for level in LEVELS:
        count, tries = 0, 0
        while count < eval_per_level and tries < 100 * eval_per_level:
            tries += 1
            p = make_problem(rng, level)
            if p["question"] in seen:
                continue
            seen.add(p["question"])
            evals.append(p)
            count += 1
    train = []
    stream = iter_problems(seed, levels)
    while len(train) < train_size:
        p = next(stream)
        if p["level"] == 1 or p["question"] not in seen:
            train.append(p)
    return train, evals


def write_jsonl(rows: list[dict], path: str) -> None:
    """Writes rows as JSONL atomically (temp file then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        for r in rows:
            fh.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n")
    os.replace(tmp, path)


def ensure_toy_data(cache_dir: str, seed: int, train_size: int,
                    levels: tuple[int, ...] = LEVELS) -> tuple[str, str]:
    """Writes (once) and returns the paths of the toy train (from ``levels``) and eval JSONL files."""
    tag = "" if tuple(levels) == LEVELS else "-L" + "".join(map(str, levels))
    d = os.path.join(os.path.expanduser(cache_dir), "toy", f"data-v1-seed{seed}-n{train_size}{tag}")
    train_p, eval_p = os.path.join(d, "train.jsonl"), os.path.join(d, "eval.jsonl")
    if not (os.path.isfile(train_p) and os.path.isfile(eval_p)):
        train, evals = make_splits(seed, train_size, levels=tuple(levels))
        write_jsonl(evals, eval_p)
        write_jsonl(train, train_p)
    return train_p, eval_p
