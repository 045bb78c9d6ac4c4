"""The answer-leak judge of self-written hints (fasthint.hint_leak): a level leaks only where it states
the answer as a result, each level is judged on its own, and the weaker levels survive."""
import pytest

from fasthint.hint_leak import drop_leaking_levels, same_answer, stated_results, states_answer
from fasthint.hints import at_level


@pytest.mark.parametrize("hint,answer,leaks", [
    ("multiply both sides by 2", "2", False),                      # a number is not a result
    ("there are 2 cases; treat each", "2", False),
    ("so x = 2.", "2", True),                                       # after '=' at a sentence end
    ("x = 2, then substitute back into the first equation", "2", False),  # '=' mid-sentence
    ("The answer is 12. Check it.", "12", True),
    ("the answer is \\frac{1}{2}", "0.5", True),                     # the same number
    ("it equals 3/4!", "\\frac{3}{4}", True),
    ("answer: -5", "-5", True),
    ("compute 10-5 first", "-5", False),
    ("we get \\boxed{7} at the end", "7", True),                     # boxed, anywhere
    ("factor it as $(x-1)(x+1)$", "(x-1)(x+1)", True),               # the level's final expression
    ("so the total is $3 + 4 = 7$.", "7", True),                      # after its last '='
    ("the total has the form $a + b$ with a, b found below", "a+b", False),
    ("it is equal to \\sqrt{2}", "\\sqrt{2}", True),
    ("simplify to $\\frac{2}{4}$", "\\frac{1}{2}", True),             # the same number
    ("so the side is $2\\sqrt{2}$", "\\sqrt{8}", True),               # math-verify equivalence
    ("so the side is $2\\sqrt{3}$", "\\sqrt{8}", False),
    ("the answer is 13", "12", False),
    ("anything 12", "", False),
    ("The sum is 42.", "42", True),                                   # a closing sentence states it (issue 30)
    ("Add the sides. Hence the area is $42$ square units.", "42", True),
    ("The sum is what we need.", "42", False),
    ("There are 2 cases.", "2", False),
    ("The key quantity is 7 and the rest follows", "42", False),
])
def test_states_answer(hint, answer, leaks):
    assert states_answer(hint, answer) is leaks, stated_results(hint)


def test_same_answer_numbers_text_and_latex():
    assert same_answer(" 1/2 ", "\\frac{1}{2}") and same_answer("0.50", "1/2") and same_answer("$12$", "12")
    assert same_answer("\\left(1,2\\right)", "(1,2)") and not same_answer("12", "120")
    assert not same_answer("", "1") and not same_answer("x", "")


def test_drop_leaking_levels_keeps_the_weaker_ones():
    levels = {1: "look at parity", 2: "odd plus odd is even", 3: "so the sum = 10."}
    assert drop_leaking_levels(levels, "10") == ({1: "look at parity", 2: "odd plus odd is even"}, [3])
    levels = {1: "look at parity", 2: "the answer is 10", 3: "so the sum = 10."}
    assert drop_leaking_levels(levels, "10") == ({1: "look at parity"}, [2, 3])
    assert drop_leaking_levels({1: "\\boxed{10}", 2: "b", 3: "c"}, "10") == (None, [1])
    assert drop_leaking_levels({1: "a", 2: "b", 3: "c"}, "10") == ({1: "a", 2: "b", 3: "c"}, [])


def test_at_level_falls_back_to_the_strongest_kept_level():
    assert at_level({1: "a", 2: "b", 3: "c"}, 2) == (2, "b")
    assert at_level({1: "a"}, 3) == (1, "a")
    assert at_level(None, 2) == (0, None) and at_level({2: "b"}, 1) == (0, None)


_SLOW_VERIFY = '''
import time
from fasthint.rewards import verify_answer

def slow_verify(pred, gold):
    if "SLOW" in gold:
        time.sleep(60)
    return verify_answer(pred, gold)
'''


def test_the_trainers_leak_judge_runs_math_verify_in_a_worker_with_a_deadline(tmp_path, monkeypatch):
    """Issue 30: the leak judge ran math-verify in the trainer's process with no deadline; the trainer's
    providers judge through the reward scorer's worker (``Rewards.verifier``, --reward_timeout_s): a
    LaTeX answer is still recognised, and a check that hangs is cut at the deadline (no leak found)."""
    import importlib
    import time

    from fasthint.algorithms.hint_providers import SolutionPrefixHintProvider
    from fasthint.config import TrainConfig
    from fasthint.reward_funcs import Rewards, resolve
    from fasthint.rewards import RewardScorer

    (tmp_path / "_leak_slow_helper.py").write_text(_SLOW_VERIFY)
    monkeypatch.syspath_prepend(str(tmp_path))  # the worker inherits sys.path
    helper = importlib.import_module("_leak_slow_helper")
    cfg = TrainConfig(reward_timeout_s=1.0).validate()
    rewards = Rewards(resolve(cfg, None), cfg, None, 8)
    rewards._scorers["math"].close()
    rewards._scorers["math"] = RewardScorer(timeout_s=1.0, worker_fn=helper.slow_verify)
    provider = SolutionPrefixHintProvider(verify=rewards.verifier())
    solution = "Draw the square.\nIts diagonal is 4.\nso the side is $2\\sqrt{2}$\nCheck it.\n\\boxed{2\\sqrt{2}}"
    try:
        t0 = time.monotonic()
        (fast,) = provider.hints([{"solution": solution, "answer": "\\sqrt{8}"}])
        assert sorted(fast) == [1, 2] and provider.stats["leak_level_3"] == 1  # math-verify, in the worker
        assert rewards._scorers["math"]._workers and time.monotonic() - t0 < 30
        t0 = time.monotonic()
        (slow,) = provider.hints([{"solution": solution, "answer": "\\sqrt{SLOW}"}])
        assert sorted(slow) == [1, 2, 3] and provider.stats["leak_level_3"] == 0  # cut at the deadline
        assert time.monotonic() - t0 < 30
    finally:
        rewards.close()


def test_build_gives_the_providers_the_scorers_verifier():
    from fasthint.build import hint_provider
    from fasthint.config import TrainConfig

    def verify(a, b):
        return 0.0

    for name in ("self", "solution"):
        cfg = TrainConfig(algo="sage", hint_provider=name).validate()
        algo = type("A", (), {"hint_provider_default": "self"})
        assert hint_provider(cfg, algo, None, None, {}, verify=verify).verify is verify
