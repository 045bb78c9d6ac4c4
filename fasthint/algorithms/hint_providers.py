"""Hint providers: where the hints of the hint-guided algorithms come from.

Interface: a ``HintProvider`` has ``hints(rows) -> list[Optional[dict[int, str]]]``, one entry per
dataset row: ``{1: weak, 2: medium, 3: strong}`` hint texts (``HINT_LEVELS`` of them), or ``None``
when no hint could be produced for that row. ``stats`` is reset on every call and holds at least
``requested`` (rows asked) and ``parse_fail`` (rows that got ``None``).

Providers:

- ``SelfHintProvider`` (SAGE-style self-hinting): the current policy compresses the row's reference
  solution into three hints through the rollout engine (one batched ``generate`` call); its reply
  is parsed with ``parse_hint_json`` and rejected when any level reveals the gold answer.
- ``DatasetHintProvider``: hints stored in a dataset column (one text for all levels, a dict keyed
  by level, or a list of three texts).
- ``SolutionPrefixHintProvider``: growing prefixes of the reference solution, never the line with
  the final ``\\boxed{}`` answer.

``make_hint_provider(name, **kwargs)`` builds one by name ("self", "dataset", "solution").
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from fasthint.data import render_chat
from fasthint.engines.base import SamplingConfig
from fasthint.hint_json import parse_hint_json  # noqa: F401 - re-exported: the parser of self-written hints
from fasthint.hint_leak import Verify, drop_leaking_levels
from fasthint.hints import HINT_LEVELS, Hints, as_hint_levels, hint_request
from fasthint.options import Options, at_least, need, one_of, option
from fasthint.rewards import verify_answer

HINT_PROVIDERS = ("auto", "self", "dataset", "solution")


@dataclass
class HintConfig(Options):
    """Where the hints of sage, sage_light, guide and hint come from."""

    GROUP = "hints (sage, sage_light, guide, hint)"
    hint_provider: str = option("auto", f"who writes hints, one of {HINT_PROVIDERS}: self = the policy from "
                                        "the question and reference solution (SAGE), dataset = the data's hint "
                                        "column, solution = reference-solution prefixes; auto = self for sage/"
                                        "sage_light, dataset for guide/hint.")
    hint_temperature: float = option(1.0, "sampling temperature of self-written hints (0 = greedy).")
    hint_max_new_tokens: int = option(0, "maximum length of a self-written hint reply (JSON); 0 = auto: 8192 "
                                         "(SAGE's code; a reasoning model thinks before it writes the hints), "
                                         "128 for the toy.")
    hint_retries: int = option(3, "self-written hints: ask again, at --hint_temperature, for a reply that does not "
                                  "parse, up to this many times (SAGE's code: 3; none when greedy).")
    hint_max_prompt_length: int = option(0, "longest hint request (system prompt, question and reference "
                                            "solution) sent; longer ones are skipped (hint/skipped); 0 = auto: "
                                            "2048, 896 for the toy.")
    hint_level: int = option(2, "guide/hint: the hint strength (1-3) of a multi-level provider.")

    def check(self) -> None:
        one_of("hint_provider", self.hint_provider, HINT_PROVIDERS)
        need(1 <= self.hint_level <= 3, f"--hint_level must be 1, 2 or 3 (got {self.hint_level})")
        need(self.hint_temperature >= 0, f"--hint_temperature must be >= 0 (got {self.hint_temperature})")
        at_least(self, ("hint_max_new_tokens", "hint_max_prompt_length", "hint_retries"), 0)

LEAK_STATS = tuple(f"leak_level_{lv}" for lv in range(1, HINT_LEVELS + 1))
_NUMERIC = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)?")


class HintProvider:
    """Base class: ``hints(rows)`` gives one ``{level: text}`` or None per row; ``stats`` describes
    the last call (``requested``, ``parse_fail`` and provider-specific counts)."""

    name = "base"

    def __init__(self, verify: Optional[Verify] = None) -> None:
        self.stats: dict[str, float] = {"requested": 0.0, "parse_fail": 0.0}
        self.verify = verify or verify_answer  # the leak judge's math-verify (the trainer: Rewards.verifier)

    def hints(self, rows: list[dict]) -> list[Optional[Hints]]:
        raise NotImplementedError

    def _finish(self, rows: list[dict], out: list[Optional[Hints]], parse_fail: Optional[int] = None,
                **extra: float) -> list[Optional[Hints]]:
        """Records ``stats``: ``requested``, ``parse_fail`` (default: rows that got no hint), ``extra``."""
        fails = sum(h is None for h in out) if parse_fail is None else parse_fail
        self.stats = {"requested": float(len(rows)), "parse_fail": float(fails),
                      **{k: float(v) for k, v in extra.items()}}
        return out

    def _judge_leaks(self, levels: Optional[Hints], answer: str, leaks: dict) -> Optional[Hints]:
        """``levels`` without the first level stating ``answer`` and the stronger ones (``fasthint.hint_leak``);
        counts each stating level in ``leaks`` (``leak_level_N``)."""
        if levels is None:
            return None
        kept, leaked = drop_leaking_levels(levels, answer, self.verify)
        for lv in leaked:
            leaks[f"leak_level_{lv}"] = leaks.get(f"leak_level_{lv}", 0) + 1
        return kept


class SelfHintProvider(HintProvider):
    """The current policy writes the hints from the reference solution (one batched generate call).

    Rows without a solution, or whose rendered request exceeds ``max_prompt_length`` tokens, are not
    sent (``stats['skipped']``); a reply that fails to parse is asked for again up to ``retries`` times
    (sampled, not greedy; ``stats['retries']``), then gives None (``stats['parse_fail']``); a reply cut
    at ``max_new_tokens`` counts in ``stats['reply_truncated']``; a level that states the gold answer
    is dropped with the stronger ones (``stats['leak_level_N']``; ``fasthint.hint_leak``), and a reply
    whose level 1 leaks gives None."""

    name = "self"

    def __init__(self, engine, tokenizer, *, temperature: float = 1.0, max_new_tokens: int = 512,
                 max_prompt_length: int = 2048, retries: int = 0, chat_template: str = "auto",
                 chat_template_kwargs: str = "", verify: Optional[Verify] = None) -> None:
        super().__init__(verify)
        self.engine, self.tokenizer = engine, tokenizer
        # the run's --chat_template / --chat_template_kwargs (a base model's plain text; Qwen3's enable_thinking);
        # never its --system_prompt or --prompt_template, which ask for a boxed answer
        self.plain, self.template_kwargs = chat_template == "none", json.loads(chat_template_kwargs or "{}")
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.max_prompt_length, self.retries = max_prompt_length, retries

    def hints(self, rows: list[dict]) -> list[Optional[Hints]]:
        out: list[Optional[Hints]] = [None] * len(rows)
        prompts, owners = [], []
        for i, row in enumerate(rows):
            solution = row.get("solution")
            if not isinstance(solution, str) or not solution.strip():
                continue
            ids = render_chat(self.tokenizer, hint_request(row["question"], solution), plain=self.plain,
                              **self.template_kwargs)
            if len(ids) > self.max_prompt_length:
                continue
            prompts.append(ids)
            owners.append(i)
        leaks = dict.fromkeys(LEAK_STATS, 0)  # measured, so logged when 0 too
        replies, retries = self._replies(prompts)
        for p, i in enumerate(owners):
            if p in replies:
                out[i] = self._judge_leaks(replies[p][0], str(rows[i].get("answer", "")), leaks)
        return self._finish(rows, out, parse_fail=sum(lv is None for lv, _ in replies.values()), **leaks,
                            sent=len(prompts), skipped=len(rows) - len(prompts), retries=retries,
                            reply_truncated=sum(cut for _, cut in replies.values()))

    def _replies(self, prompts: list[list[int]]) -> tuple[dict, int]:
        """{prompt index: (parsed levels or None, reply truncated)} and how many requests were retried:
        one batched generate call, then one per retry for the replies that did not parse."""
        sampling = SamplingConfig(n=1, temperature=self.temperature, top_p=1.0, max_new_tokens=self.max_new_tokens)
        replies: dict[int, tuple] = {}
        todo, retried = list(range(len(prompts))), 0
        for attempt in range(1 + (self.retries if self.temperature > 0 else 0)):
            if not todo:
                break
            retried += len(todo) if attempt else 0
            got: dict[int, object] = {}
            for c in self.engine.generate([prompts[p] for p in todo], sampling):
                got.setdefault(c.prompt_index, c)
            for k, p in enumerate(todo):
                if k in got:
                    text = self.tokenizer.decode(list(got[k].token_ids), skip_special_tokens=True)
                    replies[p] = (parse_hint_json(text), bool(got[k].truncated))
            todo = [p for p in todo if p not in replies or replies[p][0] is None]
        return replies, retried


class DatasetHintProvider(HintProvider):
    """Hints from a dataset column: a text (used at every level), a dict keyed by level, or a list of
    three texts; missing, empty or malformed gives None."""

    name = "dataset"

    def __init__(self, column: str = "hint") -> None:
        super().__init__()
        self.column = column

    def hints(self, rows: list[dict]) -> list[Optional[Hints]]:
        out: list[Optional[Hints]] = []
        for row in rows:
            value = row.get(self.column)
            if isinstance(value, str):
                out.append({lv: value.strip() for lv in range(1, HINT_LEVELS + 1)} if value.strip() else None)
            else:
                out.append(as_hint_levels(value))
        return self._finish(rows, out)


class SolutionPrefixHintProvider(HintProvider):
    """Level l is the first ``fractions[l-1]`` of the reference solution's lines (at least one, cut at
    a line boundary; by words for a one-line solution), stopping before the line with the final
    ``\\boxed{``. With ``check_leak`` a prefix that states the gold answer is dropped with the longer
    ones (``stats['leak_level_N']``), as for self-written hints."""

    name = "solution"

    def __init__(self, fractions: tuple[float, float, float] = (0.25, 0.5, 0.75), *, check_leak: bool = True,
                 verify: Optional[Verify] = None) -> None:
        super().__init__(verify)
        fr = tuple(float(f) for f in fractions)
        if len(fr) != HINT_LEVELS or not all(0 < f <= 1 for f in fr) or list(fr) != sorted(fr):
            raise ValueError(f"fractions must be {HINT_LEVELS} non-decreasing values in (0, 1], got {fractions!r}")
        self.fractions, self.check_leak = fr, check_leak

    def _prefixes(self, solution: str) -> Optional[Hints]:
        lines = [ln for ln in solution.splitlines() if ln.strip()]
        boxed = [i for i, ln in enumerate(lines) if "\\boxed{" in ln]
        body = lines[:boxed[-1]] if boxed else lines
        if not body:
            return None
        units, sep = (body, "\n") if len(body) > 1 else (body[0].split(), " ")
        return {lv: sep.join(units[:max(1, math.floor(f * len(units)))]).strip()
                for lv, f in enumerate(self.fractions, 1)}

    def hints(self, rows: list[dict]) -> list[Optional[Hints]]:
        out: list[Optional[Hints]] = []
        leaks = dict.fromkeys(LEAK_STATS, 0)  # measured, so logged when 0 too
        for row in rows:
            solution = row.get("solution")
            levels = self._prefixes(solution) if isinstance(solution, str) and solution.strip() else None
            out.append(self._judge_leaks(levels, str(row.get("answer", "")), leaks) if self.check_leak else levels)
        skipped = sum(not (isinstance(r.get("solution"), str) and r["solution"].strip()) for r in rows)
        return self._finish(rows, out, parse_fail=0, skipped=skipped, **(leaks if self.check_leak else {}))


PROVIDERS = {"self": SelfHintProvider, "dataset": DatasetHintProvider, "solution": SolutionPrefixHintProvider}


def make_hint_provider(name: str, **kwargs: Any) -> HintProvider:
    """Builds the provider called ``name`` ("self", "dataset" or "solution") with ``kwargs``."""
    key = str(name).strip().lower()
    if key not in PROVIDERS:
        raise ValueError(f"unknown hint provider {name!r}: choose one of {', '.join(map(repr, PROVIDERS))}")
    return PROVIDERS[key](**kwargs)
