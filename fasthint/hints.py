"""Prompt formats shared by the hint-guided algorithms and the toy warm start.

The hinted prompt is the question, then one line introducing the hint, then the hint text. The
hint request asks the policy for hints at three strengths as one JSON object.
"""
from __future__ import annotations

HINT_LEVELS = 3


def hinted_question(question: str, hint: str) -> str:
    """The question with a hint appended (SAGE/Guide/HINT sample from this context)."""
    return f"{question}\nHint: {hint}"


def hint_request(question: str, solution: str) -> str:
    """Asks the policy to compress a reference solution into hints of three strengths, as JSON."""
    return (f"Write hints for: {question}\nSolution: {solution}\n"
            'Reply with JSON {"level_1": key idea, "level_2": more direction, '
            '"level_3": substantial guidance}, never the final answer.')
