"""Shared by the benchmarks: the versions and commit a row was measured with, and appending rows."""
from __future__ import annotations

import csv
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))


def versions() -> dict:
    """torch and triton versions and the short commit, suffixed ``-dirty`` when tracked files differ
    from it (the measured code is then not the commit)."""
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "-"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True).stdout.strip() or "-"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        commit += "-dirty" if dirty and commit != "-" else ""
    except OSError:
        commit = "-"
    return {"torch": torch.__version__, "triton": tv, "commit": commit}


def append_rows(path: str, fields: list[str], rows: list[dict]) -> None:
    """Appends ``rows`` to the CSV at ``path`` (header written when the file is new; when ``fields``
    adds columns to an existing file, the file is rewritten with them, old rows left empty there)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    old: list[dict] = []
    if os.path.exists(path):
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            if header == fields:
                old = None
            else:
                old = list(reader)
                fields = header + [f for f in fields if f not in header]
    if old is None:  # same columns: append
        with open(path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=fields).writerows(rows)
        return
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(old + rows)
    os.replace(tmp, path)
