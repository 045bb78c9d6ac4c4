"""Datasets: validation of the rows ``fasthint.tables`` reads, prompt rendering, uids, prompt order.

A row needs a question (column ``question`` or ``problem``, or ``--question_column``) and a gold
answer (``--answer_column``); a solution, hints and ``level`` are optional and every other column is
kept (reward functions see the whole row). A row that cannot be used is skipped and counted (or an
error with ``--strict_data``). Each row gets a ``uid`` (its row index) that keys its group everywhere
downstream.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from fasthint.errors import DataError
from fasthint.hints import TOY_HINT_TEMPLATE, as_hint_levels, fill, hinted_question
from fasthint.options import Options, need, one_of, option
from fasthint.rewards import check_gold
from fasthint.tables import read_table

QUESTION_COLUMNS = ("question", "problem")


@dataclass
class DataConfig(Options):
    """The training and evaluation sets and how a question becomes a prompt."""

    GROUP = "data"
    data: str = option("toy", "training set: a JSONL/JSON, Parquet, CSV or Arrow file, a save_to_disk folder or "
                              "a hub id (name or name:config); 'toy' generates the synthetic arithmetic set.")
    data_split: str = option("train", "split of --data when it has several (a hub id, a DatasetDict folder).")
    eval_data: str = option("toy", "no-hint evaluation set run before and after training, any --data form "
                                   "('toy' = held-out toy problems; '' = skip).")
    eval_data_split: str = option("test", "split of --eval_data when it has several.")
    question_column: str = option("", "column holding the question ('' = 'question', else 'problem').")
    answer_column: str = option("answer", "column holding the gold answer (checked with math-verify).")
    solution_column: str = option("solution", "column holding a reference solution (optional; hints cut from "
                                              "it).")
    hint_column: str = option("hint", "column holding hints (optional: a text, 3 texts or level_1..3).")
    strict_data: bool = option(False, "stop at the first bad row (no question or answer, unparseable answer, "
                                      "prompt over --max_prompt_length) instead of skipping and counting it "
                                      "(data/skipped_rows).")
    system_prompt: str = option("", "system turn of every training and evaluation prompt ('' = none).")
    chat_template: str = option("auto", "'auto': the tokenizer's chat template (plain text if it has none); "
                                        "'none': plain text for base models (system, then the user turn).")
    chat_template_kwargs: str = option("", "JSON object passed to apply_chat_template, e.g. "
                                           "'{\"enable_thinking\": false}' (Qwen3).")
    hint_position: str = option("question", "where a hint goes: 'question' (after it, see --hint_template) or 'system' "
                                            "(at the end of the system turn).")
    prompt_template: str = option("{question}", "user-turn text; {question} is replaced by the question "
                                                "(e.g. add 'put your final answer within \\boxed{}').")
    hint_template: str = option("auto", "how a hint joins the question: {question} and {hint} are replaced; "
                                        "'auto': SAGE's wording ('{question}\\n\\nHere is a hint to help you:\\n"
                                        "{hint}'), the toy's own ('{question}\\nHint: {hint}') for --model toy.")
    max_prompt_length: int = option(512, "prompts longer than this (in tokens) are skipped (an error with "
                                         "--strict_data).")

    @property
    def prompt_format(self) -> PromptFormat:
        hint = TOY_HINT_TEMPLATE if self.hint_template == "auto" else self.hint_template  # auto: resolved in validate
        return PromptFormat(self.prompt_template, self.system_prompt, self.chat_template, self.chat_template_kwargs,
                            self.hint_position, hint)

    @property
    def columns(self) -> "Columns":
        return Columns(self.question_column, self.answer_column, self.solution_column, self.hint_column)

    def check(self) -> None:
        need(self.max_prompt_length >= 1, f"--max_prompt_length must be >= 1 (got {self.max_prompt_length})")
        check_prompt_format(self.prompt_template, self.chat_template, self.chat_template_kwargs)
        one_of("hint_position", self.hint_position, ("question", "system"))
        need(self.hint_template == "auto" or ("{question}" in self.hint_template and "{hint}" in self.hint_template),
             f"--hint_template must contain {{question}} and {{hint}}, or be 'auto' (got {self.hint_template!r})")


_RENDER_KEYS = ("add_generation_prompt", "tokenize", "return_dict")  # render_chat sets these itself


def check_prompt_format(prompt_template: str, chat_template: str, chat_template_kwargs: str) -> None:
    """The prompt options that training and ``fasthint.eval`` share, checked once for both."""
    need("{question}" in prompt_template, f"--prompt_template must contain {{question}} (got {prompt_template!r})")
    one_of("chat_template", chat_template, ("auto", "none"))
    if chat_template_kwargs:
        try:
            kw = json.loads(chat_template_kwargs)
        except json.JSONDecodeError:
            kw = None
        need(isinstance(kw, dict), f"--chat_template_kwargs must be a JSON object, e.g. "
                                   f"'{{\"enable_thinking\": false}}' (got {chat_template_kwargs!r})")
        taken = [k for k in _RENDER_KEYS if k in kw]
        need(not taken, f"--chat_template_kwargs: {', '.join(taken)} is set by fasthint; leave it out")


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


class Rows(list):
    """A dataset's usable rows; ``skipped`` lists ``(row number, reason)`` of the rows left out."""

    skipped: list[tuple[int, str]]
    total: int


def _row_problem(r: dict, cols: "Columns", check_answers: bool) -> tuple[Optional[str], Optional[dict]]:
    """(why the row cannot be used, None) or (None, the row with canonical columns)."""
    q_col = cols.question or next((c for c in QUESTION_COLUMNS if r.get(c) is not None), QUESTION_COLUMNS[0])
    question = r.get(q_col)
    if not isinstance(question, str) or not question.strip():
        return f"empty or missing question ({q_col!r})", None
    answer = _answer_str(r.get(cols.answer))
    if not answer:
        return f"empty, missing or non-scalar answer ({cols.answer!r}: {str(r.get(cols.answer))[:40]!r})", None
    if check_answers:
        problem = check_gold(answer)
        if problem:
            return f"gold answer {answer!r} cannot be parsed ({problem})", None
    solution, hint = r.get(cols.solution), r.get(cols.hint)
    if solution is not None and not isinstance(solution, str):
        return f"column {cols.solution!r} must be text, got {type(solution).__name__}", None
    if not _valid_hint(hint):
        return (f"column {cols.hint!r} must be a text, a list of 3 texts (levels 1-3) or an object with keys "
                f"level_1, level_2, level_3; got {str(hint)[:80]!r}"), None
    row = dict(r)
    row.update(question=question, answer=answer, solution=solution, hint=hint)
    return None, row


@dataclass(frozen=True)
class Columns:
    """Which source column holds each field ('' question: 'question' or else 'problem')."""

    question: str = ""
    answer: str = "answer"
    solution: str = "solution"
    hint: str = "hint"


def _check_columns(rows: list[dict], cols: Columns, path: str) -> None:
    """A field whose column no row has is a flag problem, not a bad row: one line naming the flag."""
    present = set().union(*(r.keys() for r in rows))
    wanted = [("question_column", cols.question or None, QUESTION_COLUMNS), ("answer_column", cols.answer, None)]
    for flag, name, alternatives in wanted:
        names = (name,) if name else alternatives
        if not present & set(names):
            shown = " or ".join(repr(n) for n in names)
            raise DataError(f"{path} has no {shown} column (its columns: {sorted(present)}): pass --{flag} "
                            "naming the column that holds it")


def _fallback(rows: list[dict], cols: Columns) -> Columns:
    """``cols`` with each field whose column no row has set back to its default (an evaluation set
    keeps its standard names when the training set's were mapped)."""
    present = set().union(*(r.keys() for r in rows))
    default = Columns()
    return Columns(*(getattr(cols, f) if not getattr(cols, f) or getattr(cols, f) in present else getattr(default, f)
                     for f in ("question", "answer", "solution", "hint")))


def load_dataset(path: str, *, split: str = "train", columns: Optional[Columns] = None, check_answers: bool = True,
                 strict: bool = False, fallback: bool = False) -> Rows:
    """Reads (:func:`fasthint.tables.read_table`) and validates a dataset; returns rows with ``uid``,
    ``question``, ``answer``, ``solution``, ``hint`` and every source column.

    A row without a question or answer, with a gold answer math-verify cannot parse, or a malformed
    solution/hint is skipped and listed in ``rows.skipped`` (``strict``: a DataError naming the row
    instead). Always a DataError: a missing source, a column no row has (the flag to pass is named),
    no rows, every row skipped, duplicate uids. ``fallback``: a mapped column this dataset lacks
    falls back to the default name (how ``--eval_data`` reads the training set's column flags).
    """
    cols = columns or Columns()
    raw = read_table(path, split)
    if not raw:
        raise DataError(f"data file {path!r} has no rows: pass a dataset with at least one row")
    if fallback:
        cols = _fallback(raw, cols)
    _check_columns(raw, cols, path)
    rows, skipped = Rows(), []
    for i, r in enumerate(raw):
        problem, row = _row_problem(r, cols, check_answers)
        if problem:
            if strict:
                raise DataError(f"{path}: row {i}: {problem}: fix or drop the row (or leave out --strict_data "
                                "to skip such rows)")
            skipped.append((i, problem))
            continue
        row["uid"] = str(r.get("uid", i))
        rows.append(row)
    rows.skipped, rows.total = skipped, len(raw)
    if not rows:
        raise DataError(f"{path}: all {len(raw)} rows were skipped (row {skipped[0][0]}: {skipped[0][1]}): fix the "
                        "data or the column flags (--question_column, --answer_column)")
    uids = [r["uid"] for r in rows]
    if len(set(uids)) != len(uids):
        raise DataError(f"{path}: the 'uid' column has duplicates: make uids unique or drop the column")
    return rows


def skipped_summary(path: str, rows: Rows, limit: int = 3) -> Optional[str]:
    """One line: how many rows of ``path`` were skipped, the first few and why; None if none."""
    if not rows.skipped:
        return None
    first = "; ".join(f"row {i}: {why}" for i, why in rows.skipped[:limit])
    more = f"; and {len(rows.skipped) - limit} more" if len(rows.skipped) > limit else ""
    return (f"{path}: skipped {len(rows.skipped)} of {rows.total} rows ({first}{more}); --strict_data makes "
            "a bad row an error")


@dataclass(frozen=True)
class PromptFormat:
    """How a question (and a hint) becomes the prompt: ``DataConfig.prompt_format``."""

    template: str = "{question}"
    system_prompt: str = ""
    chat_template: str = "auto"  # "none": plain text for base models
    chat_template_kwargs: str = ""  # JSON object for apply_chat_template
    hint_position: str = "question"  # or "system"
    hint_template: str = TOY_HINT_TEMPLATE  # DataConfig.hint_template, resolved

    def messages(self, question: str, hint: Optional[str] = None) -> list[dict]:
        """The chat: an optional system turn, then the user turn; a hint after the question or at the
        end of the system turn."""
        user = fill(self.template, question=hinted_question(question, hint, self.hint_template) if hint and
                    self.hint_position == "question" else question)
        system = self.system_prompt
        if hint and self.hint_position == "system":
            system = f"{system}\n\nHint: {hint}" if system else f"Hint: {hint}"
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def render_prompt(tokenizer, question: str, fmt: "PromptFormat | str" = "{question}",
                  hint: Optional[str] = None) -> list[int]:
    """Token ids of the prompt for ``question`` (and ``hint``) in format ``fmt`` (a
    :class:`PromptFormat`, or a user-turn template), ending in the assistant's generation prompt."""
    fmt = PromptFormat(template=fmt) if isinstance(fmt, str) else fmt
    kwargs = json.loads(fmt.chat_template_kwargs) if fmt.chat_template_kwargs else {}
    return render_chat(tokenizer, fmt.messages(question, hint), plain=fmt.chat_template == "none", **kwargs)


def render_chat(tokenizer, messages: list[dict], plain: bool = False, **template_kwargs) -> list[int]:
    """Token ids of ``messages`` ending in the assistant's generation prompt. A chat template that
    refuses a system turn (Gemma) gets the system text at the top of the first user turn; a tokenizer
    without a chat template, or ``plain``, gets the contents joined by blank lines (the tokenizer's
    BOS only). ``template_kwargs`` go to ``apply_chat_template`` (e.g. ``enable_thinking``)."""
    if plain or not getattr(tokenizer, "chat_template", None):
        return list(tokenizer("\n\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"])
    kw = dict(add_generation_prompt=True, tokenize=True, return_dict=False, **template_kwargs)
    try:
        ids = tokenizer.apply_chat_template(messages, **kw)
    except Exception:  # noqa: BLE001 - jinja raises TemplateError (e.g. "System role not supported")
        if messages[0]["role"] != "system":
            raise
        merged = [{**messages[1], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
        ids = tokenizer.apply_chat_template(merged + messages[2:], **kw)
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
