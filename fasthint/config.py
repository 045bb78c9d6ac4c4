"""The run's configuration: the union of the component configs, CLI ``--key value`` overrides and an
optional YAML file.

Each component owns its settings in its own module (``fasthint.options`` explains the pattern):

| component | class | module |
|---|---|---|
| the run | :class:`TrainConfig` (its own fields) | ``fasthint.config`` |
| model | ``ModelConfig`` | ``fasthint.models`` |
| data | ``DataConfig`` | ``fasthint.data`` |
| rewards | ``RewardConfig`` | ``fasthint.reward_funcs`` |
| rollouts and engine | ``RolloutConfig`` | ``fasthint.engines.base`` |
| advantages and loss | ``LossConfig`` | ``fasthint.loss`` |
| optimisation | ``OptimConfig`` | ``fasthint.update`` |
| hints | ``HintConfig`` | ``fasthint.algorithms.hint_providers`` |
| dapo, sage, guide, hint | ``DAPOConfig``, ``SAGEConfig``, ``GuideConfig``, ``HINTConfig`` | ``algorithms.*`` |
| evaluation | ``EvaluationConfig`` | ``fasthint.benchmarks`` |
| checkpoints | ``CheckpointConfig`` | ``fasthint.checkpoint`` |
| output and logging | ``LoggingConfig`` | ``fasthint.metrics`` |
| toy | ``ToyConfig`` | ``fasthint.toy.task`` |

:class:`TrainConfig` inherits them all, so every flag and YAML key is one flat name (``--eps_low``,
``eps_low: 0.1``) and a ``TrainConfig`` can be passed wherever a component's config is expected.
An algorithm's ``auto`` settings (e.g. Dr. GRPO's aggregation) come from its class's ``defaults``.

Precedence: defaults < ``--config file.yaml`` < command-line flags. Underscores are canonical in
flag names; dashes are accepted (``--max-steps`` == ``--max_steps``). Every value is validated once,
in :meth:`TrainConfig.validate`, with a message that names the fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import dataclass
from typing import Any, Optional

from fasthint.algorithms import REGISTRY, algorithm_options
from fasthint.benchmarks import EvaluationConfig
from fasthint.checkpoint import CheckpointConfig
from fasthint.data import DataConfig
from fasthint.reward_funcs import RewardConfig
from fasthint.engines.base import RolloutConfig
from fasthint.errors import ConfigError
from fasthint.hints import SAGE_HINT_TEMPLATE, TOY_HINT_TEMPLATE
from fasthint.loss import LossConfig
from fasthint.metrics import LoggingConfig
from fasthint.models import ModelConfig
from fasthint.options import Options, at_least, need, option
from fasthint.precheck import coerce, load_yaml, raise_config_error
from fasthint.toy.task import ToyConfig
from fasthint.update import OptimConfig

ALGOS = tuple(REGISTRY)
# the components in --help order (TrainConfig's own fields come first); each algorithm brings its own
COMPONENTS = ((ModelConfig, DataConfig, RewardConfig, RolloutConfig, LossConfig, OptimConfig) + algorithm_options()
              + (EvaluationConfig, CheckpointConfig, LoggingConfig, ToyConfig))


@dataclass
class TrainConfig(*reversed(COMPONENTS)):
    """Everything one training run needs. Defaults train the embedded toy in a few minutes on CPU."""

    GROUP = "run"
    algo: str = option("grpo", f"training algorithm, one of {ALGOS}.")
    prompts_per_step: int = option(32, "prompts per optimizer step (each gets num_generations completions).")
    max_steps: int = option(100, "optimizer steps.")
    seed: int = option(0, "random seed of the training run (data order, sampling); the toy's is --toy_seed.")
    cache_dir: str = option("~/.cache/fasthint", "cache for the toy model, tokenizer, data and warm start.")
    num_threads: int = option(0, "torch CPU threads (0 = torch's default: one per physical core).")
    dist_timeout_minutes: float = option(60, "how long a collective waits for the slowest rank under torchrun "
                                             "(torch's default, 10, is shorter than a 7B run's rank-0 phases).")

    def validate(self) -> "TrainConfig":
        """Resolves the algorithm's ``auto`` settings, then checks every component once; raises
        ConfigError naming the option and the fix."""
        need(self.algo in REGISTRY, f"--algo {self.algo!r} is not known: use one of {', '.join(REGISTRY)}")
        algo = REGISTRY[self.algo]
        for name, value in algo.defaults.items():  # resolved once, so train_config.json records what ran
            if getattr(self, name) in ("auto", None):
                setattr(self, name, value)
        if self.hint_provider == "auto":
            self.hint_provider = algo.hint_provider_default or "dataset"
        toy = self.model == "toy"  # the toy's context is 1024 tokens: smaller hint limits of its own
        self.hint_max_new_tokens = self.hint_max_new_tokens or (128 if toy else 8192)
        self.hint_max_prompt_length = self.hint_max_prompt_length or (896 if toy else 2048)
        if self.hint_template == "auto":
            self.hint_template = TOY_HINT_TEMPLATE if toy else SAGE_HINT_TEMPLATE
        for component in COMPONENTS:
            component.check(self)
        at_least(self, ("prompts_per_step", "max_steps"), 1)
        at_least(self, ("num_threads",), 0)
        need(self.dist_timeout_minutes > 0, f"--dist_timeout_minutes must be > 0 (got {self.dist_timeout_minutes})")
        need(self.num_generations >= 2 or self.adv_scale == "none",
             f"--num_generations {self.num_generations}: GRPO needs groups of at least 2 completions")
        return self


def _own_fields(cls: type) -> list:
    """The fields ``cls`` declares itself (not those it inherits)."""
    own = cls.__dict__.get("__annotations__", {})
    return [f for f in dataclasses.fields(cls) if f.name in own]


def field_groups(cls: type) -> list[tuple[str, list]]:
    """``[(group title, fields)]``: per component for a composed config, one group otherwise."""
    if not issubclass(cls, Options) or cls.__bases__ == (Options,):
        return [(getattr(cls, "GROUP", "") or "options", list(dataclasses.fields(cls)))]
    return [(c.GROUP, _own_fields(c)) for c in (cls,) + tuple(COMPONENTS) if issubclass(cls, c)]


def _field_type(f: dataclasses.Field, cls: type = None) -> type:
    hints = typing.get_type_hints(cls or TrainConfig)
    t = hints[f.name]
    if typing.get_origin(t) is typing.Union:  # Optional[X]
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


TRAIN_CLI = ("python -m fasthint.train", "Train a policy with GRPO-family RL on verifiable math rewards. "
                                         "With no arguments: the embedded toy run (no download).")


def build_parser(cls: type = None, cli: tuple[str, str] = TRAIN_CLI) -> argparse.ArgumentParser:
    """The CLI of config dataclass ``cls`` (TrainConfig by default): one ``--key`` per field (dashes
    accepted), grouped by component in ``--help``, plus ``--config FILE.yaml``; ``cli`` is (program,
    description)."""
    cls = cls or TrainConfig
    p = argparse.ArgumentParser(prog=cli[0], description=cli[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file of option: value (flags override it).")
    for title, fields in field_groups(cls):
        group = p.add_argument_group(title)
        for f in fields:
            flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
            group.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS,
                               metavar=_field_type(f, cls).__name__.upper(),
                               help=f"{f.metadata.get('help', '')} (default: {f.default})")
    return p


def parse_args(argv: Optional[list[str]] = None, cls: type = None, cli: tuple[str, str] = TRAIN_CLI):
    """A validated config (``cls``, TrainConfig by default) from defaults, an optional YAML file and
    CLI flags."""
    cls = cls or TrainConfig
    parser = build_parser(cls, cli)
    parser.error = raise_config_error  # type: ignore[method-assign]
    ns = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    values: dict[str, Any] = {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    if ns.get("config"):
        for k, v in load_yaml(ns.pop("config")).items():
            key = str(k).replace("-", "_")
            if key not in names:
                raise ConfigError(f"config file: unknown option {k!r}: see --help for the options")
            values[key] = v
    ns.pop("config", None)
    values.update(ns)
    kwargs = {k: coerce(k, v, _field_type(names[k], cls)) for k, v in values.items()}
    return cls(**kwargs).validate()
