"""Benchmark files as users download them, normalised to rows with ``uid``, ``question``, ``answer``.

Each row needs a question (``problem`` or ``question``) and a gold answer, found in this order:

| where | e.g. |
|---|---|
| ``answer``: text or number (integral floats such as AMC's ``27.0`` become ``27``) | MATH-500, AIME24, AMC23 |
| ``final_answer``: a list of texts (several answers are joined with ``, ``) | OlympiadBench |
| only inside the last ``\\boxed{...}`` of ``solution`` | Minerva-Math |

Any other layout is refused with one line naming the file, the row and the columns it has.
A benchmark's name is its file name without the extension (``math500.jsonl`` -> ``math500``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from fasthint.data import QUESTION_COLUMNS, _answer_str
from fasthint.tables import read_table
from fasthint.errors import DataError
from fasthint.options import Options, at_least, option
from fasthint.rewards import last_boxed

EXTENSIONS = (".jsonl", ".parquet")


@dataclass
class EvaluationConfig(Options):
    """The no-hint evaluation of a training run (``--eval_data``)."""

    GROUP = "evaluation"
    eval_max_prompts: int = option(400, "at most this many evaluation prompts (no hints).")
    eval_samples: int = option(4, "besides greedy accuracy, report avg@k over this many completions "
                                  "sampled at the training temperature (0 = greedy only).")
    eval_steps: int = option(0, "also evaluate every N steps (0 = only before and after training); the "
                                "eval/... metrics go into that step's metrics row.")

    def check(self) -> None:
        at_least(self, ("eval_max_prompts",), 1)
        at_least(self, ("eval_samples", "eval_steps"), 0)


def _gold(row: dict) -> tuple[Optional[str], str]:
    """(gold answer or None, the column it came from)."""
    if row.get("answer") is not None:
        return _answer_str(row["answer"]), "answer"
    final = row.get("final_answer")
    if final is not None:
        items = final if isinstance(final, list) else [final]
        texts = [_answer_str(x) for x in items]
        return (", ".join(texts) if texts and all(texts) else None), "final_answer"
    sol = row.get("solution")
    if isinstance(sol, str):
        return last_boxed(sol), "solution's last \\boxed{}"
    return None, ""


def load_benchmark(path: str) -> list[dict]:
    """Rows ``{uid, question, answer, ...}`` of one benchmark file (every other column kept)."""
    raw = read_table(path)
    if not raw:
        raise DataError(f"benchmark file {path!r} has no rows")
    rows = []
    for i, r in enumerate(raw):
        q_col = next((c for c in QUESTION_COLUMNS if isinstance(r.get(c), str) and r[c].strip()), None)
        answer, where = _gold(r)
        if q_col is None or not answer:
            what = "question ('problem' or 'question')" if q_col is None else f"gold answer (from {where or 'nowhere'})"
            raise DataError(f"{path}: row {i} has no usable {what}; columns: {sorted(r)}. Known layouts: "
                            "'answer', 'final_answer' (list) or a \\boxed{} answer in 'solution'")
        row: dict[str, Any] = dict(r)
        row.update(uid=str(r.get("uid", r.get("unique_id", r.get("id", r.get("idx", i))))), question=r[q_col],
                   answer=answer, answer_source=where)
        rows.append(row)
    if len({r["uid"] for r in rows}) != len(rows):
        for i, r in enumerate(rows):  # ids that repeat: the row index instead
            r["uid"] = str(i)
    return rows


def load_benchmarks(path: str) -> dict[str, list[dict]]:
    """``{name: rows}`` for one benchmark file, or for every JSONL/Parquet file in a directory."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(EXTENSIONS))
        if not files:
            raise DataError(f"no .jsonl or .parquet benchmark files in directory {path!r}: pass a file or "
                            "a directory holding them")
    elif os.path.exists(path):
        files = [path]
    else:
        raise DataError(f"benchmark path {path!r} not found: pass --data FILE_OR_DIR")
    return {os.path.basename(f).rsplit(".", 1)[0]: load_benchmark(f) for f in files}
