"""Reading a dataset's rows through Hugging Face ``datasets``, from wherever the user keeps it.

``read_table(source, split)`` accepts a local JSONL/JSON, Parquet, CSV or Arrow file, a folder written
by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a hub id ``name`` / ``name:config``
(where a hub is reachable). A source with one split is read whatever ``split`` says (a local file is
one split); a ``DatasetDict`` with several needs ``split`` to name one of them.

JSON lines whose columns mix types across rows (an answer that is a number here and a string there,
a hint that is a text in one row and three texts in another) cannot become one Arrow table; those
files are read line by line with Python's ``json`` instead, which also names the first line that is
not valid JSON. Every failure is a :class:`fasthint.errors.DataError` naming the source and the fix.
"""
from __future__ import annotations

import json
import logging
import os

import datasets

from fasthint.errors import DataError
from fasthint.precheck import BUILDERS, looks_like_path, missing_data_message

DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _first_line(e: BaseException) -> str:
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:  # datasets wraps the reader's error
        cause = cause.__cause__ or cause.__context__
    text = str(cause).strip() or type(cause).__name__
    return text.splitlines()[0][:200]


def _json_lines(path: str) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path!r} ({e}): pass a readable UTF-8 JSON/JSONL file") from None
    if path.endswith(".json") and text.lstrip().startswith("["):  # one JSON array of row objects
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): fix the file") from None
        lines = [(i + 1, r) for i, r in enumerate(data)]
    else:
        lines = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                lines.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {i} is not valid JSON ({e.msg}): fix or remove that line") from None
    for i, row in lines:
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {i} is not a JSON object: each line must be one row object")
        rows.append(row)
    return rows


def _pick_split(ds, source: str, split: str):
    if not isinstance(ds, datasets.DatasetDict):
        return ds
    if len(ds) == 1:
        return next(iter(ds.values()))
    if split not in ds:
        raise DataError(f"{source} has splits {sorted(ds)} and no {split!r}: pass --data_split (or "
                        "--eval_data_split) naming one of them")
    return ds[split]


def _hub(source: str, split: str):
    name, _, config = source.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"{source}: no split {split!r} ({_first_line(e)}): pass --data_split naming one") from None
        raise DataError(f"cannot load {source!r} from the Hugging Face hub ({_first_line(e)}): check the name, "
                        "or pass a local file or save_to_disk folder") from None
    except Exception as e:  # noqa: BLE001 - offline, unknown name, gated: one line either way
        raise DataError(f"cannot load {source!r} from the Hugging Face hub ({type(e).__name__}: {_first_line(e)}): "
                        "check the name and the network, or pass a local file or save_to_disk folder") from None


def read_table(source: str, split: str = "train") -> list[dict]:
    """The rows of ``source`` (see the module docstring) as Python dicts, in order."""
    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.CRITICAL)  # its read errors become one DataError here
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, m)) for m in DISK_MARKERS):
            raise DataError(f"data path {source!r} is a folder but not one written by save_to_disk: pass a "
                            "JSONL/Parquet/CSV/Arrow file, a save_to_disk folder or a hub id")
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # noqa: BLE001 - a damaged folder
            raise DataError(f"cannot read the save_to_disk folder {source!r} ({_first_line(e)}): "
                            "write it again with save_to_disk") from None
        return _pick_split(ds, source, split).to_list()
    if not os.path.exists(path):
        if looks_like_path(source):
            raise DataError(missing_data_message(source))
        return _hub(source, split).to_list()
    ext = os.path.splitext(path)[1].lower()
    builder = BUILDERS.get(ext)
    if builder is None:
        raise DataError(f"data file {source!r}: unknown format {ext or '(no extension)'!r}: use .jsonl, .json, "
                        ".parquet, .csv or .arrow")
    if os.path.getsize(path) == 0:
        return []
    try:
        return datasets.load_dataset(builder, data_files=path, split="train").to_list()
    except Exception as e:  # noqa: BLE001 - the reader's error, named below
        if builder == "json":  # mixed types or a bad line: Python's json reads (or names) it
            return _json_lines(path)
        raise DataError(f"cannot read {source!r} as {builder} ({_first_line(e)}): check the file") from None
