"""Self-written hints as a policy actually replies: lenient JSON that keeps its LaTeX.

A policy asked for ``{"level_1": ..., "level_2": ..., "level_3": ...}`` writes maths inside JSON
strings, and strict JSON reads ``"\\frac{1}{2}"`` as a form feed plus ``rac{1}{2}`` and refuses
``"\\sqrt{2}"``. Before parsing, each string literal's backslashes are read the way a maths writer
means them:

- a backslash and a LaTeX command name is kept verbatim: any letter run (``\\sqrt``, ``\\cdot``,
  ``\\alpha``), except that a run starting with a JSON escape letter (``b f n r t v``) must be a known
  command (``\\frac``, ``\\neq``, ``\\times``, ``\\theta``, ``\\boxed``, ``\\right``, ...); otherwise it is
  the escape (``"Step 1\\nStep 2"`` keeps its newline);
- ``\\u`` and four hex digits stays a unicode escape; ``\\\\``, ``\\"``, ``\\'`` and ``\\/`` keep their
  JSON meaning;
- a backslash before anything else (``\\,``, ``\\{``, ``\\(``, ``\\!``) is kept verbatim;
- a raw line break inside a string becomes ``\\n``.

The result is parsed with ``json5`` (single quotes, trailing commas, unquoted keys, comments), after
smart quotes are tried both as they are and straightened. Candidates, in order: each fenced code
block, the text from the first ``{`` to the last ``}``, from the first ``[`` to the last ``]``; then the
balanced ``{...}`` from the first few ``{`` (prose around the object with braces of its own), when
exactly one of them is a hint set (a reply with two is ambiguous: no hint).
"""
from __future__ import annotations

import re
from typing import Any, Optional

import json5

from fasthint.hints import Hints, as_hint_levels

ESCAPE_LETTERS = frozenset("bfnrtv")
# Every LaTeX command KaTeX supports (https://katex.org/docs/supported; plus the common amsmath ones it
# lacks) whose name starts with a JSON escape letter: kept verbatim. A letter run that is not one of
# them is the escape (``\nStep 2``: a newline, then "Step 2").
LATEX_COMMANDS = frozenset("""
    backepsilon backprime backsim backsimeq backslash bar barwedge bbox bcancel because begin beta beth
    between bf bfseries big bigcap bigcirc bigcup bigg biggl biggm biggr bigl bigm bigodot bigoplus
    bigotimes bigr bigsqcup bigstar bigtriangledown bigtriangleup biguplus bigvee bigwedge binom
    blacklozenge blacksquare blacktriangle blacktriangledown blacktriangleleft blacktriangleright bm bmatrix
    bmod bold boldsymbol bot bowtie boxdot boxed boxminus boxplus boxtimes bra braket brace brack breve
    bull bullet bumpeq
    fallingdotseq fbox fcolorbox flat footnotesize forall frac frak frown
    nabla natural ncong ne nearrow neg negmedspace negthickspace negthinspace neq newcommand newline
    nexists ngeq ngeqq ngeqslant ngtr ni nleftarrow nleftrightarrow nleq nleqq nleqslant nless nmid
    nobreak nobreakspace nolimits nonumber normalsize not notag notin notni nparallel nprec npreceq
    nrightarrow nshortmid nshortparallel nsim nsubseteq nsubseteqq nsucc nsucceq nsupseteq nsupseteqq
    ntriangleleft ntrianglelefteq ntriangleright ntrianglerighteq nu nvDash nvdash nwarrow
    raisebox rangle rarr rbrace rbrack rceil rfloor rgroup rhd rho right rightarrow rightarrowtail
    rightharpoondown rightharpoonup rightleftarrows rightleftharpoons rightrightarrows rightsquigarrow
    rightthreetimes risingdotseq rlap rm rmoustache rparen rule rvert rVert
    tag tan tanh tau tbinom text textbf textcolor textit textmd textnormal textrm textsc textsf textsl
    textstyle texttt textup tfrac tg th therefore theta thetasym thickapprox thicksim thinspace tilde
    times tiny to top triangle triangledown triangleleft trianglelefteq triangleq triangleright
    trianglerighteq tt twoheadleftarrow twoheadrightarrow
    varepsilon varinjlim varkappa varliminf varlimsup varnothing varphi varpi varprojlim varpropto varpsi
    varrho varsigma varsubsetneq varsubsetneqq varsupsetneq varsupsetneqq vartheta vartriangle
    vartriangleleft vartriangleright vcentcolon vcenter vdash vDash vdots vec vee veebar verb vert vline
    vmatrix vphantom
    """.split())
_FENCE = re.compile(r"```[ \t]*(?:json5?)?[ \t]*\n?(.*?)```", re.DOTALL | re.IGNORECASE)
_SMART = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2018": "'", "\u2019": "'"})
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_LETTERS = re.compile(r"[A-Za-z]+")


def _string_backslash(text: str, i: int) -> tuple[str, int]:
    """The replacement for the backslash at ``text[i]`` inside a string literal, and the next index."""
    nxt = text[i + 1] if i + 1 < len(text) else ""
    if nxt in ('"', "'", "\\", "/", "\n"):
        return "\\" + nxt, i + 2
    if nxt == "u" and _HEX4.fullmatch(text[i + 2:i + 6]):
        return text[i:i + 6], i + 6
    if nxt.isascii() and nxt.isalpha():
        run = _LETTERS.match(text, i + 1).group(0)
        if run[0] in ESCAPE_LETTERS and run not in LATEX_COMMANDS:
            return "\\" + run[0], i + 2  # a JSON escape; the letters after it are text
        return "\\\\" + run, i + 1 + len(run)  # a LaTeX command, verbatim
    return "\\\\", i + 1  # \, \{ \( ... or a trailing backslash: verbatim


def protect_latex(text: str) -> str:
    """``text`` with every string literal's backslashes rewritten as the module doc says (comments and
    everything outside strings unchanged)."""
    out, i, quote, n = [], 0, None, len(text)
    while i < n:
        ch = text[i]
        if quote is None:
            if text.startswith("//", i) or text.startswith("/*", i):  # a JSON5 comment: copy it through
                end = text.find("\n" if text[i + 1] == "/" else "*/", i + 2)
                end = n if end < 0 else end + (0 if text[i + 1] == "/" else 2)
                out.append(text[i:end])
                i = end
                continue
            if ch in ('"', "'"):
                quote = ch
            out.append(ch)
            i += 1
        elif ch == "\\":
            piece, i = _string_backslash(text, i)
            out.append(piece)
        else:
            if ch == quote:
                quote = None
            out.append("\\n" if ch == "\n" else ch)
            i += 1
    return "".join(out)


MAX_OBJECT_STARTS = 32  # balanced objects tried from the first this many "{" (linear time per start)


def _balanced(text: str, start: int) -> int:
    """The index of the ``}`` closing the ``{`` at ``start`` (braces inside quoted strings do not count),
    or -1."""
    depth, quote, i, n = 0, None, start, len(text)
    while i < n:
        ch = text[i]
        if quote is not None:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in ('"', "'"):
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _candidates(text: str) -> list[str]:
    out = [m.group(1) for m in _FENCE.finditer(text)]
    for a, b in (("{", "}"), ("[", "]")):
        start, end = text.find(a), text.rfind(b)
        if 0 <= start < end:
            out.append(text[start:end + 1])
    return out


def _balanced_objects(text: str) -> list[str]:
    """Each balanced ``{...}`` from the first few ``{``: an object with prose around it that has braces of
    its own ("see {notes}", a <think> block's \\frac{1}{2})."""
    out, start = [], text.find("{")
    for _ in range(MAX_OBJECT_STARTS):
        if start < 0:
            break
        end = _balanced(text, start)
        if end < 0:
            break
        out.append(text[start:end + 1])
        start = text.find("{", start + 1)
    return out


def _parse(cand: str) -> Optional[Hints]:
    for variant in dict.fromkeys((cand.strip(), cand.strip().translate(_SMART))):
        try:
            obj = json5.loads(protect_latex(variant))
        except Exception:  # noqa: BLE001 - any parse failure (incl. RecursionError) means "try the next"
            continue
        levels = _levels(obj)
        if levels is not None:
            return levels
    return None


def _levels(obj: Any) -> Optional[Hints]:
    levels = as_hint_levels(obj)
    if levels is None and isinstance(obj, dict) and len(obj) == 1:  # {"hints": {...}}
        levels = as_hint_levels(next(iter(obj.values())))
    return levels


def parse_hint_json(text: str) -> Optional[Hints]:
    """The three hint levels of a policy's reply (``{1: text, 2: text, 3: text}``), or None when no
    candidate parses to them. Never raises."""
    try:
        if not isinstance(text, str):
            return None
        for cand in _candidates(text):
            levels = _parse(cand)
            if levels is not None:
                return levels
        # the balanced objects, when exactly one of them is a hint set (two are ambiguous: no hint)
        found = [lv for lv in map(_parse, _balanced_objects(text)) if lv is not None]
        return found[0] if len(found) == 1 else None
    except Exception:  # noqa: BLE001 - the parser must never raise
        return None
