"""Building a run: device and seeds, the checked inputs (``fasthint.preflight``), the model (sharded
over ranks), the rollout engine, reward, algorithm, hint provider and optimizer, plus the small
wrappers the loop uses to time engine calls and render hinted prompts."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from fasthint import dist
from fasthint.algorithms import REGISTRY, SolveTracker, make_algorithm
from fasthint.algorithms.hint_providers import make_hint_provider
from fasthint.config import TrainConfig
from fasthint.data import PromptSampler, render_prompt
from fasthint.engines import make_engine
from fasthint.engines.sync_check import SyncCheckedEngine
from fasthint.eval import evaluate_accuracy
from fasthint.loss import PolicyLoss
from fasthint.models import (
    load_model_config,
    load_policy,
    load_trainable_policy,
    resolve_attn_implementation,
    resolve_model_path,
    trainer_attention,
)
from fasthint.preflight import preflight
from fasthint.reward_funcs import Rewards
from fasthint.update import OptimConfig

RewardFn = Callable[[str, dict], float]


def setup(cfg: TrainConfig) -> torch.device:
    """Joins the process group under torchrun; seeds (model construction is the same on every rank)."""
    device = dist.init(cfg.dist_timeout_minutes)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return device


def evaluate_no_hint(engine, tokenizer, rows: list[dict], score, cfg: TrainConfig) -> dict:
    """No-hint greedy accuracy (and avg@k and pass@k of sampled completions) overall and per level;
    collective under torch.distributed (each rank evaluates its share, :func:`evaluate_accuracy`)."""
    if not rows:
        return {}
    kw = dict(max_new_tokens=cfg.max_new_tokens, prompt_template=cfg.prompt_format)
    out = evaluate_accuracy(engine, tokenizer, rows, score, **kw)
    if cfg.eval_samples:
        k = cfg.eval_samples
        sampled = evaluate_accuracy(engine, tokenizer, rows, score, temperature=cfg.temperature, n=k, seed=cfg.seed,
                                    **kw)
        out.update({key.replace("eval/accuracy", f"eval/avg@{k}"): v for key, v in sampled.items()
                    if key.startswith("eval/accuracy")})
        out.update({key: v for key, v in sampled.items() if key.startswith("eval/pass@")})
    return out


class TimedEngine:
    """The rollout engine, with its generate time added to ``timings[key]`` (when a key is given) and
    the number of tokens it generated to ``timings['sampled_tokens']``."""

    def __init__(self, engine, timings: dict, key: Optional[str] = "generate"):
        self.engine, self.timings, self.key = engine, timings, key
        self.runs_policy = getattr(engine, "runs_policy", True)

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


def timed(fn: Callable, timings: dict, key: str) -> Callable:
    def run(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
    return run


def renderer(prompts: dict, tokenizer, cfg: TrainConfig, timings: dict) -> Callable:
    """(row, hint) -> prompt ids; the no-hint prompts are rendered once, up front. A hinted prompt
    longer than ``max_prompt_length`` has its hint cut (by tokens) until it fits; counted in
    ``timings['hint_truncated']``."""
    def render(row: dict, hint: Optional[str]) -> list[int]:
        if hint is None:
            return prompts[row["uid"]]
        ids = render_prompt(tokenizer, row["question"], cfg.prompt_format, hint=hint)
        if len(ids) <= cfg.max_prompt_length:
            return ids
        timings["hint_truncated"] = timings.get("hint_truncated", 0) + 1
        hint_ids = tokenizer(hint, add_special_tokens=False)["input_ids"]
        keep = len(hint_ids) - (len(ids) - cfg.max_prompt_length)
        while True:  # token boundaries may merge differently after the cut: shrink until it fits
            text = tokenizer.decode(hint_ids[:max(0, keep)], skip_special_tokens=True)
            ids = render_prompt(tokenizer, row["question"], cfg.prompt_format, hint=text)
            if len(ids) <= cfg.max_prompt_length or keep <= 0:
                return ids
            keep -= len(ids) - cfg.max_prompt_length
    return render


def hint_provider(cfg: TrainConfig, algo, engine, tokenizer, timings: dict, verify=None):
    """The hint provider of a hinting algorithm (None for the others); its time goes to
    ``timings['hint']`` (self-hint generation included). ``verify``: the leak judge's math-verify
    (``Rewards.verifier``: in a worker, with a deadline)."""
    if algo.hint_provider_default is None:
        return None

    name = cfg.hint_provider  # its data column was checked by fasthint.preflight
    if name == "self":
        provider = make_hint_provider("self", engine=TimedEngine(engine, timings, key=None), tokenizer=tokenizer,
                                      temperature=cfg.hint_temperature, max_new_tokens=cfg.hint_max_new_tokens,
                                      max_prompt_length=cfg.hint_max_prompt_length, retries=cfg.hint_retries,
                                      chat_template=cfg.chat_template, chat_template_kwargs=cfg.chat_template_kwargs,
                                      verify=verify)
    else:
        provider = make_hint_provider(name, **({"verify": verify} if name == "solution" else {}))
    provider.hints = timed(provider.hints, timings, "hint")
    return provider


@dataclass
class Run:
    """What the loop works with, built once by :func:`build`."""

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
    skipped_rows: int = 0  # training rows left out by the data checks


def build(cfg: TrainConfig, reward_fn: Optional[RewardFn], reward_funcs: Optional[list] = None) -> Run:
    """Device, data, model (sharded over ranks), engine, reward, algorithm, optimizer. Everything that
    can be checked without weights is checked first (``fasthint.preflight``), before anything is
    built or written."""
    device = setup(cfg)
    pre = preflight(cfg, device, reward_fn, reward_funcs)  # every rank, in seconds: data, rewards, model config
    if dist.rank() != 0:  # rank 0 builds the toy model first
        dist.barrier()
    model_path = resolve_model_path(cfg.model, cfg.cache_dir, cfg.toy_seed, cfg.toy_warmstart_steps, cfg.toy_rebuild)
    if dist.rank() == 0:
        dist.barrier()
    resume_dir, rows = pre.resume_dir, pre.rows
    attn = pre.attn_implementation or trainer_attention(
        resolve_attn_implementation(cfg.attn_implementation, device, load_model_config(model_path)), cfg.padding_free)
    policy, tokenizer = load_trainable_policy(resume_dir or model_path, device, attn, cfg.gradient_checkpointing,
                                              bf16=cfg.bf16)
    model = policy.lm
    ref_model = None
    if cfg.beta > 0:
        ref_model, _ = load_policy(model_path, device, attn_implementation=attn,  # frozen: bf16 is enough
                                   dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
        ref_model.requires_grad_(False).eval()
    self_hints = REGISTRY[cfg.algo].hint_provider_default is not None and cfg.hint_provider == "self"
    longest = max(cfg.max_prompt_length + cfg.max_new_tokens,  # a hint request and its reply, when sent
                  cfg.hint_max_prompt_length + cfg.hint_max_new_tokens if self_hints else 0)
    engine = make_engine(cfg, model, tokenizer, resume_dir or model_path, seed=cfg.seed, max_model_len=longest)
    # engine/trainer agreement after the first weight sync (an engine with its own weights), or every one
    engine = SyncCheckedEngine(engine, cfg, every_sync=cfg.check_engine_sync,
                               first_sync=cfg.check_engine_sync or not getattr(engine, "runs_policy", True))
    torch.manual_seed(cfg.seed + 7919 * dist.rank())  # each rank samples its own completions (after vLLM seeds)
    score = Rewards(pre.reward_funcs, cfg, tokenizer, cfg.max_new_tokens)
    algo = make_algorithm(cfg)
    timings: dict = {}
    hints = hint_provider(cfg, algo, engine, tokenizer, timings, verify=score.verifier())
    optimizer, scheduler = OptimConfig.build(cfg, policy.parameters(),
                                             cfg.max_steps * cfg.steps_per_generation * cfg.num_iterations)
    return Run(cfg, rows, pre.eval_rows, pre.train_path, model_path, resume_dir, policy, tokenizer, ref_model,
                engine, score, score.close, algo, hints, optimizer, scheduler,
                PromptSampler(len(rows), cfg.prompts_per_step, cfg.seed),
                pre.prompts, timings, skipped_rows=pre.skipped_rows)
