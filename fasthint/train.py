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
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from fasthint import ops
from fasthint.algorithms import RolloutContext, SolveTracker, group_metrics, make_algorithm
from fasthint.batch import Sample, make_micro_batches
from fasthint.config import TrainConfig, parse_args
from fasthint.data import PromptSampler, load_dataset, render_prompt
from fasthint.engines.base import SamplingConfig
from fasthint.engines.hf import HFEngine
from fasthint.errors import ConfigError, DataError, FastHintError
from fasthint.eval import evaluate_accuracy
from fasthint.hints import hinted_question
from fasthint.metrics import MetricsLogger, plot_metrics, read_metrics
from fasthint.models import load_policy, resolve_model_path
from fasthint.checkpoint import (find_resume, load_training_checkpoint, move_aside, prune_checkpoints, restore_rng,
                                 save_hf_checkpoint, save_training_checkpoint, truncate_metrics, write_json_atomic)

log = logging.getLogger("fasthint")

RewardFn = Callable[[str, dict], float]


def _setup(cfg: TrainConfig) -> torch.device:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("multi-process training is not available yet: run torchrun with --nproc_per_node=1")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _data_paths(cfg: TrainConfig) -> tuple[str, Optional[str]]:
    if cfg.data == "toy" or cfg.eval_data == "toy":
        from fasthint.toy.task import ensure_toy_data

        toy_train, toy_eval = ensure_toy_data(cfg.cache_dir, cfg.seed, cfg.toy_train_size)
    train = toy_train if cfg.data == "toy" else cfg.data
    evals = toy_eval if cfg.eval_data == "toy" else (cfg.eval_data or None)
    return train, evals


def _spread(rows: list[dict], k: int) -> list[dict]:
    """At most ``k`` rows spread evenly over the file (keeps every level of a sorted file)."""
    return rows if len(rows) <= k else [rows[i * len(rows) // k] for i in range(k)]


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
    """No-hint greedy accuracy (and avg@k of sampled completions) overall and per level."""
    if not rows:
        return {}
    kw = dict(max_new_tokens=cfg.max_new_tokens, prompt_template=cfg.prompt_template)
    out = evaluate_accuracy(engine, tokenizer, rows, score, **kw)
    if cfg.eval_samples:
        k = cfg.eval_samples
        sampled = evaluate_accuracy(engine, tokenizer, rows, score, temperature=cfg.temperature, n=k, **kw)
        out.update({key.replace("eval/accuracy", f"eval/avg@{k}"): v for key, v in sampled.items()
                    if key.startswith("eval/accuracy")})
    return out


def _check_head(model, tokenizer, device) -> None:
    """The fused loss needs logits == lm_head(last hidden state); refuse models that differ."""
    ids = torch.tensor([render_prompt(tokenizer, "1+1=?")[:32]], device=device)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        head = model.get_output_embeddings()
        ref = head(out.hidden_states[-1]).float()
    if not torch.allclose(out.logits.float(), ref, atol=1e-3, rtol=1e-3):
        raise FastHintError("this model's logits are not lm_head(last hidden state) (logit scaling or "
                            "soft-capping?): it is not supported by the fused loss yet")


def train_step(model, samples: list[Sample], cfg: TrainConfig, optimizer, scheduler, ref_model=None) -> dict:
    """One optimizer step over ``samples`` with gradient accumulation and a global normaliser.

    Without KL, a sample whose advantage (or weight) is 0 adds exactly nothing to the loss or its
    gradient, so it is skipped (it still counts in the normaliser); token metrics (entropy, clip
    ratios, log-prob mismatch) are then over the trained tokens.
    """
    base = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    if cfg.mask_truncated:  # overlong masking: no loss, and not in the normaliser
        samples = [s for s in samples if not s.truncated]
    n_tokens = sum(len(s.completion_ids) for s in samples)
    norm = n_tokens if cfg.loss_agg == "token-mean" else len(samples) * cfg.max_new_tokens
    num_seqs = len(samples)
    if ref_model is None:
        samples = [s for s in samples if s.advantage != 0.0 and s.weight != 0.0]
    mbs = make_micro_batches(samples, cfg.micro_batch_size, model.config.pad_token_id or 0,
                             device=next(model.parameters()).device)
    n_trained = sum(len(s.completion_ids) for s in samples)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.dtype != "float32" and
                              next(model.parameters()).is_cuda)
    acc = {"loss": 0.0, "clip_ratio/low": 0.0, "clip_ratio/high": 0.0, "entropy": 0.0, "kl": 0.0,
           "logp_diff_sum": 0.0, "logp_diff_max": 0.0}
    optimizer.zero_grad(set_to_none=True)
    for mb in mbs:
        with autocast:
            hidden = base(input_ids=mb.input_ids, attention_mask=mb.attention_mask).last_hidden_state
        h = hidden.flatten(0, 1).index_select(0, mb.score_index)
        ref_logp = None
        if ref_model is not None:
            with torch.no_grad(), autocast:
                rh = getattr(ref_model, ref_model.base_model_prefix)(
                    input_ids=mb.input_ids, attention_mask=mb.attention_mask).last_hidden_state
                rhead = ref_model.get_output_embeddings()
                ref_logp = ops.linear_logprobs(rh.flatten(0, 1).index_select(0, mb.score_index), rhead.weight,
                                               mb.targets, bias=rhead.bias, temperature=cfg.temperature)
        mask = torch.ones_like(mb.old_logp)  # the packed stream holds completion tokens only
        loss, stats = ops.fused_policy_loss(
            h, head.weight, mb.targets, mb.advantages, mask, mb.old_logp, bias=head.bias,
            temperature=cfg.temperature, return_entropy=True, ref_logp=ref_logp, beta=cfg.beta,
            eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip, loss_agg=cfg.loss_agg,
            num_tokens=norm, seq_ids=mb.seq_ids, num_seqs=num_seqs, seq_weights=mb.weights,
            shaped_gamma=mb.gamma)
        logp, entropy = stats["logp"], stats["entropy"]
        if not torch.isfinite(loss):
            raise FastHintError("the loss is not finite (NaN/inf): lower --learning_rate or check the "
                                "rewards; nothing was updated at this step")
        loss.backward()
        k = logp.numel()
        acc["loss"] += loss.item()
        for key in ("clip_ratio/low", "clip_ratio/high", "kl"):
            acc[key] += stats[key].item() * k
        acc["entropy"] += entropy.sum().item()
        diff = (logp - mb.old_logp).abs()
        acc["logp_diff_sum"] += diff.sum().item()
        acc["logp_diff_max"] = max(acc["logp_diff_max"], diff.max().item() if k else 0.0)
    params = [p for p in model.parameters() if p.grad is not None]
    gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")) \
        if params else torch.zeros(())
    if not torch.isfinite(gn):
        optimizer.zero_grad(set_to_none=True)
        raise FastHintError("the gradient norm is not finite: lower --learning_rate; nothing was updated")
    optimizer.step()  # a no-op when every advantage was 0 (no parameter has a gradient)
    scheduler.step()
    n = n_trained or float("nan")
    out = {"loss": acc["loss"], "grad_norm": gn.item(), "entropy": acc["entropy"] / n,
           "clip_ratio/low": acc["clip_ratio/low"] / n, "clip_ratio/high": acc["clip_ratio/high"] / n,
           "sampling/logp_diff/mean": acc["logp_diff_sum"] / n, "sampling/logp_diff/max": acc["logp_diff_max"],
           "num_tokens/trained": n_trained}
    if ref_model is not None:
        out["kl"] = acc["kl"] / n
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


def _hint_provider(cfg: TrainConfig, algo, rows: list[dict], engine, tokenizer, timings: dict):
    """The hint provider of a hinting algorithm (None for the others), after checking the data has
    what it needs; its time goes to ``timings['hint']`` (self-hint generation included)."""
    if algo.hint_provider_default is None:
        return None
    from fasthint.algorithms.hint_providers import make_hint_provider

    name = cfg.hint_provider
    column = {"self": "solution", "solution": "solution", "dataset": "hint"}[name]
    if not any(str(r.get(column) or "").strip() for r in rows):
        fix = "use --hint_provider self or solution" if name == "dataset" else \
            "add a 'solution' column (reference solutions) or use --hint_provider dataset"
        raise DataError(f"--algo {cfg.algo} with --hint_provider {name} needs a '{column}' column in the "
                        f"training data, and none of its rows has one: {fix}")
    if name == "self":
        provider = make_hint_provider("self", engine=_TimedEngine(engine, timings, key=None), tokenizer=tokenizer, template=cfg.prompt_template,
                                      temperature=cfg.hint_temperature, max_new_tokens=cfg.hint_max_new_tokens,
                                      max_prompt_length=cfg.max_prompt_length)
    else:
        provider = make_hint_provider(name)
    provider.hints = _timed(provider.hints, timings, "hint")
    return provider


def fit(cfg: TrainConfig, reward_fn: Optional[RewardFn] = None) -> dict:
    """Trains with ``cfg``; returns the final metrics (incl. ``eval/...`` before and after).

    ``reward_fn(completion_text, row) -> float`` replaces the math verifier when given.
    """
    cfg.validate()
    # ---- setup: device, model, data, engine, optimizer ------------------------------------------
    device = _setup(cfg)
    train_path, eval_path = _data_paths(cfg)
    rows = load_dataset(train_path)
    eval_rows = _spread(load_dataset(eval_path), cfg.eval_max_prompts) if eval_path else []
    resume_dir = find_resume(cfg)  # checks a requested checkpoint (and its settings) before any work
    model_path = resolve_model_path(cfg.model, cfg.cache_dir, cfg.seed, cfg.toy_warmstart_steps)
    model, tokenizer = load_policy(resume_dir or model_path, device)
    _check_head(model, tokenizer, device)
    prompts = {r["uid"]: render_prompt(tokenizer, r["question"], cfg.prompt_template) for r in rows}
    too_long = [u for u, p in prompts.items() if len(p) > cfg.max_prompt_length]
    if too_long:
        raise DataError(f"{train_path}: {len(too_long)} prompts (first uid {too_long[0]}) are longer than "
                        f"--max_prompt_length {cfg.max_prompt_length}: raise it or drop those rows")
    ref_model = None
    if cfg.beta > 0:
        ref_model, _ = load_policy(model_path, device)
        ref_model.requires_grad_(False).eval()
    engine = HFEngine(model, tokenizer, batch_size=cfg.generation_batch_size)
    score, close_scorer = _reward_batch(cfg, reward_fn)
    algo = make_algorithm(cfg)
    timings: dict = {}
    hints = _hint_provider(cfg, algo, rows, engine, tokenizer, timings)  # checks the data before any work
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    sampler = PromptSampler(len(rows), cfg.prompts_per_step, cfg.seed)
    tracker = SolveTracker()
    os.makedirs(cfg.output_dir, exist_ok=True)
    sampling = SamplingConfig(n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                              max_new_tokens=cfg.max_new_tokens)

    def evaluate() -> dict:
        return _evaluate(engine, tokenizer, eval_rows, score, cfg)

    # ---- resume (optimizer, scheduler, data position, algorithm state, RNG) or start fresh ------------
    start, rng = 0, None
    if resume_dir:
        state, rng = load_training_checkpoint(resume_dir, optimizer, scheduler)
        start, results = state["step"], {"eval_before": state["eval_before"]}
        sampler.load_state(state["sampler"])
        algo.load_state_dict(state["algorithm"])
        tracker.load_state_dict(state["solve_tracker"])
        truncate_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"), start)
        log.info("resuming from %s at step %d of %d", resume_dir, start, cfg.max_steps)
    else:
        move_aside(cfg.output_dir)
    logger = MetricsLogger(cfg.output_dir, cfg.report_to)
    write_json_atomic(os.path.join(cfg.output_dir, "train_config.json"), vars(cfg))
    if not resume_dir:
        results = {"eval_before": evaluate()}
        log.info("no-hint evaluation before training: %s", _fmt(results["eval_before"]))
    ctx = RolloutContext(engine=_TimedEngine(engine, timings), tokenizer=tokenizer, sampling=sampling,
                         score=_timed(score, timings, "score"), render=_renderer(prompts, tokenizer, cfg, timings),
                         hints=hints,
                         next_rows=lambda: [rows[i] for i in next(sampler)])

    def save(step: int) -> None:
        state = {"step": step, "sampler": sampler.state(), "algorithm": algo.state_dict(),
                 "solve_tracker": tracker.state_dict(), "eval_before": results["eval_before"], "config": vars(cfg)}
        save_training_checkpoint(os.path.join(cfg.output_dir, f"checkpoint-{step}"), model, tokenizer, optimizer,
                                 scheduler, state)
        prune_checkpoints(cfg.output_dir, cfg.save_total_limit)

    if rng is not None:  # last, so that the next step draws exactly what the uninterrupted run drew
        restore_rng(*rng)
    bar = tqdm(range(start + 1, cfg.max_steps + 1), desc=cfg.algo, disable=not cfg.progress_bar, dynamic_ncols=True,
               initial=start, total=cfg.max_steps)
    last: dict = {}
    try:
        for step in bar:
            t_step = time.perf_counter()
            timings.clear()
            # ---- rollout (+ hints) and score: groups keyed by prompt uid ----------------------------
            groups, info = algo.rollout([rows[i] for i in next(sampler)], ctx)
            # ---- advantages and training contexts (the algorithm decides) --------------------------
            model.train()
            samples, info_train = algo.samples(groups, ctx, model)
            # ---- policy update --------------------------------------------------------------------
            t0 = time.perf_counter()
            upd = train_step(model, samples, cfg, optimizer, scheduler, ref_model)
            engine.update_weights(model)
            t_train = time.perf_counter() - t0
            # ---- metrics --------------------------------------------------------------------------
            rewards = torch.tensor([r for g in groups for r in g.rewards])
            comps = [c for g in groups for c in g.completions]
            lens = [len(c.token_ids) for c in comps] or [0]
            t_all = time.perf_counter() - t_step
            last = {"step": step, "reward/mean": rewards.mean().item() if len(rewards) else float("nan"),
                    "reward/std": rewards.std().item() if len(rewards) > 1 else float("nan"),
                    "accuracy": (rewards >= 1.0).float().mean().item() if len(rewards) else float("nan"),
                    **group_metrics(groups), "prompts/never_solved": tracker.update(groups),
                    "completion_len/mean": sum(lens) / len(lens), "completion_len/max": max(lens),
                    "truncated_ratio": sum(c.truncated for c in comps) / max(1, len(comps)), **upd, **info,
                    **info_train, "lr": scheduler.get_last_lr()[0],
                    "time/generate_s": timings.get("generate", 0.0), "time/score_s": timings.get("score", 0.0),
                    "time/hint_s": timings.get("hint", 0.0), "time/train_s": t_train, "time/step_s": t_all,
                    "tokens_per_s": sum(lens) / t_all, "sampled_tokens": timings.get("sampled_tokens", 0),
                    "hint/truncated": timings.get("hint_truncated", 0)}
            logger.log(last)
            if cfg.save_steps and step % cfg.save_steps == 0:
                save(step)
            bar.set_postfix(reward=f"{last['reward/mean']:.3f}", acc=f"{last['accuracy']:.3f}",
                            hint=f"{last['hint/rate']:.2f}")
    finally:
        logger.close()
    # ---- evaluate, save, plot ---------------------------------------------------------------------
    results["eval_after"] = evaluate()
    close_scorer()
    log.info("no-hint evaluation after training: %s", _fmt(results["eval_after"]))
    save_hf_checkpoint(model, tokenizer, os.path.join(cfg.output_dir, "final"),
                       extra_json={"algorithm_state.json": {"algo": cfg.algo, **algo.state_dict(),
                                                            "solve_tracker": tracker.state_dict()}})
    plot = plot_metrics(read_metrics(logger.path), os.path.join(cfg.output_dir, "training_curves.png"),
                        title=f"{cfg.algo} on {os.path.basename(train_path)}")
    results.update(last=last, checkpoint=os.path.join(cfg.output_dir, "final"), plot=plot)
    write_json_atomic(os.path.join(cfg.output_dir, "eval.json"),
                      {k: results[k] for k in ("eval_before", "eval_after")})
    _print_table(results["eval_before"], results["eval_after"])
    return results


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
