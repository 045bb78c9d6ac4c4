"""Datasets: loading and validation of JSONL/Parquet files, prompt rendering, uids, prompt order.

A row needs a question (column ``question`` or ``problem``) and a gold ``answer``; ``solution``,
``hint`` and ``level`` are optional and every other column is kept (user reward functions see the
whole row). Each row gets a ``uid`` (its row index) that keys its group everywhere downstream.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from fasthint.errors import DataError
from fasthint.hints import as_hint_levels
from fasthint.options import Options, need, option
from fasthint.rewards import check_gold

QUESTION_COLUMNS = ("question", "problem")


@dataclass
class DataConfig(Options):
    """The training and evaluation sets and how a question becomes a prompt."""

    GROUP = "data"
    data: str = option("toy", "training set: JSONL or Parquet with question|problem, answer, optional "
                              "solution and hint columns; 'toy' generates the synthetic arithmetic set.")
    eval_data: str = option("toy", "no-hint evaluation set run before and after training "
                                   "('toy' = held-out toy problems; '' = skip).")
    prompt_template: str = option("{question}", "user-turn text; {question} is replaced by the question "
                                                "(e.g. add 'put your final answer within \\boxed{}').")
    max_prompt_length: int = option(512, "prompts longer than this (in tokens) are a data error.")

    def check(self) -> None:
        need(self.max_prompt_length >= 1, f"--max_prompt_length must be >= 1 (got {self.max_prompt_length})")
        need("{question}" in self.prompt_template,
             f"--prompt_template must contain {{question}} (got {self.prompt_template!r})")


def _read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} not found: pass --data PATH to a JSONL or Parquet file")
    if os.path.isdir(path):
        raise DataError(f"data path {path!r} is a directory: pass --data PATH to one JSONL or Parquet file")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq  # lazy: pyarrow is heavy and only Parquet files need it

            return pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - any reader failure is a data error
            raise DataError(f"cannot read Parquet file {path!r} ({type(e).__name__}): check the file") from None
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {i} is not valid JSON ({e.msg}): fix or remove that line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {i} is not a JSON object: each line must be one row object")
            rows.append(row)
    return rows


def _answer_str(value: Any) -> Optional[str]:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (int, str)):
        return str(value).strip()
    return None


def _valid_hint(value) -> bool:
    """A hint cell is missing, a text (every level), 3 texts, or a mapping of the 3 levels to texts."""
    if value is None or isinstance(value, str):
        return True
    return as_hint_levels(value) is not None


def load_dataset(path: str, *, check_answers: bool = True) -> list[dict]:
    """Reads and validates a dataset; returns rows with ``uid``, ``question``, ``answer`` and extras.

    Raises DataError naming the row and the fix for: a missing file, a row without a question or
    answer, an answer of the wrong type, a gold answer math-verify cannot parse, an empty file.
    """
    raw = _read_rows(path)
    if not raw:
        raise DataError(f"data file {path!r} has no rows: pass a dataset with at least one row")
    rows = []
    for i, r in enumerate(raw):
        q_col = next((c for c in QUESTION_COLUMNS if c in r), None)
        if q_col is None:
            raise DataError(f"{path}: row {i} has no 'question' or 'problem' column: add one to every row")
        if "answer" not in r:
            raise DataError(f"{path}: row {i} has no 'answer' column: add the gold answer to every row")
        question = r[q_col]
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{path}: row {i} has an empty or non-text {q_col!r}: give every row a question")
        answer = _answer_str(r["answer"])
        if not answer:
            raise DataError(f"{path}: row {i} has an empty or non-scalar answer {r['answer']!r}: "
                            "give a number or LaTeX string")
        if check_answers:
            problem = check_gold(answer)
            if problem:
                raise DataError(f"{path}: row {i}: gold answer {answer!r} cannot be parsed ({problem}): "
                                "fix or drop the row")
        row = dict(r)
        row.update(uid=str(r.get("uid", i)), question=question, answer=answer)
        if row.get("solution") is not None and not isinstance(row["solution"], str):
            raise DataError(f"{path}: row {i}: column 'solution' must be text, got {type(row['solution']).__name__}")
        if not _valid_hint(row.get("hint")):
            raise DataError(f"{path}: row {i}: column 'hint' must be a text, a list of 3 texts (levels 1-3) or "
                            f"an object with keys level_1, level_2, level_3; got {str(row['hint'])[:80]!r}")
        rows.append(row)
    uids = [r["uid"] for r in rows]
    if len(set(uids)) != len(uids):
        raise DataError(f"{path}: the 'uid' column has duplicates: make uids unique or drop the column")
    return rows


def render_prompt(tokenizer, question: str, template: str = "{question}") -> list[int]:
    """Token ids of the user turn (chat template when the tokenizer has one) ending in the
    assistant's generation prompt."""
    return render_chat(tokenizer, [{"role": "user", "content": template.format(question=question)}])


def render_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` ending in the assistant's generation prompt. A chat template that
    refuses a system turn (Gemma) gets the system text at the top of the first user turn; a tokenizer
    without a chat template gets the contents joined by blank lines."""
    if not getattr(tokenizer, "chat_template", None):
        return list(tokenizer("\n\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"])
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception:  # noqa: BLE001 - jinja raises TemplateError (e.g. "System role not supported")
        if messages[0]["role"] != "system":
            raise
        merged = [{**messages[1], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
        ids = tokenizer.apply_chat_template(merged + messages[2:], add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
    return list(ids)


class PromptSampler:
    """Yields batches of row indices: a fresh seeded shuffle each epoch, no prompt twice in an epoch
    unless the batch is larger than the dataset. ``state``/``load_state`` support exact resume."""

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(self.num_rows))
        random.Random(self.seed * 100003 + self.epoch).shuffle(order)
        return order

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            if self.pos == self.num_rows:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._shuffle()
