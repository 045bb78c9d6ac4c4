"""Prompt formats shared by the hint-guided algorithms and the toy warm start.

The hinted prompt is the question, then one line introducing the hint, then the hint text. The
hint request asks the policy for hints at three strengths as one JSON object.
"""
from __future__ import annotations

import re
from typing import Any, Optional

HINT_LEVELS = 3
Hints = dict[int, str]  # hint text per level, 1 (weakest) .. HINT_LEVELS (strongest)


TOY_HINT_TEMPLATE = "{question}\nHint: {hint}"  # the wording the toy's warm start learned
SAGE_HINT_TEMPLATE = "{question}\n\nHere is a hint to help you:\n{hint}"  # SAGE's code: the default for real models


def fill(template: str, **values: str) -> str:
    """``template`` with each ``{name}`` of ``values`` replaced in one pass; every other brace is kept as
    written (``\\boxed{}`` in a template, or ``{hint}`` inside a question, stay literal)."""
    return re.sub("|".join(re.escape("{" + k + "}") for k in values), lambda m: values[m.group(0)[1:-1]], template)


def hinted_question(question: str, hint: str, template: str = TOY_HINT_TEMPLATE) -> str:
    """The question with a hint appended (SAGE/Guide/HINT sample from this context), worded by
    ``template`` (``--hint_template``: ``{question}`` and ``{hint}`` are replaced)."""
    return fill(template, question=question, hint=hint)


def at_level(hints: Optional[Hints], level: int) -> tuple[int, Optional[str]]:
    """The hint at ``level``, or at the strongest level below it that ``hints`` has (a provider drops a
    level that states the answer together with the stronger ones): ``(level used, text)``, or
    ``(0, None)`` when there is none."""
    below = [lv for lv in (hints or {}) if lv <= level]
    return (max(below), hints[max(below)]) if below else (0, None)


HINT_SYSTEM_PROMPT = (
    "You are a mathematics tutor. From a problem and its reference solution, write three hints that "
    "let a student solve the problem without being told the result. Level 1 names only the key idea. "
    "Level 2 gives more direction: the method, or the first intermediate steps. Level 3 gives "
    "substantial guidance through the solution. No hint may state the final answer. Reply with one "
    'JSON object: {"level_1": "...", "level_2": "...", "level_3": "..."}.')


def hint_request(question: str, solution: str) -> list[dict]:
    """The chat that asks the policy for hints at three strengths: a tutoring system prompt, then the
    question and the reference solution. Its own chat: never wrapped in the training prompt template
    (which may ask for a boxed final answer, the opposite of a hint)."""
    return [{"role": "system", "content": HINT_SYSTEM_PROMPT},
            {"role": "user", "content": f"Question: {question}\n\nSolution: {solution}"}]


def _level_of(key: Any) -> Optional[int]:
    """1..HINT_LEVELS for keys like 'level_1', 'level1', 'Level 1', '1' or 1; else None."""
    if isinstance(key, bool):
        return None
    k = re.sub(r"[\s_\-]", "", str(key).lower())
    k = k[len("level"):] if k.startswith("level") else k
    return int(k) if k.isdigit() and 1 <= int(k) <= HINT_LEVELS else None


def as_hint_levels(obj: Any) -> Optional[Hints]:
    """``{1: text, 2: text, 3: text}`` from a dict keyed by level (``level_1``, ``1``, ...) or a list of
    three texts; numbers become strings; None when anything is missing, empty or of another type."""
    if isinstance(obj, (list, tuple)):
        obj = {i + 1: v for i, v in enumerate(obj)} if len(obj) == HINT_LEVELS else None
    if not isinstance(obj, dict):
        return None
    out: Hints = {}
    for key, value in obj.items():
        level = _level_of(key)
        if level is None or level in out:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            return None
        out[level] = value.strip()
    return out if len(out) == HINT_LEVELS else None
