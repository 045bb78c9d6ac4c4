"""Checkpoint writing: atomic (temp directory, then rename), Hugging Face format, safetensors."""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Optional


def save_hf_checkpoint(model, tokenizer, path: str, extra_json: Optional[dict] = None) -> str:
    """Writes ``model`` and ``tokenizer`` (and ``extra_json``: file name -> JSON-able object, e.g. the
    algorithm's state) to ``path`` atomically: a reader (or a crash) sees either the previous
    complete checkpoint or the new complete one, never a partial directory."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp{os.getpid()}")
    old = os.path.join(parent, f".{os.path.basename(path)}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name, obj in (extra_json or {}).items():
        with open(os.path.join(tmp, name), "w") as fh:
            json.dump(obj, fh, indent=1)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def rotate_existing(output_dir: str) -> None:
    """A fresh run in a used output directory keeps the old metrics: metrics.jsonl is renamed to
    metrics.<time>.jsonl (nothing already written is lost)."""
    p = os.path.join(output_dir, "metrics.jsonl")
    if os.path.isfile(p):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(p)))
        os.replace(p, os.path.join(output_dir, f"metrics.{stamp}.jsonl"))


def write_json_atomic(path: str, obj) -> None:
    """Writes ``obj`` as JSON to ``path`` via a temporary file and a rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)
