"""Metric sinks: ``metrics.jsonl`` (always), TensorBoard (optional), a progress bar and PNG plots."""
from __future__ import annotations

import json
import math
import os
from typing import Optional

PLOT_KEYS = ("reward/mean", "accuracy", "frac_reward_zero_std", "entropy", "completion_len/mean",
             "grad_norm", "clip_ratio/high", "time/step_s")


class MetricsLogger:
    """Appends one JSON object per step to ``OUTPUT_DIR/metrics.jsonl`` (flushed each line, so a
    crash loses at most the step in progress) and mirrors scalars to TensorBoard when asked."""

    def __init__(self, output_dir: str, report_to: str = "none"):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from fasthint.errors import ConfigError

                raise ConfigError("--report_to tensorboard needs the tensorboard package: "
                                  "pip install -c constraints.txt 'fasthint[tensorboard]'") from None
            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, metrics: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = int(metrics.get("step", 0))
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics.jsonl file (skips a torn last line)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def plot_metrics(rows: list[dict], path: str, keys: tuple[str, ...] = PLOT_KEYS,
                 title: Optional[str] = None) -> Optional[str]:
    """Saves a grid of training curves (raw and smoothed) as PNG; returns the path or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not keys:
        return None
    cols = 4
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, alpha=0.35, color="C0")
        if len(ys) >= 5:
            w = max(2, len(ys) // 10)
            sm = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, sm, color="C0")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_figure(fig, path: str) -> str:
    """Writes ``fig`` as PNG to ``path`` atomically (temporary file, then rename), closes it; the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path
