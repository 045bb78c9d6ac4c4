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
