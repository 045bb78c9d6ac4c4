"""Metric sinks: ``metrics.jsonl`` (always), TensorBoard and W&B (optional) and PNG plots; the logging
settings (the progress display itself is ``fasthint.reporting.StepProgress``)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional

from rich.console import Console
from rich.table import Table

from fasthint.errors import ConfigError
from fasthint.options import Options, need, one_of, option

REPORT_TO = ("none", "tensorboard", "wandb")


@dataclass
class LoggingConfig(Options):
    """Where the run writes and what it shows."""

    GROUP = "output and logging"
    output_dir: str = option("outputs/default", "where metrics.jsonl, the plot and the final checkpoint go.")
    report_to: str = option("none", f"extra metric sinks, comma-separated, of {REPORT_TO} (wandb: project "
                                    "$WANDB_PROJECT or 'fasthint'; WANDB_MODE=offline works without a network); "
                                    "metrics.jsonl is always written.")
    progress_bar: bool = option(True, "show progress: a bar with reward and accuracy on a terminal; when stderr "
                                      "is not one (a log file), a plain line every --logging_steps steps.")
    log_completions: bool = option(False, "every --logging_steps steps write completions/step_<n>.jsonl (prompt, "
                                          "hint level, completion, each reward, advantage) and print a few.")
    logging_steps: int = option(1, "how often the plain progress line (stderr not a terminal) is logged and "
                                   "--log_completions writes (metrics.jsonl gets every step).")
    num_completions_to_print: int = option(4, "completions shown in the console table (0 = none).")

    @property
    def report_sinks(self) -> list[str]:
        return [x.strip() for x in self.report_to.split(",") if x.strip() and x.strip() != "none"]

    def check(self) -> None:
        for sink in self.report_to.split(","):
            one_of("report_to", sink.strip(), REPORT_TO)
        need(bool(self.output_dir), "--output_dir must not be empty")
        need(self.logging_steps >= 1, f"--logging_steps must be >= 1 (got {self.logging_steps})")
        need(self.num_completions_to_print >= 0,
             f"--num_completions_to_print must be >= 0 (got {self.num_completions_to_print})")

PLOT_KEYS = ("reward/mean", "frac_reward_zero_std", "prompts/never_solved", "entropy", "completion_len/mean",
             "grad_norm", "time/step_s")


class MetricsLogger:
    """Appends one JSON object per step to ``OUTPUT_DIR/metrics.jsonl`` (flushed each line, so a
    crash loses at most the step in progress) and mirrors scalars to TensorBoard when asked."""

    def __init__(self, output_dir: str, report_to: str = "none", config: Optional[dict] = None):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = self._wandb = None
        sinks = [x.strip() for x in report_to.split(",")]
        if "wandb" in sinks:
            try:
                import wandb  # lazy: optional package (--report_to wandb)
            except ImportError:
                raise ConfigError("--report_to wandb needs the wandb package: "
                                  "pip install -c constraints.txt 'fasthint[wandb]'") from None
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "fasthint"), dir=output_dir,
                                     config=config, name=os.path.basename(os.path.abspath(output_dir)))
        if "tensorboard" in sinks:
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: optional package (--report_to)
            except ImportError:
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
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if k != "step"}, step=int(metrics.get("step", 0)))

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def write_completions(output_dir: str, step: int, records: list[dict], show: int = 4) -> str:
    """``OUTPUT_DIR/completions/step_<step>.jsonl`` (one record per completion, written atomically)
    and a short table of the first ``show`` records on the console, as TRL prints them."""
    folder = os.path.join(output_dir, "completions")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step}.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)
    if show and records:
        names = [k for k in records[0]["rewards"]]
        table = Table(title=f"step {step}: {min(show, len(records))} of {len(records)} completions", show_lines=True)
        for col in ["prompt", "completion", "level", *names, "advantage"]:
            table.add_column(col, overflow="fold", max_width=60 if col in ("prompt", "completion") else 10)
        for r in records[:show]:
            vals = [r["rewards"][n] for n in names] + [r["advantage"]]
            table.add_row(r["prompt"][-300:], r["completion"][:300], str(r["hint_level"]),
                          *("-" if v is None else f"{v:.3f}" for v in vals))
        Console(width=160).print(table)
    return path


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


def plot_metrics(rows: list[dict], path: str, keys: tuple[str, ...] = PLOT_KEYS, title: Optional[str] = None,
                 evals: Optional[tuple[dict, dict]] = None) -> Optional[str]:
    """Saves a grid of training curves (raw and smoothed) as PNG, plus, with ``evals`` = (before,
    after) evaluation metrics, a bar chart of the no-hint accuracy per level before and after
    training; returns the path or None."""
    import matplotlib  # lazy: pyplot sets a process-wide backend; only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: pyplot sets a process-wide backend

    keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
    bars = _accuracy_by_level(*evals) if evals else []
    if not keys and not bars:
        return None
    cols = 4
    nrows = math.ceil((len(keys) + bool(bars)) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, alpha=0.35, color="C0")
        if len(ys) >= 5:
            w = max(2, len(ys) // 10)
            sm = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, sm, color="C0", label=f"mean of last {w}")
            ax.legend(loc="best", fontsize=7)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if bars:
        _plot_bars(list(axes.flat)[len(keys)], bars, evals[0].get("eval/num_prompts"))
    for ax in list(axes.flat)[len(keys) + bool(bars):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _accuracy_by_level(before: dict, after: dict) -> list[tuple[str, float, float]]:
    """(label, before, after) greedy no-hint accuracy: all prompts, then each level."""
    out = []
    for k, v in before.items():
        if (k == "eval/accuracy" or k.startswith("eval/accuracy_level_")) and isinstance(after.get(k), (int, float)):
            out.append(("all" if k == "eval/accuracy" else "L" + k.rsplit("_", 1)[1], float(v), float(after[k])))
    return out


def _plot_bars(ax, bars: list[tuple[str, float, float]], n: Optional[float]) -> None:
    xs = range(len(bars))
    for off, idx, label, color in ((-0.2, 1, "before", "C7"), (0.2, 2, "after", "C2")):
        vals = [b[idx] * 100 for b in bars]
        ax.bar([x + off for x in xs], vals, width=0.4, label=label, color=color)
        for x, v in zip(xs, vals):
            ax.text(x + off, v + 1, f"{v:.0f}", ha="center", fontsize=7)
    ax.set_xticks(list(xs), [b[0] for b in bars])
    ax.set_ylim(0, 110)
    ax.set_ylabel("%")
    ax.set_title(f"held-out accuracy, no hint{f' ({int(n)} prompts)' if n else ''}")
    ax.legend(loc="upper right", fontsize=7)
    ax.grid(alpha=0.3, axis="y")


def save_figure(fig, path: str) -> str:
    """Writes ``fig`` as PNG to ``path`` atomically (temporary file, then rename), closes it; the path."""
    import matplotlib.pyplot as plt  # lazy: pyplot sets a process-wide backend

    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path
