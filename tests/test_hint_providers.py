"""Hint providers: the JSON parser, the answer-leak check, and the self/dataset/solution providers."""
import json

import pytest

from fasthint.algorithms.hint_providers import (DatasetHintProvider, HintProvider, SelfHintProvider,
                                                SolutionPrefixHintProvider, make_hint_provider, parse_hint_json)
from fasthint.data import render_chat
from fasthint.engines.base import Completion
from fasthint.hints import HINT_SYSTEM_PROMPT, hint_request

GOOD = {"level_1": "look at the tens", "level_2": "carry the one", "level_3": "7+5 is 12, then add 30"}
EXPECTED = {1: "look at the tens", 2: "carry the one", 3: "7+5 is 12, then add 30"}


# ---------------------------------------------------------------- parse_hint_json

def test_parse_valid_json():
    assert parse_hint_json(json.dumps(GOOD)) == EXPECTED


def test_parse_fenced_block_with_prose():
    text = "Sure! Here are the hints:\n```json\n" + json.dumps(GOOD, indent=2) + "\n```\nHope that {helps}."
    assert parse_hint_json(text) == EXPECTED


def test_parse_plain_fence():
    assert parse_hint_json("```\n" + json.dumps(GOOD) + "\n```") == EXPECTED


def test_parse_prose_with_braces_inside_strings():
    obj = {"level_1": "use the set {1, 2}", "level_2": "the map {x: 2x}", "level_3": "close with }"}
    text = "Answer: " + json.dumps(obj) + " done"
    assert parse_hint_json(text) == {1: "use the set {1, 2}", 2: "the map {x: 2x}", 3: "close with }"}


def test_parse_smart_quotes():
    text = ("{\u201clevel_1\u201d: \u201cfirst\u201d, \u201clevel_2\u201d: \u201csecond\u201d, "
            "\u201clevel_3\u201d: \u201cthird\u201d}")
    assert parse_hint_json(text) == {1: "first", 2: "second", 3: "third"}


def test_parse_extra_keys_ignored_and_values_stripped():
    obj = dict(GOOD, answer="42", level_4="nope")
    obj["level_1"] = "  look at the tens \n"
    assert parse_hint_json(json.dumps(obj)) == EXPECTED


@pytest.mark.parametrize("text", [
    json.dumps({"level_1": "a", "level_2": "b"}),                      # missing level
    json.dumps({"level_1": "a", "level_2": "  ", "level_3": "c"}),     # empty value
    json.dumps({"level_1": "a", "level_2": None, "level_3": "c"}),     # null value
    json.dumps({"level_1": "a", "level_2": {"x": 1}, "level_3": "c"}),  # nested value
    json.dumps(["a", "b"]),                                            # a list, but not of three
    json.dumps(GOOD)[:40],                                             # truncated
    '{"level_1": "a", "level_2": "b", "level_3": "c"',                 # truncated at the end
    "[" * 100000 + "]" * 100000,                                       # deep nesting, no object
    '{"level_1": ' + "[" * 100000 + "]" * 100000 + "}",                 # json.loads: RecursionError
    "{" * 5000 + "}" * 5000,                                           # deep garbage
    "no json here at all",
    "}{ garbage {",
    "",
])
def test_parse_failures_return_none(text):
    assert parse_hint_json(text) is None


def test_parse_two_objects_returns_none():
    text = json.dumps(GOOD) + "\nand also\n" + json.dumps(GOOD)
    assert parse_hint_json(text) is None


def test_parse_non_string_input_returns_none():
    assert parse_hint_json(None) is None  # type: ignore[arg-type]


def test_parse_numeric_values_become_strings():
    assert parse_hint_json('{"level_1": 3, "level_2": 2.5, "level_3": "x"}') == {1: "3", 2: "2.5", 3: "x"}


def test_parse_alternative_keys():
    assert parse_hint_json('{"1": "a", "2": "b", "3": "c"}') == {1: "a", 2: "b", 3: "c"}
    assert parse_hint_json('{"level1": "a", "level2": "b", "level3": "c"}') == {1: "a", 2: "b", 3: "c"}


# ---------------------------------------------------------------- DatasetHintProvider

def test_dataset_provider_forms_and_stats():
    rows = [
        {"hint": "carry the one"},
        {"hint": {"level_1": "a", "level_2": "b", "level_3": "c"}},
        {"hint": ["x", "y", "z"]},
        {"question": "no hint column"},
        {"hint": "   "},
        {"hint": ["only", "two"]},
    ]
    p = DatasetHintProvider()
    out = p.hints(rows)
    assert out == [{1: "carry the one", 2: "carry the one", 3: "carry the one"},
                   {1: "a", 2: "b", 3: "c"}, {1: "x", 2: "y", 3: "z"}, None, None, None]
    assert p.stats["requested"] == 6 and p.stats["parse_fail"] == 3
    out = p.hints(rows[:2])
    assert p.stats["requested"] == 2 and p.stats["parse_fail"] == 0  # reset per call


def test_dataset_provider_other_column():
    p = DatasetHintProvider(column="my_hints")
    assert p.hints([{"hint": "ignored", "my_hints": {"1": "p", "2": "q", "3": "r"}}]) == [{1: "p", 2: "q", 3: "r"}]


# ---------------------------------------------------------------- SolutionPrefixHintProvider

SOLUTION = "\n".join(f"step {i}: value {10 * i}" for i in range(1, 9)) + "\nso the result is \\boxed{1000}"


def test_solution_prefix_multiline():
    p = SolutionPrefixHintProvider()
    (h,) = p.hints([{"solution": SOLUTION, "answer": "1000"}])
    lines = SOLUTION.splitlines()
    assert h == {1: "\n".join(lines[:2]), 2: "\n".join(lines[:4]), 3: "\n".join(lines[:6])}
    assert all("\\boxed" not in t for t in h.values())
    assert h[2].startswith(h[1]) and h[3].startswith(h[2]) and len(h[1]) < len(h[2]) < len(h[3])
    assert p.stats == {"requested": 1.0, "parse_fail": 0.0, "skipped": 0.0, "leak_level_1": 0.0, "leak_level_2": 0.0,
                       "leak_level_3": 0.0}  # the leak check ran: its zeros are measured
    unchecked = SolutionPrefixHintProvider(check_leak=False)
    unchecked.hints([{"solution": SOLUTION, "answer": "1000"}])
    assert unchecked.stats == {"requested": 1.0, "parse_fail": 0.0, "skipped": 0.0}


def test_solution_prefix_never_reaches_boxed_line():
    p = SolutionPrefixHintProvider(fractions=(0.5, 0.9, 1.0))
    (h,) = p.hints([{"solution": "a=1\nb=2\n\\boxed{3}\nextra text", "answer": "3"}])
    assert h == {1: "a=1", 2: "a=1", 3: "a=1\nb=2"}


def test_solution_prefix_single_line_cut_by_words():
    p = SolutionPrefixHintProvider()
    (h,) = p.hints([{"solution": "one two three four five six seven eight", "answer": "99"}])
    assert h == {1: "one two", 2: "one two three four", 3: "one two three four five six"}


def test_solution_prefix_missing_solution_and_leak():
    p = SolutionPrefixHintProvider()
    rows = [{"answer": "1"}, {"solution": "", "answer": "1"}, {"solution": "\\boxed{4}", "answer": "4"},
            {"solution": "2+2=4\n\\boxed{4}", "answer": "4"}]
    assert p.hints(rows) == [None, None, None, None]  # the last: "2+2=4" states the answer at level 1
    assert p.stats["skipped"] == 2 and p.stats["parse_fail"] == 0
    assert p.stats["leak_level_1"] == p.stats["leak_level_2"] == p.stats["leak_level_3"] == 1
    unchecked = SolutionPrefixHintProvider(check_leak=False)
    assert unchecked.hints(rows[3:]) == [{1: "2+2=4", 2: "2+2=4", 3: "2+2=4"}]


def test_solution_prefix_rejects_bad_fractions():
    with pytest.raises(ValueError, match="fractions"):
        SolutionPrefixHintProvider(fractions=(0.8, 0.5, 0.9))
    with pytest.raises(ValueError, match="fractions"):
        SolutionPrefixHintProvider(fractions=(0.25, 0.5))


# ---------------------------------------------------------------- SelfHintProvider

@pytest.fixture(scope="module")
def tokenizer():
    from fasthint.toy.model import build_tokenizer

    return build_tokenizer()


class FakeEngine:
    """Answers each prompt with the scripted reply of the question it contains (in reverse order,
    so the provider must map completions back by prompt_index)."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        self.tokenizer, self.replies, self.calls = tokenizer, replies, []

    def generate(self, prompts, sampling):
        self.calls.append((prompts, sampling))
        out = []
        for i, p in enumerate(prompts):
            text = self.tokenizer.decode(p, skip_special_tokens=True)
            (question,) = [q for q in self.replies if f"Question: {q}\n" in text]
            ids = self.tokenizer(self.replies[question], add_special_tokens=False)["input_ids"]
            out.append(Completion(prompt_index=i, token_ids=ids + [self.tokenizer.eos_token_id]))
        return out[::-1]


def test_self_provider(tokenizer):
    replies = {
        "3+4=?": json.dumps({"level_1": "add", "level_2": "3 plus 4", "level_3": "count up from 3"}),
        "9-2=?": "Here you go: ```json\n{\"level_1\": \"subtract\", \"level_2\": \"take 2\", ",  # malformed
        "5+5=?": json.dumps({"level_1": "double 5", "level_2": "5+5", "level_3": "so 5+5 = 10."}),  # 3 leaks
        "8-1=?": "```json\n" + json.dumps({"1": "minus", "2": "8 less 1", "3": "one below 8"}) + "\n```",
    }
    rows = [
        {"question": "3+4=?", "answer": "7", "solution": "3+4=7\n\\boxed{7}"},
        {"question": "9-2=?", "answer": "7", "solution": "9-2=7\n\\boxed{7}"},
        {"question": "5+5=?", "answer": "10", "solution": "5+5=10\n\\boxed{10}"},
        {"question": "1+" * 600 + "1=?", "answer": "601", "solution": "long\n\\boxed{601}"},  # too long
        {"question": "6+0=?", "answer": "6"},  # no solution
        {"question": "8-1=?", "answer": "7", "solution": "8-1=7\n\\boxed{7}"},
    ]
    engine = FakeEngine(tokenizer, replies)
    p = SelfHintProvider(engine, tokenizer, temperature=0.7, max_new_tokens=96, max_prompt_length=896)
    out = p.hints(rows)
    assert out == [{1: "add", 2: "3 plus 4", 3: "count up from 3"}, None, {1: "double 5", 2: "5+5"}, None, None,
                   {1: "minus", 2: "8 less 1", 3: "one below 8"}]
    assert p.stats["requested"] == 6 and p.stats["parse_fail"] == 1 and p.stats["leak_level_3"] == 1
    assert p.stats["leak_level_1"] == 0 and p.stats["leak_level_2"] == 0  # checked, none stated the answer
    assert p.stats["sent"] == 4 and p.stats["skipped"] == 2
    assert len(engine.calls) == 1
    prompts, sampling = engine.calls[0]
    assert sampling.n == 1 and sampling.temperature == 0.7 and sampling.max_new_tokens == 96
    assert sampling.top_p == 1.0
    assert len(prompts) == 4 and all(len(pr) <= 896 for pr in prompts)
    expected_first = render_chat(tokenizer, hint_request(rows[0]["question"], rows[0]["solution"]))
    assert prompts[0] == expected_first
    sent = [tokenizer.decode(pr, skip_special_tokens=True) for pr in prompts]
    assert not any("6+0=?" in s or "1+1+1" in s for s in sent)


class FlakyEngine(FakeEngine):
    """The first ``bad`` replies to a question are cut-off JSON (a truncated reply), then the scripted one."""

    def __init__(self, tokenizer, replies, bad: dict[str, int]):
        super().__init__(tokenizer, replies)
        self.bad = dict(bad)

    def generate(self, prompts, sampling):
        out = super().generate(prompts, sampling)
        for c in out:
            text = self.tokenizer.decode(prompts[c.prompt_index], skip_special_tokens=True)
            (q,) = [q for q in self.replies if f"Question: {q}\n" in text]
            if self.bad.get(q, 0) > 0:
                self.bad[q] -= 1
                c.token_ids = self.tokenizer('{"level_1": "half a hi', add_special_tokens=False)["input_ids"]
                c.truncated = True
        return out


def test_self_provider_retries_a_reply_that_does_not_parse(tokenizer):
    """SAGE's code asks again (3 times) for a reply that does not parse; fasthint did not, so a truncated
    reply silently became "no hint" (issue 30). Only the failed requests are sent again; a greedy
    provider does not retry (it would get the same reply)."""
    good = json.dumps({"level_1": "a", "level_2": "b", "level_3": "c"})
    rows = [{"question": q, "answer": "7", "solution": f"{q[:-1]}7\n\\boxed{{7}}"} for q in ("3+4=?", "9-2=?", "8-1=?")]
    engine = FlakyEngine(tokenizer, {r["question"]: good for r in rows}, {"9-2=?": 2, "8-1=?": 5})
    p = SelfHintProvider(engine, tokenizer, temperature=0.7, max_new_tokens=96, retries=3)
    out = p.hints(rows)
    assert out == [{1: "a", 2: "b", 3: "c"}, {1: "a", 2: "b", 3: "c"}, None]  # 8-1 failed 4 times of 4
    assert [len(prompts) for prompts, _ in engine.calls] == [3, 2, 2, 1]
    assert p.stats["retries"] == 5 and p.stats["parse_fail"] == 1 and p.stats["reply_truncated"] == 1
    greedy = FlakyEngine(tokenizer, {r["question"]: good for r in rows}, {"9-2=?": 1})
    g = SelfHintProvider(greedy, tokenizer, temperature=0.0, retries=3)
    assert g.hints(rows)[1] is None and len(greedy.calls) == 1 and g.stats["retries"] == 0


def test_self_provider_nothing_to_send(tokenizer):
    engine = FakeEngine(tokenizer, {})
    p = SelfHintProvider(engine, tokenizer)
    assert p.hints([{"question": "1+1=?", "answer": "2", "solution": "  "}]) == [None]
    assert engine.calls == [] and p.stats["skipped"] == 1 and p.stats["parse_fail"] == 0
    assert p.stats["requested"] == 1


def test_self_provider_sends_its_own_chat_not_the_training_template(tokenizer):
    engine = FakeEngine(tokenizer, {"2+2=?": json.dumps({"level_1": "a", "level_2": "b", "level_3": "c"})})
    p = SelfHintProvider(engine, tokenizer)
    assert p.hints([{"question": "2+2=?", "answer": "4", "solution": "2+2=4\n\\boxed{4}"}]) == [
        {1: "a", 2: "b", 3: "c"}]
    sent = tokenizer.decode(engine.calls[0][0][0], skip_special_tokens=False)
    assert sent.startswith("<|im_start|>system\n" + HINT_SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n")
    assert "Question: 2+2=?\n\nSolution: 2+2=4" in sent and sent.endswith("<|im_start|>assistant\n")


def test_hint_chat_honours_the_runs_chat_template_options(tokenizer):
    """--chat_template none (a base model) sends the hint chat as plain text; --chat_template_kwargs reach
    the template (Qwen3's enable_thinking); neither brings in the training prompt's template or system."""
    import copy

    from fasthint.build import hint_provider
    from fasthint.config import TrainConfig

    reply = json.dumps({"level_1": "a", "level_2": "b", "level_3": "c"})
    row = {"question": "2+2=?", "answer": "4", "solution": "2+2=4"}
    cfg = TrainConfig(algo="sage", hint_provider="self", chat_template="none", system_prompt="Box it.",
                      prompt_template="Problem: {question}").validate()
    engine = FakeEngine(tokenizer, {"2+2=?": reply})
    assert hint_provider(cfg, type("A", (), {"hint_provider_default": "self"}), engine, tokenizer, {}).hints([row])
    sent = tokenizer.decode(engine.calls[0][0][0], skip_special_tokens=False)
    assert "<|im_start|>" not in sent and sent.startswith(HINT_SYSTEM_PROMPT + "\n\nQuestion: 2+2=?")
    assert "Box it." not in sent and "Problem:" not in sent

    thinking = copy.deepcopy(tokenizer)
    thinking.chat_template = tokenizer.chat_template + "{% if enable_thinking is defined and not enable_thinking %}" \
                                                       "<think>\n\n</think>\n\n{% endif %}"
    engine = FakeEngine(thinking, {"2+2=?": reply})
    SelfHintProvider(engine, thinking, chat_template_kwargs='{"enable_thinking": false}').hints([row])
    assert thinking.decode(engine.calls[0][0][0]).endswith("assistant\n<think>\n\n</think>\n\n")
    SelfHintProvider(engine, thinking).hints([row])
    assert thinking.decode(engine.calls[1][0][0]).endswith("assistant\n")


def test_render_chat_without_system_role_or_template():
    class NoSystem:
        chat_template = "x"

        def apply_chat_template(self, messages, **kw):
            if messages[0]["role"] == "system":
                raise ValueError("System role not supported")
            return [ord(c) for c in messages[0]["content"]]

    class Plain:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render_chat(NoSystem(), msgs) == [ord(c) for c in "S\n\nU"]
    assert render_chat(Plain(), msgs) == [ord(c) for c in "S\n\nU"]


# ---------------------------------------------------------------- make_hint_provider

def test_make_hint_provider(tokenizer):
    assert isinstance(make_hint_provider("dataset"), DatasetHintProvider)
    assert make_hint_provider("dataset", column="h").column == "h"
    sol = make_hint_provider("Solution", fractions=(0.1, 0.2, 0.3))
    assert isinstance(sol, SolutionPrefixHintProvider) and sol.fractions == (0.1, 0.2, 0.3)
    engine = FakeEngine(tokenizer, {})
    self_p = make_hint_provider("self", engine=engine, tokenizer=tokenizer, temperature=0.5)
    assert isinstance(self_p, SelfHintProvider) and isinstance(self_p, HintProvider)
    assert self_p.temperature == 0.5 and self_p.engine is engine
    with pytest.raises(ValueError) as err:
        make_hint_provider("oracle")
    assert "'oracle'" in str(err.value)
    assert all(n in str(err.value) for n in ("'self'", "'dataset'", "'solution'"))
