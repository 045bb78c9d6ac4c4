"""The parser of self-written hints (fasthint.hint_json): replies as policies write them, with LaTeX in
JSON strings, JSON5 leniency and garbage. Each expected value is written out by hand."""
import json
import os

import pytest

from fasthint.algorithms.hint_providers import parse_hint_json as reexported
from fasthint.hint_json import parse_hint_json, protect_latex

BS = "\\"  # one backslash, to keep the expected texts readable

REPLIES = [
    # (reply as the model wrote it, the three levels expected)
    ('{"level_1": "Use \\frac{a}{b}.", "level_2": "Note \\neq 0.", "level_3": "Apply \\times twice."}',
     (f"Use {BS}frac{{a}}{{b}}.", f"Note {BS}neq 0.", f"Apply {BS}times twice.")),
    ('{"level_1": "\\sqrt{2} is irrational", "level_2": "angle \\theta", "level_3": "\\boxed{} is not for hints"}',
     (f"{BS}sqrt{{2}} is irrational", f"angle {BS}theta", f"{BS}boxed{{}} is not for hints")),
    ('{"level_1": "\\left( x \\right)", "level_2": "\\alpha + \\beta", "level_3": "\\vec{v} \\cdot \\vec{w}"}',
     (f"{BS}left( x {BS}right)", f"{BS}alpha + {BS}beta", f"{BS}vec{{v}} {BS}cdot {BS}vec{{w}}")),
    # properly escaped JSON still decodes to single backslashes
    ('{"level_1": "\\\\frac{1}{2}", "level_2": "\\\\sqrt{3}", "level_3": "x \\\\le 4"}',
     (f"{BS}frac{{1}}{{2}}", f"{BS}sqrt{{3}}", f"x {BS}le 4")),
    # JSON escapes that are not LaTeX keep their meaning
    ('{"level_1": "Step 1\\nStep 2", "level_2": "tab\\there", "level_3": "caf\\u00e9 \\"quoted\\""}',
     ("Step 1\nStep 2", "tab\there", 'café "quoted"')),
    # a backslash before punctuation is LaTeX spacing or braces: verbatim
    ('{"level_1": "a\\,b", "level_2": "\\{1, 2\\}", "level_3": "\\(x+1\\)"}',
     (f"a{BS},b", f"{BS}{{1, 2{BS}}}", f"{BS}(x+1{BS})")),
    # JSON5: single quotes, unquoted keys, trailing commas, comments
    ("{'level_1': 'think of parity', 'level_2': 'odd + odd', 'level_3': 'it is even',}",
     ("think of parity", "odd + odd", "it is even")),
    ('{level_1: "a", level_2: "b", level_3: "c"}', ("a", "b", "c")),
    ('{\n  // the weakest first\n  "level_1": "a", /* then */ "level_2": "b",\n  "level_3": "c",\n}', ("a", "b", "c")),
    # smart quotes
    ("{\u201clevel_1\u201d: \u201ca\u201d, \u201clevel_2\u201d: \u201cb\u201d, \u201clevel_3\u201d: \u201cc\u201d}",
     ("a", "b", "c")),
    # fenced, with prose around it
    ('Here are the hints:\n```json\n{"level_1": "a", "level_2": "b", "level_3": "c"}\n```\nGood luck!',
     ("a", "b", "c")),
    ('```\n{"level_1": "\\frac{x}{2}", "level_2": "b", "level_3": "c"}\n```', (f"{BS}frac{{x}}{{2}}", "b", "c")),
    # other key forms, a list of three, a wrapper object
    ('{"1": "a", "2": "b", "3": "c"}', ("a", "b", "c")),
    ('{"Level 1": "a", "Level 2": "b", "Level 3": "c"}', ("a", "b", "c")),
    ('["a", "b", "c"]', ("a", "b", "c")),
    ('{"hints": {"level_1": "a", "level_2": "b", "level_3": "c"}}', ("a", "b", "c")),
    # a raw line break inside a string
    ('{"level_1": "first line\nsecond line", "level_2": "b", "level_3": "c"}', ("first line\nsecond line", "b", "c")),
    # apostrophes inside double quotes, a trailing backslash pair
    ('{"level_1": "don\'t divide by zero", "level_2": "it\'s \\pi", "level_3": "x \\\\"}',
     ("don't divide by zero", f"it's {BS}pi", f"x {BS}")),
    # numbers become text
    ('{"level_1": 3, "level_2": 2.5, "level_3": "x"}', ("3", "2.5", "x")),
    # extra keys ignored
    ('{"level_1": "a", "level_2": "b", "level_3": "c", "answer": "42"}', ("a", "b", "c")),
    # commands that start with a JSON escape letter (b f n r t v) and were read as escapes (issue 30)
    ('{"level_1": "A = \\varnothing", "level_2": "\\because x > 0", "level_3": "\\texttt{gcd} and \\bigwedge"}',
     (f"A = {BS}varnothing", f"{BS}because x > 0", f"{BS}texttt{{gcd}} and {BS}bigwedge")),
    ('{"level_1": "\\nexists x", "level_2": "\\rightarrow \\therefore", "level_3": "\\tfrac{1}{2} \\vdots \\nmid"}',
     (f"{BS}nexists x", f"{BS}rightarrow {BS}therefore", f"{BS}tfrac{{1}}{{2}} {BS}vdots {BS}nmid")),
    ('{"level_1": "\\bmod 7\\nThen \\binom{n}{k}", "level_2": "\\triangle ABC", "level_3": "\\boldsymbol{v}"}',
     (f"{BS}bmod 7\nThen {BS}binom{{n}}{{k}}", f"{BS}triangle ABC", f"{BS}boldsymbol{{v}}")),
]
GARBAGE = [
    '{"level_1": "a", "level_2": "b"}',                       # a level missing
    '{"level_1": "a", "level_2": "", "level_3": "c"}',        # an empty level
    '{"level_1": "a", "level_2": "b", "level_3": "c"',        # cut off
    "no json here at all",
    "}{ garbage {",
    "",
    "[" * 100000 + "]" * 100000,                              # deep nesting
    '{"level_1": ' + "[" * 100000 + "]" * 100000 + "}",
    '["a", "b"]',                                             # a list of two
    '{"level_1": "a"} and {"level_2": "b", "level_3": "c"}',   # two partial objects
]


@pytest.mark.parametrize("reply,want", REPLIES, ids=[f"reply{i}" for i in range(len(REPLIES))])
def test_replies_parse_to_the_hand_written_levels(reply, want):
    assert parse_hint_json(reply) == dict(zip((1, 2, 3), want))


RECORDED = json.load(open(os.path.join(os.path.dirname(__file__), "recorded", "hint_replies.json")))["replies"]


@pytest.mark.parametrize("case", RECORDED, ids=[f"{c['source']}{i}" for i, c in enumerate(RECORDED)])
def test_model_styles_and_the_toys_own_replies(case):
    """Issue 30: 31 replies in the styles models write and 10 of the toy's own (tests/recorded/hint_replies.json)."""
    want = case["levels"]
    assert parse_hint_json(case["reply"]) == (None if want is None else dict(zip((1, 2, 3), want)))


@pytest.mark.parametrize("reply", GARBAGE, ids=[f"garbage{i}" for i in range(len(GARBAGE))])
def test_garbage_gives_none_and_never_raises(reply):
    assert parse_hint_json(reply) is None


def test_non_text_and_reexport():
    assert parse_hint_json(None) is None  # type: ignore[arg-type]
    assert parse_hint_json(b"{}") is None  # type: ignore[arg-type]
    assert reexported is parse_hint_json


def test_protect_latex_touches_only_strings_and_keeps_comments():
    text = '{/* \\frac outside */ "k": "\\frac{1}{2}\\n"}'
    assert protect_latex(text) == '{/* \\frac outside */ "k": "\\\\frac{1}{2}\\n"}'
