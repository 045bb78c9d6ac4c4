"""Per-step metric reduction over ranks, the loop's progress display and the console summary of the
no-hint evaluation."""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import replace
from typing import Iterator, Optional, TextIO

import torch
from tqdm import tqdm

from fasthint import dist
from fasthint.algorithms import SolveTracker, group_metrics
from fasthint.algorithms.base import HINT_SHARES


def sync_algo_state(algo, local_uids: list[str]) -> None:
    """Per-prompt algorithm state (SAGE-light's levels) updated on the rank that owned each prompt
    this step, made the same on every rank."""
    state = algo.state_dict()
    mine = {k: {u: v[u] for u in local_uids if u in v} for k, v in state.items() if isinstance(v, dict)}
    for part in dist.all_gather(mine):
        for k, d in part.items():
            state[k].update(d)
    algo.load_state_dict(state)


SUMMED_INFO = ("hint/requested", "sampled_tokens", "hint/truncated")


def _reward_stats(rewards: list, hits: list, suffix: str = "") -> dict:
    t, h = torch.tensor(rewards), torch.tensor(hits)
    return {f"reward/mean{suffix}": t.mean().item() if len(t) else float("nan"),
            f"reward/std{suffix}": t.std().item() if len(t) > 1 else float("nan"),
            f"accuracy{suffix}": (h >= 1.0).float().mean().item() if len(h) else float("nan")}


def _no_hint(g) -> Optional[tuple[list, list, Optional[dict]]]:
    """(rewards, correctness, reward parts) of ``g``'s no-hint rollout: its own, or those of the no-hint
    group a hinted one replaced; None for a group sampled only with its hint (SAGE-light)."""
    if g.level == 0:
        return g.rewards, g.hits, g.reward_parts
    if g.pre_hint_rewards is not None:
        return g.pre_hint_rewards, g.pre_hint_correct or g.pre_hint_rewards, g.pre_hint_parts
    return None


def _part_means(parts: list[Optional[dict]], suffix: str) -> dict:
    """``rewards/<name>/<suffix>``: each reward function's mean over its applicable (not None) values."""
    sums: dict[str, list[float]] = {}
    for p in parts:
        for name, vals in (p or {}).items():
            acc = sums.setdefault(name, [0.0, 0.0])
            got = [v for v in vals if v is not None]
            acc[0], acc[1] = acc[0] + sum(got), acc[1] + len(got)
    return {f"rewards/{n}/{suffix}": t / c if c else float("nan") for n, (t, c) in sums.items()}


def reward_metrics(groups: list, every: Optional[list] = None) -> dict:
    """Reward metrics of the step's groups (``groups``: those that train; ``every``: every group sampled,
    when some were dropped, as DAPO and Guide drop groups whose rewards are all equal):

    - ``reward/*`` and ``accuracy`` over every sampled group's no-hint rollout (a hinted group's are
      the rewards of the no-hint group it replaced), comparable with GRPO; ``.../kept`` over the groups
      that train, when some were dropped. SAGE-light samples a prompt at its level only: its hinted
      groups count with their hinted rewards, and ``reward/level0`` is over the level-0 groups alone.
    - ``reward/hinted`` and ``accuracy/hinted`` over the hinted groups.
    - ``rewards/<name>/mean`` per reward function over the no-hint rollouts, ``rewards/<name>/hinted``
      over the hinted ones."""
    pop = groups if every is None else every
    own = [_no_hint(g) or (g.rewards, g.hits, g.reward_parts) for g in pop]
    out = _reward_stats([r for o in own for r in o[0]], [h for o in own for h in o[1]])
    if every is not None:
        kept = [_no_hint(g) or (g.rewards, g.hits, g.reward_parts) for g in groups]
        out.update(_reward_stats([r for o in kept for r in o[0]], [h for o in kept for h in o[1]], "/kept"))
    if any(_no_hint(g) is None for g in pop):
        level0 = [g for g in pop if g.level == 0]
        n0 = sum(len(g.rewards) for g in level0)
        out["reward/level0"] = sum(r for g in level0 for r in g.rewards) / n0 if n0 else float("nan")
        out["accuracy/level0"] = sum(h >= 1.0 for g in level0 for h in g.hits) / n0 if n0 else float("nan")
    hinted = [g for g in pop if g.level > 0]
    if hinted:
        out["reward/hinted"] = sum(r for g in hinted for r in g.rewards) / sum(len(g.rewards) for g in hinted)
        out["accuracy/hinted"] = sum(h >= 1.0 for g in hinted for h in g.hits) / sum(len(g.hits) for g in hinted)
    out.update(_part_means([n[2] for n in map(_no_hint, pop) if n is not None], "mean"))
    out.update(_part_means([g.reward_parts for g in hinted], "hinted"))
    return out


def step_metrics(groups: list, tracker: SolveTracker, info: dict, timings: dict) -> dict:
    """Rollout metrics over every rank's groups (gathered once); per-rank infos averaged (counts summed,
    minima and maxima taken)."""
    light = [(replace(g, row={}, prompt_ids=[], completions=[]), [len(c.token_ids) for c in g.completions],
              [c.truncated for c in g.completions]) for g in groups]
    info = {**info, "sampled_tokens": timings.get("sampled_tokens", 0),
            "hint/truncated": timings.get("hint_truncated", 0)}
    parts = dist.all_gather((light, info))
    light = [x for part, _ in parts for x in part]
    infos = [i for _, i in parts]
    gs = [g for g, _, _ in light]
    lens = [n for _, ls, _ in light for n in ls] or [0]
    truncs = [t for _, _, ts in light for t in ts]
    dropped = any("_sampled_groups" in i for i in infos)  # DAPO, Guide: every sampled group, dropped ones too
    every = [g for i in infos for g in i.pop("_sampled_groups", None) or []] if dropped else gs
    out = {**reward_metrics(gs, every if dropped else None), **group_metrics(every),
           "prompts/never_solved": tracker.update(every),
           "completion_len/mean": sum(lens) / len(lens), "completion_len/max": max(lens),
           "truncated_ratio": sum(truncs) / max(1, len(truncs)), "_completion_tokens": sum(lens),
           "time/generate_s": timings.get("generate", 0.0), "time/score_s": timings.get("score", 0.0),
           "time/hint_s": timings.get("hint", 0.0)}
    for k in dict.fromkeys(k for i in infos for k in i):
        vals = [i[k] for i in infos if k in i and isinstance(i[k], (int, float))]
        if not vals:
            continue
        if k.startswith("hint/") and k.removeprefix("hint/") in HINT_SHARES:  # shares of requests: weighted
            req = [i.get("hint/requested", 0) for i in infos if k in i]
            out[k] = sum(v * r for v, r in zip(vals, req)) / sum(req) if sum(req) else 0.0
        elif k.endswith(("min", "max")):
            out[k] = min(vals) if k.endswith("min") else max(vals)
        else:
            out[k] = sum(vals) if k in SUMMED_INFO else sum(vals) / len(vals)
    return out


def completion_records(groups: list, samples: list, tokenizer, step: int) -> list[dict]:
    """This rank's completions of the step for ``--log_completions``: prompt and completion text, hint
    level, each reward, correctness and the advantage it trained with (None when it did not train)."""
    adv = {(s.group, tuple(s.completion_ids)): s.advantage for s in samples}
    out = []
    for gi, g in enumerate(groups):
        prompt = tokenizer.decode(g.prompt_ids, skip_special_tokens=False)
        texts = tokenizer.batch_decode([c.token_ids for c in g.completions], skip_special_tokens=True)
        for j, (c, text) in enumerate(zip(g.completions, texts)):
            parts = {k: v[j] for k, v in (g.reward_parts or {"reward": g.rewards}).items()}
            out.append({"step": step, "uid": g.uid, "hint_level": g.level, "prompt": prompt, "completion": text,
                        "reward": g.rewards[j], "correct": g.hits[j], "rewards": parts,
                        "advantage": adv.get((gi, tuple(c.token_ids))), "truncated": c.truncated})
    return out


def fmt(m: dict) -> str:
    return " ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in m.items() if isinstance(v, float))


def print_table(before: dict, after: dict) -> None:
    """Before/after no-hint accuracy per level: greedy, and the mean over sampled completions."""
    groups = sorted({k.split("/")[1].split("_level")[0] for k in before if "/accuracy" in k or "/avg@" in k})
    if not groups:
        return
    print(f"\nno-hint evaluation ({int(before.get('eval/num_prompts', 0))} prompts): before -> after")
    for metric in groups:
        label = "greedy accuracy" if metric == "accuracy" else f"{metric} (sampled)"
        print(f"  {label}")
        for k in [k for k in before if k == f"eval/{metric}" or k.startswith(f"eval/{metric}_level")]:
            name = k.split("_level_")[1] if "_level_" in k else "all"
            print(f"    level {name:<5} {before[k]:>7.1%} -> {after.get(k, float('nan')):>6.1%}")


def is_terminal(stream: Optional[TextIO]) -> bool:
    """``stream`` is an interactive terminal (not a file, a pipe or a test's capture)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def duration(seconds: float) -> str:
    """``42s``, ``2m06s`` or ``1h02m``; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class StepProgress:
    """What the console shows of the training loop. On a terminal (``stream``, stderr by default):
    tqdm's bar with reward, accuracy and hint rate. Elsewhere (a log file, a pipe), where a bar is
    one long line of carriage returns: one plain line through the ``fasthint`` logger every
    ``every`` steps and at the last, e.g. ``step 10/100 reward 0.312 acc 0.281 hint 0.00 (1.4 s/step,
    eta 2m06s)``. ``enabled=False`` (``--progress_bar false``, ranks other than 0) shows nothing."""

    def __init__(self, start: int, total: int, desc: str, enabled: bool = True, every: int = 1,
                 stream: Optional[TextIO] = None):
        stream = sys.stderr if stream is None else stream
        terminal = is_terminal(stream)
        self.start, self.total, self.every = start, total, max(1, every)
        self.lines = enabled and not terminal
        self.bar = tqdm(range(start + 1, total + 1), desc=desc, disable=not (enabled and terminal),
                        dynamic_ncols=True, initial=start, total=total, file=stream)
        self._t0 = time.perf_counter()

    def __iter__(self) -> Iterator[int]:
        return iter(self.bar)

    def update(self, step: int, metrics: dict) -> None:
        """Shows ``step``'s reward, accuracy and hint rate (``reward/mean``, ``accuracy``, ``hint/rate``)."""
        reward, acc, hint = (metrics.get(k, float("nan")) for k in ("reward/mean", "accuracy", "hint/rate"))
        if not self.bar.disable:
            self.bar.set_postfix(reward=f"{reward:.3f}", acc=f"{acc:.3f}", hint=f"{hint:.2f}")
        elif self.lines and (step % self.every == 0 or step == self.total):
            per_step = (time.perf_counter() - self._t0) / max(1, step - self.start)
            logging.getLogger("fasthint").info(
                "step %d/%d reward %.3f acc %.3f hint %.2f (%.1f s/step, eta %s)", step, self.total, reward, acc,
                hint, per_step, duration(per_step * (self.total - step)))


class RunClock:
    """A run's wall time by phase, printed at its end (where the minutes went): building (model,
    data, engine), evaluations, and per step rollouts, scoring, hint writing and the update; what
    is left (metrics, logging, Python between phases) is "other"."""

    PHASES = ("build", "evaluation", "rollouts", "scoring", "hints", "update", "checkpoints")
    STEP_KEYS = {"rollouts": "time/generate_s", "scoring": "time/score_s", "hints": "time/hint_s",
                 "update": "time/train_s"}

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self.steps = 0

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def since(self, phase: str, t0: float) -> None:
        """Adds the time from ``t0`` (a ``time.perf_counter()``) to now to ``phase``."""
        self.add(phase, time.perf_counter() - t0)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the time the ``with`` block takes to ``name``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.since(name, t0)

    def step(self, metrics: dict) -> None:
        """Counts one training step from its ``time/*`` metrics."""
        self.steps += 1
        for phase, key in self.STEP_KEYS.items():
            self.add(phase, float(metrics.get(key, 0.0)))

    def summary(self) -> str:
        """One line, e.g. ``time 2m52s: build 4s, evaluation 13s, rollouts 1m21s (0.81 s/step), ...``."""
        def fmt_s(s: float) -> str:
            return f"{s:.1f}s" if s < 59.95 else duration(s)

        total = time.perf_counter() - self.t0
        parts = [f"{p} {fmt_s(s)}" + (f" ({s / self.steps:.2f} s/step)" if p in self.STEP_KEYS and self.steps else "")
                 for p, s in self.seconds.items() if s >= 0.05 or (p in ("rollouts", "update") and self.steps)]
        other = total - sum(self.seconds.values())
        return f"time {fmt_s(total)} for {self.steps} steps: " + ", ".join(parts + [f"other {fmt_s(other)}"])
