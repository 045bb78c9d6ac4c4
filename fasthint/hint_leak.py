"""Does a hint give the answer away? Judged per level, only where the hint states it as a result.

A number that happens to equal the answer is not a leak: with answer ``2``, "multiply both sides by
2" is a fine hint. A level *states* the answer when one of these equals it:

- the content of a ``\\boxed{...}``;
- the end of a sentence after "answer is", "answer:", "equals", "is equal to" or "=" (the expression
  from the last such marker to the sentence's end, at most ``MAX_RESULT_CHARS`` characters);
- the level's final expression: a ``$...$``, ``\\(...\\)`` or ``\\[...\\]`` that ends the level (the part
  after its last ``=`` when it has one);
- the level's closing sentence stating a value: "... is 42." or "Hence the area is $42$ square units."
  (a number or a math span after its last "is" or "was", then at most three words of unit; "there are
  2 cases" states nothing).

Equality: the same text once spaces, ``$``, thin spaces and ``\\left``/``\\right`` are removed; the same
number (integers, decimals, ``a/b``, ``\\frac{a}{b}``); or, when the answer is LaTeX, math-verify's
equivalence (``fasthint.rewards.verify_answer``). Levels are progressive, so the first level that
states the answer is dropped with every stronger one, and the weaker ones are kept.

``verify`` (every function here takes one) runs that math-verify check. Its default runs it in this
process with no deadline; the trainer passes the reward scorer's (``Rewards.verifier``: a worker
process, ``--reward_timeout_s``), so a pathological expression cannot hang training. A check that
overruns its deadline counts as "not the same".
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Callable, Optional

from fasthint.hints import Hints
from fasthint.rewards import verify_answer

MAX_RESULT_CHARS = 60
_SENTENCES = re.compile(r"(?<=[.!?;])\s+|\n+")
_RESULT = re.compile(r".*(?:answer\s+is|answer\s*:|equals|is\s+equal\s+to|=)\s*(.+?)\s*[.!?;]*\s*$",
                     re.IGNORECASE | re.DOTALL)
_FINAL_MATH = re.compile(r"(?:\$\$?(?P<a>[^$]+)\$\$?|\\\((?P<b>.+?)\\\)|\\\[(?P<c>.+?)\\\])\s*[.!?;,]*\s*$", re.DOTALL)
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$")
_CLOSING = re.compile(r".*\b(?:is|was)\s+(?P<x>\$[^$]+\$|\\\(.+?\\\)|-?\d[\d,]*(?:\.\d+)?(?:/\d+)?)"
                      r"(?:\s+[A-Za-z]+){0,3}\s*[.!]?\s*$", re.IGNORECASE | re.DOTALL)


def _boxed(text: str) -> list[str]:
    out, start = [], 0
    while (i := text.find("\\boxed{", start)) >= 0:
        depth, j = 1, i + len("\\boxed{")
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            out.append(text[i + len("\\boxed{"):j - 1])
        start = j
    return out


def stated_results(hint: str) -> list[str]:
    """The expressions ``hint`` states as results (see the module doc)."""
    out = _boxed(hint)
    for sentence in _SENTENCES.split(hint):
        m = _RESULT.match(sentence.strip())
        if m and len(m.group(1)) <= MAX_RESULT_CHARS:
            out.append(m.group(1))
    m = _FINAL_MATH.search(hint.strip())
    if m:
        expr = next(g for g in m.groupdict().values() if g is not None)
        out.append(expr.rsplit("=", 1)[-1])
    sentences = [x for x in _SENTENCES.split(hint.strip()) if x.strip()]
    m = _CLOSING.match(sentences[-1].strip()) if sentences else None
    if m:
        out.append(m.group("x").strip("$").removeprefix("\\(").removesuffix("\\)"))
    return out


def _norm(s: str) -> str:
    s = re.sub(r"\\(left|right)|\\[,!; ]|\$|\s+", "", s)
    return s.rstrip(".").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def _number(s: str) -> Optional[Fraction]:
    s = _norm(s).replace(",", "")
    m = _FRAC.match(s)
    try:
        if m:
            return Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1)
        if re.fullmatch(r"-?\d+(?:\.\d+)?(?:/-?\d+)?", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


Verify = Callable[[str, str], float]


def same_answer(expr: str, answer: str, verify: Verify = verify_answer) -> bool:
    """``expr`` equals ``answer`` as text, as a number, or (LaTeX answers) under math-verify."""
    a, e = _norm(answer), _norm(expr)
    if not a or not e:
        return False
    if a == e:
        return True
    na, ne = _number(answer), _number(expr)
    if na is not None and ne is not None:
        return na == ne
    if any(c in answer for c in "\\^{}") and len(expr) <= MAX_RESULT_CHARS:
        try:
            return verify(expr, answer) >= 1.0
        except Exception:  # noqa: BLE001 - an unparseable expression states nothing
            return False
    return False


def states_answer(hint: str, answer: str, verify: Verify = verify_answer) -> bool:
    """True when ``hint`` states ``answer`` as a result (module doc); an empty answer never leaks."""
    answer = str(answer).strip()
    return bool(answer and hint) and any(same_answer(x, answer, verify) for x in stated_results(hint))


def drop_leaking_levels(levels: Hints, answer: str,
                        verify: Verify = verify_answer) -> tuple[Optional[Hints], list[int]]:
    """``levels`` without the first level that states the answer and all stronger ones (None when level
    1 leaks), and the levels that state it."""
    leaked = [lv for lv in sorted(levels) if states_answer(levels[lv], answer, verify)]
    if not leaked:
        return levels, []
    kept = {lv: text for lv, text in levels.items() if lv < leaked[0]}
    return (kept or None), leaked
