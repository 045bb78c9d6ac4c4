"""Training configuration: one typed dataclass, CLI ``--key value`` overrides and an optional YAML file.

Precedence: defaults < ``--config file.yaml`` < command-line flags. Underscores are canonical in
flag names; dashes are accepted (``--max-steps`` == ``--max_steps``). Every value is validated once,
in :meth:`TrainConfig.validate`, with a message that names the fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from fasthint.errors import ConfigError

ALGOS = ("grpo", "dapo", "dr_grpo", "sage", "sage_light", "guide", "hint")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ADV_SCALES = ("group", "batch", "none")
HINT_PROVIDERS = ("auto", "self", "dataset", "solution")
AFFINITY_RATIOS = ("sampling", "training")
SAGE_ESCALATIONS = ("parallel", "sequential")
DTYPES = ("auto", "float32", "bfloat16")
REPORT_TO = ("none", "tensorboard")
ENGINES = ("hf", "vllm")
IS_LEVELS = ("token", "sequence")


def _f(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything one training run needs. Defaults train the embedded toy in a few minutes on CPU."""

    # --- model and data -------------------------------------------------------------------------
    model: str = _f("toy", "HF checkpoint directory (or hub id where the hub is reachable); "
                           "'toy' builds and warm-starts the embedded tiny Qwen2 model (cached).")
    data: str = _f("toy", "training set: JSONL or Parquet with question|problem, answer, optional "
                          "solution and hint columns; 'toy' generates the synthetic arithmetic set.")
    eval_data: str = _f("toy", "no-hint evaluation set run before and after training "
                               "('toy' = held-out toy problems; '' = skip).")
    prompt_template: str = _f("{question}", "user-turn text; {question} is replaced by the question "
                                            "(e.g. add 'put your final answer within \\boxed{}').")
    output_dir: str = _f("outputs/default", "where metrics.jsonl, the plot and the final checkpoint go.")
    cache_dir: str = _f("~/.cache/fasthint", "cache for the toy model, tokenizer, data and warm start.")
    seed: int = _f(0, "random seed (data order, sampling, toy construction).")

    # --- algorithm ------------------------------------------------------------------------------
    algo: str = _f("grpo", f"training algorithm, one of {ALGOS}.")
    prompts_per_step: int = _f(64, "prompts per optimizer step (each gets num_generations completions).")
    num_generations: int = _f(8, "completions per prompt: the group size G.")
    max_steps: int = _f(100, "optimizer steps.")
    adv_scale: str = _f("auto", f"advantage scaling, one of {ADV_SCALES}; auto = 'none' for dr_grpo, "
                                "else 'group'.")
    adv_eps: float = _f(1e-6, "epsilon added to the std in the advantage.")
    loss_agg: str = _f("auto", f"loss aggregation, one of {LOSS_AGGS}; auto = "
                               "'seq-mean-token-sum-norm' for dr_grpo, else 'token-mean'.")
    eps_low: float = _f(0.2, "lower clip range: ratio >= 1 - eps_low.")
    eps_high: float = _f(0.28, "upper clip range: ratio <= 1 + eps_high (DAPO clip-higher).")
    dual_clip: Optional[float] = _f(None, "dual-clip constant c (e.g. 3.0) for negative advantages; "
                                          "unset = off.")
    beta: float = _f(0.0, "k3 KL coefficient to a frozen reference model; 0 loads no reference.")
    mask_truncated: Optional[bool] = _f(None, "give truncated completions no loss (DAPO's overlong "
                                              "masking); unset = on for dapo only.")
    dapo_max_rounds: int = _f(3, "dapo: sampling rounds per step to fill the batch with groups whose "
                                 "rewards differ.")

    # --- hints (sage, sage_light, guide, hint) ----------------------------------------------------
    hint_provider: str = _f("auto", f"who writes hints, one of {HINT_PROVIDERS}: self = the policy from "
                                    "the question and reference solution (SAGE), dataset = the data's hint "
                                    "column, solution = reference-solution prefixes; auto = self for sage/"
                                    "sage_light, dataset for guide/hint.")
    hint_temperature: float = _f(1.0, "sampling temperature of self-written hints (0 = greedy).")
    hint_max_new_tokens: int = _f(128, "maximum length of a self-written hint answer (JSON).")
    hint_level: int = _f(2, "guide/hint: the hint strength (1-3) of a multi-level provider.")
    sage_escalation: str = _f("parallel", f"sage: how unresolved prompts climb the hint levels, one of "
                                          f"{SAGE_ESCALATIONS}: parallel = all levels in one engine call, "
                                          "keeping the lowest that succeeds (same groups, one round); "
                                          "sequential = one call per level (fewest samples).")
    sage_light_min_acc: float = _f(0.1, "sage_light: previous accuracy <= this raises the prompt's level.")
    sage_light_max_acc: float = _f(0.35, "sage_light: previous accuracy > this lowers the prompt's level.")
    guide_filter: bool = _f(True, "guide: drop groups whose rewards stay all 0 or all 1 after hinting.")
    aapo_lambda: float = _f(1.0, "hint: AAPO weights a hinted group's loss by Affinity ** lambda "
                                 "(0 = off).")
    affinity_ratio: str = _f("sampling", f"hint: ratio Affinity is computed from, one of {AFFINITY_RATIOS}.")

    # --- rollouts -------------------------------------------------------------------------------
    temperature: float = _f(1.0, "sampling temperature of training rollouts (also used by the loss).")
    top_p: float = _f(1.0, "nucleus sampling of training rollouts; keep 1.0 so that sampling and "
                           "training log-probs agree.")
    max_prompt_length: int = _f(512, "prompts longer than this (in tokens) are a data error.")
    max_new_tokens: int = _f(64, "maximum completion length; longer completions are truncated.")
    generation_batch_size: int = _f(256, "sequences per generate call of the HF engine.")
    engine: str = _f("hf", f"rollout engine, one of {ENGINES}: hf = the trainer's own module (no weight "
                           "copy); vllm = an in-process vLLM engine fed the weights after every step "
                           "(pip extra 'vllm'; one engine per rank under torchrun).")
    vllm_gpu_memory_utilization: float = _f(0.5, "vllm: share of GPU memory for the engine's weights and "
                                                  "KV cache.")
    vllm_sleep_mode: bool = _f(False, "vllm: free the engine's GPU memory during each policy update.")
    vllm_importance_sampling_correction: bool = _f(
        False, "vllm: re-score each rollout with the trainer (one no-grad forward) and weight each token's "
               "loss by the truncated ratio trainer/sampler (TIS); metrics sampling/is_ratio/*.")
    vllm_importance_sampling_level: str = _f("token", f"vllm: TIS ratio per token or per sequence, one of {IS_LEVELS}.")
    vllm_importance_sampling_cap: float = _f(2.0, "vllm: TIS truncation C (weights are min(ratio, C)).")

    # --- optimisation ---------------------------------------------------------------------------
    learning_rate: float = _f(2e-4, "AdamW learning rate (constant after warm-up); the default suits "
                                    "the toy: for real models use about 1e-6.")
    warmup_steps: int = _f(0, "linear learning-rate warm-up steps.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.99, "AdamW beta2.")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off).")
    micro_batch_size: int = _f(64, "sequences per forward/backward; gradients are accumulated.")
    micro_batch_tokens: int = _f(0, "also cap each forward/backward at this many padded tokens (sequences x "
                                    "longest), so long and short rollouts use memory alike (0 = no cap).")
    attn_implementation: str = _f("auto", "attention kernel of the trainer's model: auto = flash_attention_2 "
                                          "when flash-attn is importable on CUDA, else sdpa; or any value "
                                          "transformers accepts.")
    dtype: str = _f("auto", f"compute dtype, one of {DTYPES}; auto = bfloat16 autocast on CUDA, "
                            "float32 on CPU.")

    # --- checkpoints ----------------------------------------------------------------------------
    save_steps: int = _f(25, "write a resumable checkpoint (model, optimizer, scheduler, RNG, data "
                             "position, algorithm state) to OUTPUT_DIR/checkpoint-N every N steps "
                             "(0 = only the final model).")
    save_total_limit: int = _f(2, "keep the newest N step checkpoints (0 = all).")
    resume: str = _f("auto", "auto = continue from the newest complete checkpoint in output_dir when "
                             "there is one; a checkpoint-N path = continue from it; none = start fresh "
                             "(earlier checkpoints and metrics are moved aside, never deleted).")

    # --- evaluation, logging, system -------------------------------------------------------------
    eval_max_prompts: int = _f(400, "at most this many evaluation prompts (no hints).")
    eval_samples: int = _f(4, "besides greedy accuracy, report avg@k over this many completions "
                              "sampled at the training temperature (0 = greedy only).")
    eval_steps: int = _f(0, "also evaluate every N steps (0 = only before and after training); the "
                            "eval/... metrics go into that step's metrics row.")
    report_to: str = _f("none", f"extra metric sink, one of {REPORT_TO}; metrics.jsonl is always written.")
    progress_bar: bool = _f(True, "show a progress bar with reward and accuracy.")
    num_threads: int = _f(0, "torch CPU threads (0 = torch's default: one per physical core).")
    reward_timeout_s: float = _f(5.0, "per-completion time limit of the math verifier.")

    # --- toy --------------------------------------------------------------------------------------
    toy_train_size: int = _f(4000, "toy training problems (uniform over --toy_levels).")
    toy_levels: str = _f("1,2", "toy training levels, comma-separated from 1-4 (the held-out evaluation always "
                                "covers all four); the default keeps the levels GRPO can learn in a short run: "
                                "use 1,2,3,4 for the hard prompts hints are for.")
    toy_warmstart_steps: int = _f(1000, "supervised warm-start steps (1024 tokens each) of the toy model; "
                                        "cached by value.")

    @property
    def toy_level_tuple(self) -> tuple[int, ...]:
        """``toy_levels`` as sorted ints."""
        return tuple(sorted(int(x) for x in str(self.toy_levels).split(",")))

    def validate(self) -> "TrainConfig":
        """Checks every value once; raises ConfigError naming the option and the fix."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.algo in ALGOS, f"--algo {self.algo!r} is not known: use one of {', '.join(ALGOS)}")
        if self.adv_scale == "auto":  # resolved once, so train_config.json records what ran
            self.adv_scale = "none" if self.algo == "dr_grpo" else "group"
        if self.loss_agg == "auto":
            self.loss_agg = "seq-mean-token-sum-norm" if self.algo == "dr_grpo" else "token-mean"
        if self.mask_truncated is None:
            self.mask_truncated = self.algo == "dapo"
        if self.hint_provider == "auto":
            self.hint_provider = {"sage": "self", "sage_light": "self"}.get(self.algo, "dataset")
        need(self.loss_agg in LOSS_AGGS, f"--loss_agg {self.loss_agg!r}: use one of {', '.join(LOSS_AGGS)}")
        need(self.adv_scale in ADV_SCALES, f"--adv_scale {self.adv_scale!r}: use one of {', '.join(ADV_SCALES)}")
        need(self.hint_provider in HINT_PROVIDERS,
             f"--hint_provider {self.hint_provider!r}: use one of {', '.join(HINT_PROVIDERS)}")
        need(self.sage_escalation in SAGE_ESCALATIONS,
             f"--sage_escalation {self.sage_escalation!r}: use one of {', '.join(SAGE_ESCALATIONS)}")
        need(self.affinity_ratio in AFFINITY_RATIOS,
             f"--affinity_ratio {self.affinity_ratio!r}: use one of {', '.join(AFFINITY_RATIOS)}")
        need(1 <= self.hint_level <= 3, f"--hint_level must be 1, 2 or 3 (got {self.hint_level})")
        need(0 <= self.sage_light_min_acc <= self.sage_light_max_acc <= 1,
             "--sage_light_min_acc/--sage_light_max_acc: need 0 <= min <= max <= 1 (defaults 0.1 and 0.35)")
        need(self.hint_temperature >= 0, f"--hint_temperature must be >= 0 (got {self.hint_temperature})")
        need(self.aapo_lambda >= 0, f"--aapo_lambda must be >= 0 (got {self.aapo_lambda})")
        need(self.dtype in DTYPES, f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        need(self.engine in ENGINES, f"--engine {self.engine!r}: use one of {', '.join(ENGINES)}")
        need(0 < self.vllm_gpu_memory_utilization <= 1,
             f"--vllm_gpu_memory_utilization must be in (0, 1] (got {self.vllm_gpu_memory_utilization})")
        need(self.vllm_importance_sampling_level in IS_LEVELS,
             f"--vllm_importance_sampling_level {self.vllm_importance_sampling_level!r}: use one of "
             f"{', '.join(IS_LEVELS)}")
        need(self.vllm_importance_sampling_cap >= 1,
             f"--vllm_importance_sampling_cap must be >= 1 (got {self.vllm_importance_sampling_cap})")
        need(self.engine == "vllm" or not self.vllm_importance_sampling_correction,
             "--vllm_importance_sampling_correction needs --engine vllm (the hf engine samples with the "
             "trainer's own weights)")
        need(self.report_to in REPORT_TO, f"--report_to {self.report_to!r}: use one of {', '.join(REPORT_TO)}")
        for name in ("prompts_per_step", "num_generations", "max_steps", "max_new_tokens",
                     "max_prompt_length", "micro_batch_size", "generation_batch_size", "dapo_max_rounds",
                     "hint_max_new_tokens",
                     "eval_max_prompts", "toy_train_size"):
            need(getattr(self, name) >= 1, f"--{name} must be >= 1 (got {getattr(self, name)})")
        need(bool(self.resume), "--resume must be auto, none or a checkpoint directory")
        for name in ("warmup_steps", "toy_warmstart_steps", "num_threads", "eval_samples", "save_steps",
                     "save_total_limit", "micro_batch_tokens", "eval_steps"):
            need(getattr(self, name) >= 0, f"--{name} must be >= 0 (got {getattr(self, name)})")
        need(self.num_generations >= 2 or self.adv_scale == "none",
             f"--num_generations {self.num_generations}: GRPO needs groups of at least 2 completions")
        need(self.temperature > 0, f"--temperature must be > 0 (got {self.temperature})")
        need(0 < self.top_p <= 1, f"--top_p must be in (0, 1] (got {self.top_p})")
        need(self.learning_rate > 0, f"--learning_rate must be > 0 (got {self.learning_rate})")
        need(0 <= self.eps_low < 1, f"--eps_low must be in [0, 1) (got {self.eps_low})")
        need(self.eps_high >= 0, f"--eps_high must be >= 0 (got {self.eps_high})")
        need(self.dual_clip is None or self.dual_clip > 1,
             f"--dual_clip must be > 1 (e.g. 3.0) or unset (got {self.dual_clip})")
        need(self.beta >= 0, f"--beta must be >= 0 (got {self.beta})")
        need(self.adv_eps > 0, f"--adv_eps must be > 0 (got {self.adv_eps})")
        need(self.max_grad_norm >= 0, f"--max_grad_norm must be >= 0 (got {self.max_grad_norm})")
        need(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "--adam_beta1/2 must be in [0, 1)")
        need(self.reward_timeout_s > 0, f"--reward_timeout_s must be > 0 (got {self.reward_timeout_s})")
        need(bool(self.output_dir), "--output_dir must not be empty")
        levels = [x.strip() for x in str(self.toy_levels).split(",")]
        need(all(x in ("1", "2", "3", "4") for x in levels) and len(set(levels)) == len(levels),
             f"--toy_levels {self.toy_levels!r}: give distinct levels from 1-4, comma-separated (e.g. 1,2,3,4)")
        need("{question}" in self.prompt_template,
             f"--prompt_template must contain {{question}} (got {self.prompt_template!r})")
        return self


def _field_type(f: dataclasses.Field, cls: type = None) -> type:
    hints = typing.get_type_hints(cls or TrainConfig)
    t = hints[f.name]
    if typing.get_origin(t) is typing.Union:  # Optional[X]
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _coerce(name: str, value: Any, t: type) -> Any:
    """Converts a CLI string or YAML value to the field's type, or raises ConfigError."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and t is not str):
        return None
    try:
        if t is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if t is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, bool):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if t is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name} expects {t.__name__}, got {value!r}: pass a value of type {t.__name__}") from None


def _load_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found: pass an existing YAML file to --config")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"config file {path!r} is not valid YAML ({first}): fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of option: value")
    return data


TRAIN_CLI = ("python -m fasthint.train", "Train a policy with GRPO-family RL on verifiable math rewards. "
                                         "With no arguments: the embedded toy run (no download).")


def build_parser(cls: type = None, cli: tuple[str, str] = TRAIN_CLI) -> argparse.ArgumentParser:
    """The CLI of config dataclass ``cls`` (TrainConfig by default): one ``--key`` per field (dashes
    accepted), plus ``--config FILE.yaml``; ``cli`` is (program, description)."""
    cls = cls or TrainConfig
    p = argparse.ArgumentParser(prog=cli[0], description=cli[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file of option: value (flags override it).")
    for f in dataclasses.fields(cls):
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        p.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, metavar=_field_type(f, cls).__name__.upper(),
                       help=f"{f.metadata.get('help', '')} (default: {f.default})")
    return p


def parse_args(argv: Optional[list[str]] = None, cls: type = None, cli: tuple[str, str] = TRAIN_CLI):
    """A validated config (``cls``, TrainConfig by default) from defaults, an optional YAML file and
    CLI flags."""
    cls = cls or TrainConfig
    parser = build_parser(cls, cli)

    def _error(message: str) -> typing.NoReturn:
        raise ConfigError(f"{message}: see --help for the options")

    parser.error = _error  # type: ignore[method-assign]
    ns = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    values: dict[str, Any] = {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    if ns.get("config"):
        for k, v in _load_yaml(ns.pop("config")).items():
            key = str(k).replace("-", "_")
            if key not in names:
                raise ConfigError(f"config file: unknown option {k!r}: see --help for the options")
            values[key] = v
    ns.pop("config", None)
    values.update(ns)
    kwargs = {k: _coerce(k, v, _field_type(names[k], cls)) for k, v in values.items()}
    return cls(**kwargs).validate()
