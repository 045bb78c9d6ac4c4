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
    """Appends ``rows`` to the CSV at ``path`` (header written when the file is new)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
