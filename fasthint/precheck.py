"""The command line's checks that need neither torch, transformers nor math-verify, run by
``python -m fasthint.train`` before it imports them: an unknown flag, a value of the wrong type, a
missing or malformed ``--config`` file, a missing ``--data``/``--eval_data`` file or an unwritable
``--output_dir`` is answered in about a second, with the one line the full checks would give.

Only the standard library and ``yaml`` are imported here. The full validation
(``fasthint.config.parse_args``, ``TrainConfig.validate``, ``fasthint.preflight``) still runs after it
and shares these functions (the value conversion, the YAML reader, the data-source form, the output
directory check), so this early pass never refuses what the full checks accept. Every option's name
and type is listed in :data:`OPTION_TYPES`, which ``python scripts/config_table.py`` rewrites after
an option is added (``tests/test_precheck.py`` fails until then).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn, Optional

import yaml

from fasthint.errors import ConfigError, DataError, FastHintError

# Every flag of TrainConfig and its type (Optional[X] as X), in --help order: written by
# `python scripts/config_table.py`, checked by tests/test_precheck.py.
# <options>
OPTION_TYPES: dict[str, type] = {
    "algo": str, "prompts_per_step": int, "max_steps": int, "seed": int, "cache_dir": str, "num_threads": int,
    "dist_timeout_minutes": float, "model": str, "attn_implementation": str, "bf16": bool,
    "gradient_checkpointing": bool, "data": str, "data_split": str, "eval_data": str, "eval_data_split": str,
    "question_column": str, "answer_column": str, "solution_column": str, "hint_column": str, "strict_data": bool,
    "system_prompt": str, "chat_template": str, "chat_template_kwargs": str, "hint_position": str,
    "prompt_template": str, "hint_template": str, "max_prompt_length": int, "reward_funcs": str, "reward_weights": str,
    "correct_reward": str, "reward_timeout_s": float, "think_tags": bool, "overlong_buffer_len": int,
    "overlong_penalty_factor": float, "num_generations": int, "temperature": float, "top_p": float,
    "max_new_tokens": int, "generation_batch_size": int, "engine": str, "vllm_gpu_memory_utilization": float,
    "vllm_sleep_mode": bool, "check_engine_sync": bool, "engine_sync_max_logp_diff": float,
    "vllm_importance_sampling_correction": bool, "vllm_importance_sampling_mode": str,
    "vllm_importance_sampling_level": str, "vllm_importance_sampling_cap": float, "adv_scale": str, "adv_eps": float,
    "loss_agg": str, "eps_low": float, "eps_high": float, "dual_clip": float, "beta": float, "entropy_coef": float,
    "mask_truncated": bool, "head_grad_filter": float, "learning_rate": float, "lr_scheduler_type": str,
    "warmup_steps": int, "weight_decay": float, "adam_beta1": float, "adam_beta2": float, "max_grad_norm": float,
    "micro_batch_size": int, "micro_batch_tokens": int, "padding_free": bool, "steps_per_generation": int,
    "num_iterations": int, "dapo_max_rounds": int, "hint_provider": str, "hint_temperature": float,
    "hint_max_new_tokens": int, "hint_retries": int, "hint_max_prompt_length": int, "hint_level": int,
    "guide_filter": bool, "aapo_lambda": float, "sage_escalation": str, "sage_light_min_acc": float,
    "sage_light_max_acc": float, "eval_max_prompts": int, "eval_samples": int, "eval_steps": int, "save_steps": int,
    "save_total_limit": int, "resume": str, "output_dir": str, "report_to": str, "progress_bar": bool,
    "log_completions": bool, "logging_steps": int, "num_completions_to_print": int, "toy_train_size": int,
    "toy_levels": str, "toy_warmstart_steps": int, "toy_seed": int, "toy_rebuild": bool,
}
# </options>
# The defaults of the settings checked here (also kept equal to TrainConfig's by the test).
DEFAULTS = {"data": "toy", "eval_data": "toy", "output_dir": "outputs/default"}

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def coerce(name: str, value: Any, t: type) -> Any:
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


def load_yaml(path: str) -> dict:
    """The mapping of option: value in the YAML file ``path`` (``--config``), or a ConfigError."""
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


def raise_config_error(message: str) -> NoReturn:
    """argparse's ``error`` of fasthint's parsers: a ConfigError (one line, exit status 2), not a usage dump."""
    raise ConfigError(f"{message}: see --help for the options")


def looks_like_path(source: str) -> bool:
    """``--data`` names a local path (not a hub id ``name``, ``org/name`` or ``name:config``)."""
    return source.startswith((".", "/", "~")) or os.path.splitext(source)[1].lower() in BUILDERS or \
        source.count("/") > 1


def missing_data_message(source: str, flag: str = "data") -> str:
    """The error for a data source that looks like a path and does not exist."""
    return (f"data file {source!r} not found: pass --{flag} PATH to a JSONL, Parquet, CSV or Arrow file, a "
            "save_to_disk folder or a hub id")


def check_output_dir(path: str) -> None:
    """``--output_dir`` is a directory or can become one."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--output_dir {path} is a file: pass a directory")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--output_dir {path}: {parent} is a file, not a folder: pass a directory you can write to")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--output_dir {path}: {parent} is not writable: pass a directory you can write to")


def _parser() -> argparse.ArgumentParser:
    """The flags of ``fasthint.config.build_parser(TrainConfig)`` (the same spellings, so the same
    abbreviations match), without types or help: values are kept as given."""
    p = argparse.ArgumentParser(prog="python -m fasthint.train", add_help=False)
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--config", default=None)
    for name in OPTION_TYPES:
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        p.add_argument(*flags, dest=name, default=argparse.SUPPRESS)
    p.error = raise_config_error  # type: ignore[method-assign]
    return p


def check_args(argv: list[str]) -> Optional[dict]:
    """Checks the training command line ``argv`` (without the program name) as far as it can be
    checked without torch; raises a FastHintError naming the problem and the fix. Returns the
    settings given (``--config`` file, then flags, converted to their types), or None for ``--help``."""
    ns = vars(_parser().parse_args(argv))
    if ns.pop("help"):
        return None
    values: dict[str, Any] = {}
    config = ns.pop("config", None)
    if config:
        for k, v in load_yaml(config).items():
            key = str(k).replace("-", "_")
            if key not in OPTION_TYPES:
                raise ConfigError(f"config file: unknown option {k!r}: see --help for the options")
            values[key] = v
    values.update(ns)
    values = {k: coerce(k, v, OPTION_TYPES[k]) for k, v in values.items()}
    for flag in ("data", "eval_data"):
        source = values.get(flag, DEFAULTS[flag])
        if source and source != "toy" and looks_like_path(source) and not os.path.exists(os.path.expanduser(source)):
            raise DataError(missing_data_message(source, flag))
    check_output_dir(values.get("output_dir") or DEFAULTS["output_dir"])
    return values


def exit_on_bad_args(argv: list[str]) -> None:
    """:func:`check_args`; on a FastHintError prints ``error: <message>`` and exits with status 2, as
    ``fasthint.train.main`` does for the errors found later."""
    try:
        check_args(argv)
    except FastHintError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def without_flags(argv: list[str], flags: tuple) -> list[str]:
    """``argv`` less ``flags`` (``--flag value`` or ``--flag=value``): a front end's own options, so that
    the rest can be checked as ``fasthint.train``'s (``fasthint.rehearse``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in flags)):
            out.append(a)
    return out
