"""Tests for fasthint.rewards: boxed extraction, math-verify rewards, deadlines."""

from __future__ import annotations

import importlib
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fasthint.rewards import RewardScorer, check_gold, last_boxed, math_reward


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{2} finally \boxed{{3}}", "{3}"),
        (r"the answer is \boxed 5.", "5."),
        (r"$\boxed 7$", "7"),
        (r"\fbox{x+1}", "x+1"),
        (r"\boxed {9}", "9"),
        ("no box here", None),
        (r"\boxed{\frac{1}{2}", None),
        (r"\boxed{1} and \boxed{2", None),
        (r"ends with \boxed", None),
        (r"\boxedx{3}", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        (r"\boxed{12}", "12.0", 1.0),  # fast path
        (r"\boxed{12}", "13", 0.0),  # fast path
        (r"\boxed{$-3$}", "-3", 1.0),  # fast path, negative
        (r"\boxed{-3}", "3", 0.0),
        ("the answer is 12", "12", 0.0),  # no box
        (r"\boxed{12", "12", 0.0),  # unbalanced
        (r"\boxed{5} wait, actually \boxed{7}", "7", 1.0),  # last box counts
        (r"\boxed{7} no, \boxed{5}", "7", 0.0),
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{1/2}", r"\frac{1}{2}", 1.0),
        (r"\boxed{-\frac{1}{2}}", "-0.5", 1.0),
        (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", 0.0),
        (r"\boxed{\sqrt{2}}", r"\sqrt{3}", 0.0),
    ],
)
def test_math_reward(completion: str, gold: str, expected: float) -> None:
    assert math_reward(completion, gold) == expected


def test_math_reward_from_thread() -> None:
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(math_reward(r"\boxed{\dfrac{2}{4}}", "1/2")))
    t.start()
    t.join(timeout=60)
    assert out == [1.0]


def test_check_gold() -> None:
    assert check_gold("12") is None
    assert check_gold("-0.25") is None
    assert check_gold(r"\frac{1}{2}") is None
    assert check_gold(r"\sqrt{2}+1") is None
    assert check_gold("") is not None
    assert check_gold("  ") is not None
    assert check_gold("\\frac{") is not None
    assert check_gold("}{") is not None


def test_batch_in_order() -> None:
    scorer = RewardScorer(num_workers=2)
    try:
        comps = [r"\boxed{1/2}", r"\boxed{3}", "none", r"\boxed{\pi}", r"\boxed{x^2}", r"\boxed{4}"]
        golds = ["0.5", "3", "1", r"\pi", "x^3", r"\sqrt{16}"]
        assert scorer.score(comps, golds) == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
        assert scorer.score([], []) == []
        with pytest.raises(ValueError):
            scorer.score(["a"], [])
    finally:
        scorer.close()


_SLOW_MODULE = '''
import time
from fasthint.rewards import verify_answer

def slow_verify(pred, gold):
    if gold == "SLOW":
        time.sleep(60)
    return verify_answer(pred, gold)
'''


def test_timeout_kills_only_slow_item(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "_rewards_slow_helper.py").write_text(textwrap.dedent(_SLOW_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers inherit sys.path
    helper = importlib.import_module("_rewards_slow_helper")
    scorer = RewardScorer(timeout_s=1.0, num_workers=2, worker_fn=helper.slow_verify)
    try:
        assert helper.slow_verify("SLOWER", "SLOWER") == 1.0  # a correct answer, unless it times out
        comps = [r"\boxed{\frac{1}{2}}", r"\boxed{SLOW}", r"\boxed{2/4}", r"\boxed{\frac{1}{3}}", r"\boxed{7}"]
        golds = ["0.5", "SLOW", "1/2", "0.5", "7"]
        t0 = time.monotonic()
        assert scorer.score(comps, golds) == [1.0, 0.0, 1.0, 0.0, 1.0]
        assert 1.0 <= time.monotonic() - t0 < 15.0
        procs = [w.proc for w in scorer._workers]
        # The killed worker is replaced lazily; the scorer keeps working.
        assert scorer.score([r"\boxed{\frac{3}{6}}", r"\boxed{SLOW}"], ["0.5", "SLOW"]) == [1.0, 0.0]
        assert scorer.score([r"\boxed{\sqrt{4}}"], ["2"]) == [1.0]
        procs += [w.proc for w in scorer._workers]
    finally:
        scorer.close()
    assert scorer._workers == []
    assert all(p.poll() is not None for p in procs)  # every worker process is gone


def test_fast_path_needs_no_worker() -> None:
    scorer = RewardScorer()
    assert scorer.score([r"\boxed{12}", r"\boxed{12}", "x"], ["12.0", "13", "1"]) == [1.0, 0.0, 0.0]
    assert scorer._workers == []


def test_dead_idle_worker_is_replaced() -> None:
    scorer = RewardScorer(num_workers=1)
    try:
        assert scorer.score([r"\boxed{1/2}"], ["0.5"]) == [1.0]
        scorer._workers[0].proc.kill()
        scorer._workers[0].proc.wait()
        assert scorer.score([r"\boxed{2/4}", r"\boxed{\pi}"], ["0.5", r"\pi"]) == [1.0, 1.0]
    finally:
        scorer.close()
