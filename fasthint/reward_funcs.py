"""Reward functions as plug-ins, called as TRL calls them.

``--reward_funcs math,format,my_pkg.rewards:brevity --reward_weights 1,0.1,0.5``: each entry is a
built-in name or a ``module:function`` import path. A function is called

    fn(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]

(keyword arguments, so ``def f(completions, answer, **kwargs)`` works) with one entry per
completion: the prompt text, the completion text, its token ids, and every dataset column as a
keyword list (``answer``, ``question``, ``solution``, ... and the dataset's own columns), as TRL's
``GRPOTrainer`` passes them, so a TRL reward function works unchanged.
``None`` means "not applicable": it is left out of the weighted sum and of that reward's mean (TRL's
NaN). The total reward is ``sum_k w_k r_k`` over the applicable ones.

Built-ins: ``math`` (the last ``\\boxed{}`` against the gold answer with math-verify, bounded time,
the default), ``format`` (1 when the completion ends its answer in a ``\\boxed{}``; with
``--think_tags`` also exactly one ``<think>...</think>`` block before it) and ``overlong`` (DAPO's
soft length penalty: 0 up to ``max_new_tokens - overlong_buffer_len`` tokens, then falling linearly to
``-overlong_penalty_factor`` at ``max_new_tokens``).

Import paths run in worker processes, one completion per call, with the math check's deadline
(``--reward_timeout_s``; an overrun scores 0) and isolation (a crash or hang cannot take the trainer
down); an exception stops the run naming the function and the row. Callables handed to
``fasthint.fit`` that cannot be imported by name (lambdas, closures, functions in ``__main__``) run
in the trainer's process, on the whole batch, without the deadline.

Which reward means "correct" (hint algorithms' solved/failed groups, ``accuracy``) is
``--correct_reward``: ``auto`` (``math`` when it is used, else the weighted total), a name or ``total``.
"""
from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from fasthint.errors import ConfigError, FastHintError
from fasthint.options import Options, need, option
from fasthint.rewards import RewardScorer, last_boxed

BUILTINS = ("math", "format", "overlong")
_THINK = re.compile(r"<think>.*?</think>", re.S)


@dataclass
class RewardConfig(Options):
    """Which rewards score a completion, and how they combine."""

    GROUP = "rewards"
    reward_funcs: str = option("math", f"comma-separated reward functions: built-ins {BUILTINS} or module:function "
                                       "import paths, called as TRL calls them: fn(prompts, completions, "
                                       "**columns) -> list[float | None].")
    reward_weights: str = option("", "comma-separated weights, one per reward function ('' = all 1.0).")
    correct_reward: str = option("auto", "the reward whose value >= 1 means a correct completion (hint "
                                         "algorithms' failed groups, accuracy): a reward's name, 'total' (the "
                                         "weighted sum) or 'auto' (math when it is used, else the total).")
    reward_timeout_s: float = option(5.0, "per-completion time limit of the math check and of import-path "
                                          "reward functions (an overrun scores 0).")
    think_tags: bool = option(False, "format reward: also require one <think>...</think> block before the "
                                     "answer.")
    overlong_buffer_len: int = option(0, "overlong reward: the penalty ramps over the last this many tokens "
                                         "before --max_new_tokens (0 = a quarter of it).")
    overlong_penalty_factor: float = option(1.0, "overlong reward: the penalty at --max_new_tokens.")

    @property
    def reward_names(self) -> list[str]:
        return [x.strip() for x in self.reward_funcs.split(",") if x.strip()]

    @property
    def weight_list(self) -> list[float]:
        if not self.reward_weights.strip():
            return [1.0] * len(self.reward_names)
        return [float(x) for x in self.reward_weights.split(",")]

    def check(self) -> None:
        names = self.reward_names
        need(bool(names), "--reward_funcs is empty: name at least one (e.g. math)")
        for n in names:
            need(n in BUILTINS or re.fullmatch(r"[\w.]+:[\w.]+", n) is not None,
                 f"--reward_funcs entry {n!r} is neither a built-in {BUILTINS} nor a module:function path")
        need(len(set(names)) == len(names), f"--reward_funcs names a function twice: {self.reward_funcs!r}")
        try:
            weights = self.weight_list
        except ValueError:
            raise ConfigError(f"--reward_weights {self.reward_weights!r} is not a comma-separated list of numbers")
        need(all(math.isfinite(w) for w in weights),
             f"--reward_weights {self.reward_weights!r}: weights must be finite numbers")
        need(self.reward_timeout_s > 0, f"--reward_timeout_s must be > 0 (got {self.reward_timeout_s})")
        need(self.overlong_buffer_len >= 0, f"--overlong_buffer_len must be >= 0 (got {self.overlong_buffer_len})")


def format_reward(completions: list[str], think_tags: bool = False) -> list[float]:
    """1.0 when a completion has a final ``\\boxed{}`` (and, with ``think_tags``, exactly one
    ``<think>...</think>`` block that closes before that box)."""
    out = []
    for c in completions:
        ok = last_boxed(c) is not None
        if ok and think_tags:
            blocks = _THINK.findall(c)
            ok = len(blocks) == 1 and c.count("<think>") == 1 and c.rfind("\\boxed") > c.find("</think>")
        out.append(float(ok))
    return out


def overlong_reward(lengths: list[int], max_new_tokens: int, buffer_len: int, factor: float) -> list[float]:
    """DAPO's soft overlong punishment: 0 up to ``max_new_tokens - buffer_len`` tokens, then
    ``(max - buffer - L) / buffer`` (down to -1 at ``max_new_tokens``), times ``factor``."""
    start = max_new_tokens - buffer_len
    return [0.0 if n <= start else factor * max(-1.0, (start - n) / buffer_len) for n in lengths]


_IMPORTED: dict[str, Callable] = {}


def import_reward(spec: str) -> Callable:
    """The function at ``module:function`` (ConfigError naming the entry when it cannot be imported)."""
    if spec not in _IMPORTED:
        module, _, attr = spec.partition(":")
        try:
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as e:  # noqa: BLE001 - ImportError, AttributeError, or the module's own error
            raise ConfigError(f"--reward_funcs {spec!r} cannot be imported ({type(e).__name__}: {e}): check the "
                              "module is on PYTHONPATH and defines that function") from None
        if not callable(obj):
            raise ConfigError(f"--reward_funcs {spec!r} is not a function")
        _IMPORTED[spec] = obj
    return _IMPORTED[spec]


def _plugin_call(spec: str, payload: tuple) -> Optional[float]:
    """In a worker: one completion through the plug-in (batch of one, as TRL's signature wants)."""
    prompt, completion, ids, columns = payload
    out = import_reward(spec)(prompts=[prompt], completions=[completion], completion_ids=[ids],
                              **{k: [v] for k, v in columns.items()})
    return out[0]


def _importable_name(fn: Callable) -> Optional[str]:
    """``module:qualname`` when ``fn`` can be imported by that name in a fresh interpreter."""
    module, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qual:
        return None
    try:
        return f"{module}:{qual}" if import_reward(f"{module}:{qual}") is fn else None
    except ConfigError:
        return None


@dataclass
class RewardFunc:
    """One reward: a built-in, an import path run in workers, or a callable run in-process."""

    name: str
    weight: float
    spec: Optional[str] = None  # module:function, run in workers
    fn: Optional[Callable] = None  # in-process, TRL signature


def resolve(cfg: RewardConfig, funcs: Optional[list] = None) -> list[RewardFunc]:
    """The rewards to compute: ``funcs`` (the Python API: built-in names, import paths or callables)
    or else ``--reward_funcs``, weighted by ``--reward_weights``. Import paths are imported now, so a
    typo fails before any work."""
    entries = list(funcs) if funcs is not None else cfg.reward_names
    weights = cfg.weight_list if cfg.reward_weights.strip() else [1.0] * len(entries)
    if len(weights) != len(entries):
        raise ConfigError(f"--reward_weights gives {len(weights)} weights for {len(entries)} reward functions: "
                          "give one each")
    out = []
    for e, w in zip(entries, weights):
        if isinstance(e, str) and e in BUILTINS:
            out.append(RewardFunc(e, w))
        elif isinstance(e, str):
            import_reward(e)
            out.append(RewardFunc(e.rpartition(":")[2].rpartition(".")[2], w, spec=e))
        elif callable(e):
            spec = _importable_name(e)
            name = getattr(e, "__name__", "") if getattr(e, "__name__", "") != "<lambda>" else "reward"
            out.append(RewardFunc(name or "reward", w, spec=spec, fn=None if spec else e))
        else:
            raise ConfigError(f"reward function {e!r} is neither a name, an import path nor a callable")
    taken = [f.name for f in out]
    if len(set(taken)) != len(taken):
        raise ConfigError(f"two reward functions share a name ({taken}): metrics rewards/<name>/mean need "
                          "distinct names")
    if cfg.correct_reward not in ("auto", "total") and cfg.correct_reward not in taken:
        raise ConfigError(f"--correct_reward {cfg.correct_reward!r} is not one of the reward functions {taken}: "
                          "name one of them, or 'total' for the weighted total")
    return out


def legacy_reward(reward_fn: Callable[[str, dict], float]) -> Callable:
    """``reward_fn(completion, row) -> float`` (``fasthint.fit``'s original form) as a TRL-style function."""
    def reward(prompts, completions, completion_ids=None, **columns):
        rows = [{k: v[i] for k, v in columns.items()} for i in range(len(completions))]
        return [float(reward_fn(c, r)) for c, r in zip(completions, rows)]

    reward.__name__ = getattr(reward_fn, "__name__", "reward")
    return reward


class Scores(list):
    """The weighted total reward per completion; ``correct`` (1.0 / 0.0 or the correct-reward's
    value) and ``parts`` (each function's values, None where not applicable) beside it."""

    correct: list[float]
    parts: dict[str, list[Optional[float]]]


class Rewards:
    """``rewards(texts, rows, prompt_ids=None, completion_ids=None) -> Scores`` (the trainer's score
    function); each function's values are in ``Scores.parts`` (``rewards/<name>/*``: ``fasthint.reporting``)."""

    def __init__(self, funcs: list[RewardFunc], cfg: RewardConfig, tokenizer, max_new_tokens: int):
        self.funcs, self.cfg, self.tokenizer, self.max_new_tokens = funcs, cfg, tokenizer, max_new_tokens
        names = [f.name for f in funcs]
        choice = cfg.correct_reward
        self.correct = ("math" if "math" in names else None) if choice == "auto" else \
            (None if choice == "total" else choice)
        self._scorers = {f.name: RewardScorer(cfg.reward_timeout_s, worker_fn=_plugin_call) for f in funcs if f.spec}
        if "math" in names:
            self._scorers["math"] = RewardScorer(cfg.reward_timeout_s)

    def close(self) -> None:
        for s in self._scorers.values():
            s.close()

    def verifier(self) -> Callable[[str, str], float]:
        """math-verify's equivalence of two bare answers, run in the math reward's worker process with its
        deadline (``--reward_timeout_s``; an overrun or an error gives 0.0): the hint leak judge's check,
        so that it cannot hang training (``fasthint.hint_leak``)."""
        if "math" not in self._scorers:
            self._scorers["math"] = RewardScorer(self.cfg.reward_timeout_s)  # started at the first call
        scorer = self._scorers["math"]

        def verify(pred: str, gold: str) -> float:
            got = scorer.call([(pred, gold)])[0]
            return float(got) if isinstance(got, (int, float)) else 0.0

        return verify

    def _decode_prompts(self, prompt_ids: list[list[int]]) -> list[str]:
        """Each distinct prompt decoded once (a group's completions share theirs)."""
        decoded: dict[tuple, str] = {}
        out = []
        for p in prompt_ids:
            key = tuple(p)
            if key not in decoded:
                decoded[key] = self.tokenizer.decode(p, skip_special_tokens=False)
            out.append(decoded[key])
        return out

    def __call__(self, texts: list[str], rows: list[dict], prompt_ids: Optional[list[list[int]]] = None,
                 completion_ids: Optional[list[list[int]]] = None) -> Scores:
        n = len(texts)
        user = any(f.spec or f.fn for f in self.funcs)  # TRL-style functions get prompts, ids and columns
        prompts, columns = None, None
        if user:
            prompts = self._decode_prompts(prompt_ids) if prompt_ids is not None else \
                [r.get("question", "") for r in rows]
            columns = {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)
                       if k not in ("prompts", "completions", "completion_ids")}
        if completion_ids is None and (user or any(f.name == "overlong" for f in self.funcs)):
            completion_ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        parts = {f.name: self._one(f, prompts, texts, completion_ids, columns, rows) for f in self.funcs}
        total = Scores(sum(f.weight * v for f in self.funcs if (v := parts[f.name][i]) is not None) for i in range(n))
        total.parts = parts
        total.correct = [float(v or 0.0) for v in parts[self.correct]] if self.correct else list(total)
        return total

    def _one(self, f: RewardFunc, prompts, texts, ids, columns, rows) -> list[Optional[float]]:
        if not f.spec and not f.fn:  # a built-in
            if f.name == "math":
                return self._scorers["math"].score(texts, [r["answer"] for r in rows])
            if f.name == "format":
                return format_reward(texts, self.cfg.think_tags)
            buf = self.cfg.overlong_buffer_len or max(1, self.max_new_tokens // 4)
            return overlong_reward([len(x) for x in ids], self.max_new_tokens, buf, self.cfg.overlong_penalty_factor)
        if f.spec:
            items = [(f.spec, (prompts[i], texts[i], list(ids[i]), {k: v[i] for k, v in columns.items()}))
                     for i in range(len(texts))]
            vals = self._scorers[f.name].call(items)
        else:
            try:
                vals = f.fn(prompts=prompts, completions=texts, completion_ids=ids, **columns)
            except Exception as e:  # noqa: BLE001 - named below
                raise FastHintError(f"reward function {f.name!r} raised {type(e).__name__}: {e}: fix the function") \
                    from None
            if not isinstance(vals, (list, tuple)) or len(vals) != len(texts):
                raise FastHintError(f"reward function {f.name!r} returned {type(vals).__name__} of "
                                    f"{len(vals) if hasattr(vals, '__len__') else '?'} values for {len(texts)} "
                                    "completions: return a list with one float (or None) per completion")
        out = []
        for i, v in enumerate(vals):
            if isinstance(v, tuple) and v and v[0] == "error":
                raise FastHintError(f"reward function {f.name!r} raised on row uid {rows[i].get('uid')}: {v[1]}: "
                                    "fix the function")
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise FastHintError(f"reward function {f.name!r} returned a non-finite or non-number value {v!r} "
                                    f"for row uid {rows[i].get('uid')}: return a finite float (None: not applicable)")
            out.append(None if v is None else float(v))
        return out
