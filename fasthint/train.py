"""The training loop: ``torchrun --nproc_per_node=1 -m fasthint.train [--key value ...]``.

One flat loop with clear sections: rollout -> score -> advantages -> policy update -> metrics.
With no arguments it trains the embedded toy (a tiny Qwen2 warm-started on synthetic arithmetic)
with GRPO on CPU in a few minutes, evaluating without hints before and after.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import types
from typing import Callable, Optional

from fasthint.precheck import exit_on_bad_args

if __name__ == "__main__":  # python -m / torchrun -m: bad flags, files or folders are answered before torch loads
    exit_on_bad_args(sys.argv[1:])

import transformers

from fasthint import dist
from fasthint.algorithms import RolloutContext
from fasthint.build import RewardFn, Run, TimedEngine, build, evaluate_no_hint, renderer, timed
from fasthint.checkpoint import (
    load_training_checkpoint,
    move_aside,
    prune_checkpoints,
    restore_rng,
    save_hf_checkpoint,
    save_training_checkpoint,
    truncate_metrics,
    write_json_atomic,
)
from fasthint.config import TrainConfig, parse_args
from fasthint.engines.base import SamplingConfig
from fasthint.engines.correction import ISCorrectedEngine, merge_stats
from fasthint.errors import FastHintError
from fasthint.loss import PolicyLoss
from fasthint.metrics import MetricsLogger, plot_metrics, read_metrics, write_completions
from fasthint.reporting import (RunClock, StepProgress, completion_records, fmt, print_table, step_metrics,
                                sync_algo_state)
from fasthint.update import policy_update, train_step  # noqa: F401 - train_step: tests import it here

log = logging.getLogger("fasthint")


def fit(cfg: TrainConfig, reward_fn: Optional[RewardFn] = None, reward_funcs: Optional[list] = None) -> dict:
    """Trains with ``cfg``; returns the final metrics (incl. ``eval/...`` before and after).

    ``reward_funcs``: built-in names, ``module:function`` paths or callables with TRL's signature
    (``fasthint.reward_funcs``), replacing ``cfg.reward_funcs``. ``reward_fn(completion_text, row) ->
    float``, the original form, replaces both when given.
    """
    cfg.validate()
    clock = RunClock()
    try:
        run = build(cfg, reward_fn, reward_funcs)
        clock.since("build", clock.t0)
        try:
            return _fit(run, clock)
        finally:
            run.engine.close()  # vLLM tears down its process groups: before the trainer's
    finally:
        dist.close()


def _fit(run: Run, clock: RunClock) -> dict:
    cfg, policy, algo, sampler, tracker, timings = run.cfg, run.policy, run.algo, run.sampler, run.tracker, run.timings
    main = dist.rank() == 0
    rank, world = dist.rank(), dist.world_size()

    def evaluate() -> dict:  # each rank evaluates its share of the prompts (whole model unless vLLM samples)
        with clock.phase("evaluation"), dist.gathered(policy, enabled=getattr(run.engine, "runs_policy", True)):
            return evaluate_no_hint(run.engine, run.tokenizer, run.eval_rows, run.score, cfg)

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
    logger = MetricsLogger(cfg.output_dir, cfg.report_to, config=vars(cfg)) if main else None
    if main:
        write_json_atomic(os.path.join(cfg.output_dir, "train_config.json"), vars(cfg))
    if not run.resume_dir:
        results = {"eval_before": evaluate()}
        log.info("no-hint evaluation before training: %s", fmt(results["eval_before"]))
    sampling = SamplingConfig(n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                              max_new_tokens=cfg.max_new_tokens)
    engine = TimedEngine(run.engine, timings)
    if cfg.vllm_importance_sampling_correction:
        engine = ISCorrectedEngine(engine, policy.lm, cfg)
    ctx = RolloutContext(engine=engine, tokenizer=run.tokenizer, sampling=sampling,
                         score=timed(run.score, timings, "score"),
                         render=renderer(run.prompts, run.tokenizer, cfg, timings), hints=run.hints,
                         next_rows=lambda: [run.rows[i] for i in next(sampler)])

    @clock.phase("checkpoints")
    def save(step: int) -> None:
        state = {"step": step, "sampler": sampler.state(), "algorithm": algo.state_dict(),
                 "solve_tracker": tracker.state_dict(), "eval_before": results["eval_before"], "config": vars(cfg)}
        save_training_checkpoint(os.path.join(cfg.output_dir, f"checkpoint-{step}"), policy.lm, run.tokenizer,
                                 run.optimizer, run.scheduler, state, state_dict=_full_state(policy))
        if main:
            prune_checkpoints(cfg.output_dir, cfg.save_total_limit)

    if rng is not None:  # last, so that the next step draws exactly what the uninterrupted run drew
        restore_rng(*rng)
    # a bar on a terminal; in a log file a plain line every --logging_steps steps
    progress = StepProgress(start, cfg.max_steps, cfg.algo, enabled=cfg.progress_bar and main, every=cfg.logging_steps)
    last: dict = {}
    try:
        for step in progress:
            t_step = time.perf_counter()
            timings.clear()
            batch = [run.rows[i] for i in next(sampler)][rank::world]  # whole prompts (groups) per rank
            # the whole policy on every rank: for rollouts when the engine runs it (hf), else (vllm: its
            # own weights) only for an algorithm whose samples() runs it (Guide, HINT)
            with dist.gathered(policy, enabled=engine.runs_policy):
                # ---- rollout (+ hints) and score: groups keyed by prompt uid ------------------------
                groups, info = algo.rollout(batch, ctx)
                run.engine.sleep()  # vLLM sleep mode: freed before Guide/HINT forwards; the sync wakes it
                check = run.engine.due  # after a weight sync: does the engine sample from the trainer's weights?
                with dist.gathered(policy, enabled=not engine.runs_policy and (algo.samples_run_policy or check)):
                    info.update(run.engine.verify(policy.lm, step))
                    # ---- advantages and training contexts (the algorithm decides) ------------------
                    policy.train()
                    samples, info_train = algo.samples(groups, ctx, policy.lm)
            # ---- policy update ------------------------------------------------------------------------
            t0 = time.perf_counter()
            upd = policy_update(policy, samples, cfg, run.optimizer, run.scheduler, run.ref_model, algo.objective(),
                                algo.before_update)
            run.engine.update_weights(policy.lm)
            t_train = time.perf_counter() - t0
            # ---- metrics (over all ranks) and checkpoint ---------------------------------------------
            if world > 1:
                sync_algo_state(algo, [r["uid"] for r in batch])
            last = {"step": step, **step_metrics(groups, tracker, {**info, **info_train}, timings),
                    **upd, "lr": run.scheduler.get_last_lr()[0], "time/train_s": t_train,
                    "data/skipped_rows": run.skipped_rows}
            if isinstance(engine, ISCorrectedEngine):  # the sampler-trainer mismatch, measured at rollout
                last.update(merge_stats(dist.all_gather(engine.pop_stats())))
            if cfg.log_completions and step % cfg.logging_steps == 0:  # every rank's, written by rank 0
                records = [r for part in dist.all_gather(completion_records(groups, samples, run.tokenizer, step))
                           for r in part]
                if main:
                    write_completions(cfg.output_dir, step, records, cfg.num_completions_to_print)
            last["time/step_s"] = time.perf_counter() - t_step
            clock.step(last)
            last["tokens_per_s"] = last.pop("_completion_tokens") / last["time/step_s"]
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step < cfg.max_steps:  # the last: _finish
                last.update(evaluate())
            if main:
                logger.log(last)
            if cfg.save_steps and step % cfg.save_steps == 0:
                save(step)
            progress.update(step, last)
    finally:
        if logger is not None:
            logger.close()
    return _finish(run, results, last, evaluate, logger, clock)


def _finish(run: Run, results: dict, last: dict, evaluate: Callable, logger, clock: RunClock) -> dict:
    """No-hint evaluation after training, the final model, plot and eval.json (rank 0 writes)."""
    cfg = run.cfg
    results["eval_after"] = evaluate()
    run.close_scorer()
    log.info("no-hint evaluation after training: %s", fmt(results["eval_after"]))
    final = os.path.join(cfg.output_dir, "final")
    sd = _full_state(run.policy)
    results.update(last=last, checkpoint=final, plot=None)
    t0 = time.perf_counter()
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
        print_table(results["eval_before"], results["eval_after"])
    dist.barrier()
    clock.since("checkpoints", t0)
    if dist.rank() == 0:
        log.info(clock.summary())
    return results


def _full_state(policy: PolicyLoss) -> Optional[dict]:
    """None without FSDP (the model saves its own state); else the gathered full state (collective)."""
    return dist.full_state_dict(policy) if dist.world_size() > 1 else None


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point: returns the exit status (2 for bad input, with one line on stderr)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        fit(parse_args(argv))
    except FastHintError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


class _CallableModule(types.ModuleType):
    """``fasthint.train(config, reward_funcs=[...])`` is :func:`fit`: this module is callable, so the
    Python API and ``torchrun -m fasthint.train`` share one name."""

    def __call__(self, config: TrainConfig, reward_funcs: Optional[list] = None,
                 reward_fn: Optional[RewardFn] = None) -> dict:
        return fit(config, reward_fn, reward_funcs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    status = main()
    dist.exit_process(status)  # torchrun workers: no interpreter teardown (see there)
    sys.exit(status)
