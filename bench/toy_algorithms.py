"""Experiment: GRPO vs the hint-guided algorithms on the toy, at an equal number of optimizer steps.

    python bench/toy_algorithms.py                                  # 5 algorithms x 3 seeds, defaults
    python bench/toy_algorithms.py --algos grpo,sage --seeds 0 -- --max_steps 20   # extra flags after --

Each (algorithm, seed) is one ``python -m fasthint.train`` run (the seed picks the toy data and
warm start; algorithms share them). Reported per run: no-hint greedy accuracy on the hardest level
(4) and overall after training (and avg@k on level 4 with ``--eval_samples k``),
``prompts/never_solved`` at the last step, the mean hint rate, the mean wall time per step and the
mean tokens sampled per step. Appends one row per run to bench/results/toy_algorithms.csv as it ends
(device, versions, commit); a run already there at this (clean) commit with the same flags is not
run again, so the bench can go on across sessions. Prints a Markdown table (mean ± the 95% t-interval
over seeds; cost relative to GRPO) and checks the SAGE paper's claim against GRPO: at least 25% fewer
never-solved prompts and a higher no-hint accuracy on level 3 or 4.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
from typing import Optional

from _results import append_rows, versions

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "toy_algorithms.csv")
FIELDS = ["time", "commit", "device", "torch", "algo", "seed", "steps", "acc_all", "acc_level_4", "avg_level_4",
          "never_solved",
          "hint_rate", "step_s", "sampled_tokens", "extra_args", "acc_level_1", "acc_level_2", "acc_level_3",
          "reward", "reward_hinted"]


# All four toy levels (level 4 is where hints matter) at the learning rate of the runs in
# bench/results/toy_algorithms.csv, so that new rows compare with them; flags after -- override these.
BASE = ["--toy_levels", "1,2,3,4", "--learning_rate", "5e-5"]


def _run(algo: str, seed: int, out: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "fasthint.train", "--algo", algo, "--seed", str(seed), "--output_dir", out,
           "--resume", "none",  # a fresh run each time, never a continuation of an earlier one
           "--progress_bar", "false", *BASE, *extra]
    res = subprocess.run(cmd, cwd=os.path.dirname(HERE), capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{algo} seed {seed} failed:\n{res.stderr[-2000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    ev = json.load(open(os.path.join(out, "eval.json")))["eval_after"]
    avg4 = next((v for k, v in ev.items() if k.startswith("eval/avg@") and k.endswith("_level_4")), "")
    return {"steps": len(rows), "acc_all": ev.get("eval/accuracy"), "acc_level_4": ev.get("eval/accuracy_level_4"),
            "avg_level_4": avg4,
            "never_solved": rows[-1].get("prompts/never_solved"),
            "hint_rate": sum(r.get("hint/rate", 0.0) for r in rows) / len(rows),
            "step_s": sum(r["time/step_s"] for r in rows) / len(rows),
            "sampled_tokens": sum(r.get("sampled_tokens", 0) for r in rows) / len(rows),
            **{f"acc_level_{lv}": ev.get(f"eval/accuracy_level_{lv}") for lv in (1, 2, 3)},
            "reward": sum(r["reward/mean"] for r in rows) / len(rows),
            "reward_hinted": _mean([r["reward/hinted"] for r in rows if "reward/hinted" in r])}


def _mean(v: list) -> object:
    return sum(v) / len(v) if v else ""


T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def _stat(rs: list[dict], k: str) -> tuple[float, float, float]:
    """Mean, sd and the half-width of the 95% t-interval of the mean over the runs ``rs``."""
    v = [float(r[k]) for r in rs]
    m = sum(v) / len(v)
    sd = (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
    return m, sd, T975.get(len(v), 1.96) * sd / len(v) ** 0.5 if len(v) > 1 else float("nan")


def _summary(rows: list[dict], algos: list[str]) -> None:
    """Per algorithm: no-hint greedy accuracy per level and never-solved prompts (mean ± 95% t-interval
    over seeds), step time and sampled tokens relative to GRPO, as a Markdown table; then the SAGE
    paper's claim checked against GRPO."""
    base = [r for r in rows if r["algo"] == "grpo"]
    cols = ["acc_level_1", "acc_level_2", "acc_level_3", "acc_level_4", "acc_all", "never_solved"]
    print("\n| algo | seeds | " + " | ".join(c.replace("acc_level_", "acc L").replace("_", " ") for c in cols)
          + " | hint rate | s/step | x grpo | tokens/step | x grpo |")
    print("|---|---:|" + "---:|" * (len(cols) + 5))
    for algo in algos:
        rs = [r for r in rows if r["algo"] == algo]
        if not rs:
            continue
        cells = ["{:.3f} ± {:.3f}".format(*_stat(rs, k)[::2]) for k in cols]
        ratio = lambda k: f"{_stat(rs, k)[0] / _stat(base, k)[0]:.2f}" if base else "-"  # noqa: E731
        print(f"| {algo} | {len(rs)} | " + " | ".join(cells) + f" | {_stat(rs, 'hint_rate')[0]:.3f} | "
              f"{_stat(rs, 'step_s')[0]:.2f} | {ratio('step_s')} | {_stat(rs, 'sampled_tokens')[0]:.0f} | "
              f"{ratio('sampled_tokens')} |")
    sage = [r for r in rows if r["algo"] == "sage"]
    if base and sage:
        ns_g, ns_s = _stat(base, "never_solved")[0], _stat(sage, "never_solved")[0]
        fewer = 1 - ns_s / ns_g if ns_g else float("nan")
        better = [lv for lv in (3, 4) if _stat(sage, f"acc_level_{lv}")[0] > _stat(base, f"acc_level_{lv}")[0]]
        met = fewer >= 0.25 and bool(better)
        print(f"\nSAGE's claim on the toy: {fewer:.0%} fewer never-solved prompts than GRPO (goal: at least 25%); "
              f"higher no-hint accuracy on level {' and '.join(map(str, better)) or '3 or 4: neither'}: "
              f"goal {'met' if met else 'not met'}")


def _done(algo: str, seed: int, commit: str, extra: list[str]) -> Optional[dict]:
    """A row of ``RESULTS`` for this run at this commit and these flags (a run that finished earlier)."""
    if not os.path.exists(RESULTS) or commit.endswith("-dirty"):
        return None
    with open(RESULTS, newline="") as fh:
        for r in csv.DictReader(fh):
            if (r["algo"], r["seed"], r["commit"], r["extra_args"]) == (algo, str(seed), commit, " ".join(extra)):
                return r
    return None


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", default="grpo,sage,sage_light,guide,hint")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="outputs/toy_algorithms")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    import torch

    commit = versions()["commit"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    rows = []
    for algo in args.algos.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            done = _done(algo, seed, commit, extra)
            if done is not None:  # measured earlier at this commit: kept (a bench run across sessions)
                rows.append(done)
                continue
            r = _run(algo, seed, os.path.join(args.out, f"{algo}-s{seed}"), extra)
            row = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
                   "device": device, "torch": torch.__version__, "algo": algo, "seed": seed, **r,
                   "extra_args": " ".join(extra)}
            append_rows(RESULTS, FIELDS, [row])  # each run as it ends
            rows.append(row)
            print(f"{algo:<11} seed {seed}: level-4 {r['acc_level_4']:.3f} all {r['acc_all']:.3f} "
                  f"never_solved {r['never_solved']:.3f} {r['step_s']:.1f} s/step", flush=True)
    _summary(rows, args.algos.split(","))


if __name__ == "__main__":
    main()
