"""The training loop: ``torchrun --nproc_per_node=1 -m fasthint.train [--key value ...]``.

One flat loop with clear sections: rollout -> score -> advantages -> policy update -> metrics.
With no arguments it trains the embedded toy (a tiny Qwen2 warm-started on synthetic arithmetic)
with GRPO on CPU in a few minutes, evaluating without hints before and after.
"""
from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from fasthint import dist
from fasthint.algorithms import RolloutContext, SolveTracker, group_metrics, make_algorithm
from fasthint.config import TrainConfig, parse_args
from fasthint.data import PromptSampler, render_prompt
from fasthint.engines import make_engine
from fasthint.engines.base import SamplingConfig
from fasthint.engines.correction import ISCorrectedEngine, merge_stats
from fasthint.errors import FastHintError
from fasthint.eval import evaluate_accuracy
from fasthint.hints import hinted_question
from fasthint.metrics import MetricsLogger, plot_metrics, read_metrics
from fasthint.preflight import preflight
from fasthint.models import (load_model_config, load_policy, load_trainable_policy, resolve_attn_implementation,
                             resolve_model_path)
from fasthint.loss import PolicyLoss
from fasthint.update import train_step
from fasthint.checkpoint import (load_training_checkpoint, move_aside, prune_checkpoints, restore_rng,
                                 save_hf_checkpoint, save_training_checkpoint, truncate_metrics, write_json_atomic)

log = logging.getLogger("fasthint")

RewardFn = Callable[[str, dict], float]


def _setup(cfg: TrainConfig) -> torch.device:
    """Joins the process group under torchrun; seeds (model construction is the same on every rank)."""
    device = dist.init()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return device


def _reward_batch(cfg: TrainConfig, reward_fn: Optional[RewardFn]):
    """A batch reward function ``(texts, rows) -> rewards``: the math verifier or the user's."""
    if reward_fn is None:
        from fasthint.rewards import RewardScorer

        scorer = RewardScorer(timeout_s=cfg.reward_timeout_s)
        return (lambda texts, rows: scorer.score(texts, [r["answer"] for r in rows])), scorer.close

    def user(texts, rows):
        out = [float(reward_fn(t, r)) for t, r in zip(texts, rows)]
        if not all(math.isfinite(x) for x in out):
            raise FastHintError("the reward function returned a non-finite value: return a finite float")
        return out
    return user, (lambda: None)


def _evaluate(engine, tokenizer, rows: list[dict], score, cfg: TrainConfig) -> dict:
    """No-hint greedy accuracy (and avg@k and pass@k of sampled completions) overall and per level."""
    if not rows:
        return {}
    kw = dict(max_new_tokens=cfg.max_new_tokens, prompt_template=cfg.prompt_template)
    out = evaluate_accuracy(engine, tokenizer, rows, score, **kw)
    if cfg.eval_samples:
        k = cfg.eval_samples
        sampled = evaluate_accuracy(engine, tokenizer, rows, score, temperature=cfg.temperature, n=k, **kw)
        out.update({key.replace("eval/accuracy", f"eval/avg@{k}"): v for key, v in sampled.items()
                    if key.startswith("eval/accuracy")})
        out.update({key: v for key, v in sampled.items() if key.startswith("eval/pass@")})
    return out


class _TimedEngine:
    """The rollout engine, with its generate time added to ``timings[key]`` (when a key is given) and
    the number of tokens it generated to ``timings['sampled_tokens']``."""

    def __init__(self, engine, timings: dict, key: Optional[str] = "generate"):
        self.engine, self.timings, self.key = engine, timings, key

    def generate(self, prompts, sampling):
        t0 = time.perf_counter()
        try:
            out = self.engine.generate(prompts, sampling)
            self.timings["sampled_tokens"] = self.timings.get("sampled_tokens", 0) + sum(len(c.token_ids) for c in out)
            return out
        finally:
            if self.key:
                self.timings[self.key] = self.timings.get(self.key, 0.0) + time.perf_counter() - t0

    def update_weights(self, model) -> None:
        self.engine.update_weights(model)


def _timed(fn: Callable, timings: dict, key: str) -> Callable:
    def run(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
    return run


def _renderer(prompts: dict, tokenizer, cfg: TrainConfig, timings: dict) -> Callable:
    """(row, hint) -> prompt ids; the no-hint prompts are rendered once, up front. A hinted prompt
    longer than ``max_prompt_length`` has its hint cut (by tokens) until it fits; counted in
    ``timings['hint_truncated']``."""
    def render(row: dict, hint: Optional[str]) -> list[int]:
        if hint is None:
            return prompts[row["uid"]]
        ids = render_prompt(tokenizer, hinted_question(row["question"], hint), cfg.prompt_template)
        if len(ids) <= cfg.max_prompt_length:
            return ids
        timings["hint_truncated"] = timings.get("hint_truncated", 0) + 1
        hint_ids = tokenizer(hint, add_special_tokens=False)["input_ids"]
        keep = len(hint_ids) - (len(ids) - cfg.max_prompt_length)
        while True:  # token boundaries may merge differently after the cut: shrink until it fits
            text = tokenizer.decode(hint_ids[:max(0, keep)], skip_special_tokens=True)
            ids = render_prompt(tokenizer, hinted_question(row["question"], text), cfg.prompt_template)
            if len(ids) <= cfg.max_prompt_length or keep <= 0:
                return ids
            keep -= len(ids) - cfg.max_prompt_length
    return render


def _hint_provider(cfg: TrainConfig, algo, engine, tokenizer, timings: dict):
    """The hint provider of a hinting algorithm (None for the others); its time goes to
    ``timings['hint']`` (self-hint generation included)."""
    if algo.hint_provider_default is None:
        return None
    from fasthint.algorithms.hint_providers import make_hint_provider

    name = cfg.hint_provider  # its data column was checked by fasthint.preflight
    if name == "self":
        provider = make_hint_provider("self", engine=_TimedEngine(engine, timings, key=None), tokenizer=tokenizer,
                                      template=cfg.prompt_template,
                                      temperature=cfg.hint_temperature, max_new_tokens=cfg.hint_max_new_tokens,
                                      max_prompt_length=cfg.max_prompt_length)
    else:
        provider = make_hint_provider(name)
    provider.hints = _timed(provider.hints, timings, "hint")
    return provider


@dataclass
class _Run:
    """What the loop works with, built once by :func:`_build`."""

    cfg: TrainConfig
    rows: list
    eval_rows: list
    train_path: str
    model_path: str
    resume_dir: Optional[str]
    policy: PolicyLoss  # the LM (``policy.lm``) with the loss; FSDP-sharded when world > 1
    tokenizer: object
    ref_model: object
    engine: object  # HFEngine or VLLMEngine
    score: Callable
    close_scorer: Callable
    algo: object
    hints: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    sampler: PromptSampler
    prompts: dict
    timings: dict = field(default_factory=dict)
    tracker: SolveTracker = field(default_factory=SolveTracker)


def _build(cfg: TrainConfig, reward_fn: Optional[RewardFn]) -> _Run:
    """Device, data, model (sharded over ranks), engine, reward, algorithm, optimizer. Everything that
    can be checked without weights is checked first (``fasthint.preflight``), before anything is
    built or written."""
    device = _setup(cfg)
    pre = preflight(cfg, device)  # every rank, in seconds: data, resume point, packages, model config
    if dist.rank() != 0:  # rank 0 builds the toy model first
        dist.barrier()
    model_path = resolve_model_path(cfg.model, cfg.cache_dir, cfg.seed, cfg.toy_warmstart_steps)
    if dist.rank() == 0:
        dist.barrier()
    resume_dir, rows = pre.resume_dir, pre.rows
    attn = pre.attn_implementation or resolve_attn_implementation(cfg.attn_implementation, device,
                                                                  load_model_config(model_path))
    policy, tokenizer = load_trainable_policy(resume_dir or model_path, device, attn)
    model = policy.lm
    ref_model = None
    if cfg.beta > 0:
        ref_model, _ = load_policy(model_path, device, attn_implementation=attn)
        ref_model.requires_grad_(False).eval()
    engine = make_engine(cfg.engine, model, tokenizer, resume_dir or model_path, cfg)
    torch.manual_seed(cfg.seed + 7919 * dist.rank())  # each rank samples its own completions (after vLLM seeds)
    score, close_scorer = _reward_batch(cfg, reward_fn)
    algo = make_algorithm(cfg)
    timings: dict = {}
    hints = _hint_provider(cfg, algo, engine, tokenizer, timings)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    return _Run(cfg, rows, pre.eval_rows, pre.train_path, model_path, resume_dir, policy, tokenizer, ref_model,
                engine, score, close_scorer, algo, hints, optimizer, scheduler,
                PromptSampler(len(rows), cfg.prompts_per_step, cfg.seed),
                pre.prompts, timings)


def fit(cfg: TrainConfig, reward_fn: Optional[RewardFn] = None) -> dict:
    """Trains with ``cfg``; returns the final metrics (incl. ``eval/...`` before and after).

    ``reward_fn(completion_text, row) -> float`` replaces the math verifier when given.
    """
    cfg.validate()
    try:
        run = _build(cfg, reward_fn)
        try:
            return _fit(run)
        finally:
            run.engine.close()  # vLLM tears down its process groups: before the trainer's
    finally:
        dist.close()


def _fit(run: _Run) -> dict:
    cfg, policy, algo, sampler, tracker, timings = run.cfg, run.policy, run.algo, run.sampler, run.tracker, run.timings
    main = dist.rank() == 0
    rank, world = dist.rank(), dist.world_size()

    def evaluate() -> dict:  # rank 0 evaluates with the whole model; the others wait
        with dist.gathered(policy):
            out = _evaluate(run.engine, run.tokenizer, run.eval_rows, run.score, cfg) if main else None
        return dist.broadcast(out)

    # ---- resume (optimizer, scheduler, data position, algorithm state, RNG) or start fresh ---------
    start, rng = 0, None
    if run.resume_dir:
        state, rng = load_training_checkpoint(run.resume_dir, run.optimizer, run.scheduler)
        start, results = state["step"], {"eval_before": state["eval_before"]}
        sampler.load_state(state["sampler"])
        algo.load_state_dict(state["algorithm"])
        tracker.load_state_dict(state["solve_tracker"])
        if main:
            truncate_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"), start)
        log.info("resuming from %s at step %d of %d", run.resume_dir, start, cfg.max_steps)
    elif main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        move_aside(cfg.output_dir)
    dist.barrier()
    logger = MetricsLogger(cfg.output_dir, cfg.report_to) if main else None
    if main:
        write_json_atomic(os.path.join(cfg.output_dir, "train_config.json"), vars(cfg))
    if not run.resume_dir:
        results = {"eval_before": evaluate()}
        log.info("no-hint evaluation before training: %s", _fmt(results["eval_before"]))
    sampling = SamplingConfig(n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                              max_new_tokens=cfg.max_new_tokens)
    engine = _TimedEngine(run.engine, timings)
    if cfg.vllm_importance_sampling_correction:
        engine = ISCorrectedEngine(engine, policy.lm, cfg)
    ctx = RolloutContext(engine=engine, tokenizer=run.tokenizer, sampling=sampling,
                         score=_timed(run.score, timings, "score"),
                         render=_renderer(run.prompts, run.tokenizer, cfg, timings), hints=run.hints,
                         next_rows=lambda: [run.rows[i] for i in next(sampler)])

    def save(step: int) -> None:
        state = {"step": step, "sampler": sampler.state(), "algorithm": algo.state_dict(),
                 "solve_tracker": tracker.state_dict(), "eval_before": results["eval_before"], "config": vars(cfg)}
        save_training_checkpoint(os.path.join(cfg.output_dir, f"checkpoint-{step}"), policy.lm, run.tokenizer,
                                 run.optimizer, run.scheduler, state, state_dict=_full_state(policy))
        if main:
            prune_checkpoints(cfg.output_dir, cfg.save_total_limit)

    if rng is not None:  # last, so that the next step draws exactly what the uninterrupted run drew
        restore_rng(*rng)
    bar = tqdm(range(start + 1, cfg.max_steps + 1), desc=cfg.algo, disable=not (cfg.progress_bar and main),
               dynamic_ncols=True, initial=start, total=cfg.max_steps)
    last: dict = {}
    try:
        for step in bar:
            t_step = time.perf_counter()
            timings.clear()
            batch = [run.rows[i] for i in next(sampler)][rank::world]  # whole prompts (groups) per rank
            with dist.gathered(policy):
                # ---- rollout (+ hints) and score: groups keyed by prompt uid ------------------------
                groups, info = algo.rollout(batch, ctx)
                # ---- advantages and training contexts (the algorithm decides) ----------------------
                policy.train()
                samples, info_train = algo.samples(groups, ctx, policy.lm)
            # ---- policy update ------------------------------------------------------------------------
            run.engine.sleep()  # vLLM sleep mode frees its memory; the sync below wakes it
            t0 = time.perf_counter()
            upd = train_step(policy, samples, cfg, run.optimizer, run.scheduler, run.ref_model)
            run.engine.update_weights(policy.lm)
            t_train = time.perf_counter() - t0
            # ---- metrics (over all ranks) and checkpoint ---------------------------------------------
            if world > 1:
                _sync_algo_state(algo, [r["uid"] for r in batch])
            last = {"step": step, **_step_metrics(groups, tracker, {**info, **info_train}, timings),
                    **upd, "lr": run.scheduler.get_last_lr()[0], "time/train_s": t_train}
            if isinstance(engine, ISCorrectedEngine):  # the sampler-trainer mismatch, measured at rollout
                last.update(merge_stats(dist.all_gather(engine.pop_stats())))
            last["time/step_s"] = time.perf_counter() - t_step
            last["tokens_per_s"] = last.pop("_completion_tokens") / last["time/step_s"]
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step < cfg.max_steps:  # the last: _finish
                last.update(evaluate())
            if main:
                logger.log(last)
            if cfg.save_steps and step % cfg.save_steps == 0:
                save(step)
            bar.set_postfix(reward=f"{last['reward/mean']:.3f}", acc=f"{last['accuracy']:.3f}",
                            hint=f"{last['hint/rate']:.2f}")
    finally:
        if logger is not None:
            logger.close()
    return _finish(run, results, last, evaluate, logger)


def _finish(run: _Run, results: dict, last: dict, evaluate: Callable, logger) -> dict:
    """No-hint evaluation after training, the final model, plot and eval.json (rank 0 writes)."""
    cfg = run.cfg
    results["eval_after"] = evaluate()
    run.close_scorer()
    log.info("no-hint evaluation after training: %s", _fmt(results["eval_after"]))
    final = os.path.join(cfg.output_dir, "final")
    sd = _full_state(run.policy)
    results.update(last=last, checkpoint=final, plot=None)
    if dist.rank() == 0:
        save_hf_checkpoint(run.policy.lm, run.tokenizer, final, state_dict=sd,
                           extra_json={"algorithm_state.json": {"algo": cfg.algo, **run.algo.state_dict(),
                                                                "solve_tracker": run.tracker.state_dict()}})
        data = f"the toy, levels {cfg.toy_levels}" if cfg.data == "toy" else os.path.basename(run.train_path)
        results["plot"] = plot_metrics(read_metrics(logger.path), os.path.join(cfg.output_dir, "training_curves.png"),
                                       title=f"{cfg.algo} on {data}",
                                       evals=(results["eval_before"], results["eval_after"]))
        write_json_atomic(os.path.join(cfg.output_dir, "eval.json"),
                          {k: results[k] for k in ("eval_before", "eval_after")})
        _print_table(results["eval_before"], results["eval_after"])
    dist.barrier()
    return results


def _full_state(policy: PolicyLoss) -> Optional[dict]:
    """None without FSDP (the model saves its own state); else the gathered full state (collective)."""
    return dist.full_state_dict(policy) if dist.world_size() > 1 else None


def _sync_algo_state(algo, local_uids: list[str]) -> None:
    """Per-prompt algorithm state (SAGE-light's levels) updated on the rank that owned each prompt
    this step, made the same on every rank."""
    state = algo.state_dict()
    mine = {k: {u: v[u] for u in local_uids if u in v} for k, v in state.items() if isinstance(v, dict)}
    for part in dist.all_gather(mine):
        for k, d in part.items():
            state[k].update(d)
    algo.load_state_dict(state)


SUMMED_INFO = ("hint/requested", "sampled_tokens", "hint/truncated")


def _step_metrics(groups: list, tracker: SolveTracker, info: dict, timings: dict) -> dict:
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
    rewards = torch.tensor([r for g in gs for r in g.rewards])
    out = {"reward/mean": rewards.mean().item() if len(rewards) else float("nan"),
           "reward/std": rewards.std().item() if len(rewards) > 1 else float("nan"),
           "accuracy": (rewards >= 1.0).float().mean().item() if len(rewards) else float("nan"),
           **group_metrics(gs), "prompts/never_solved": tracker.update(gs),
           "completion_len/mean": sum(lens) / len(lens), "completion_len/max": max(lens),
           "truncated_ratio": sum(truncs) / max(1, len(truncs)), "_completion_tokens": sum(lens),
           "time/generate_s": timings.get("generate", 0.0), "time/score_s": timings.get("score", 0.0),
           "time/hint_s": timings.get("hint", 0.0)}
    for k in dict.fromkeys(k for i in infos for k in i):
        vals = [i[k] for i in infos if k in i and isinstance(i[k], (int, float))]
        if not vals:
            continue
        if k == "hint/parse_fail":  # a share of requests: weighted by each rank's requests
            req = [i.get("hint/requested", 0) for i in infos if k in i]
            out[k] = sum(v * r for v, r in zip(vals, req)) / sum(req) if sum(req) else 0.0
        elif k.endswith(("min", "max")):
            out[k] = min(vals) if k.endswith("min") else max(vals)
        else:
            out[k] = sum(vals) if k in SUMMED_INFO else sum(vals) / len(vals)
    return out


def _fmt(m: dict) -> str:
    return " ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in m.items() if isinstance(v, float))


def _print_table(before: dict, after: dict) -> None:
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


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point: returns the exit status (2 for bad input, with one line on stderr)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        fit(parse_args(argv))
    except FastHintError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
