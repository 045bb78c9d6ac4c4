"""Experiment: GRPO vs the hint-guided algorithms on the toy, at an equal number of optimizer steps.

    python bench/toy_algorithms.py                                  # 5 algorithms x 3 seeds, defaults
    python bench/toy_algorithms.py --algos grpo,sage --seeds 0 -- --max_steps 20   # extra flags after --

Each (algorithm, seed) is one ``python -m fasthint.train`` run (the seed picks the toy data and
warm start; algorithms share them). Reported per run: no-hint greedy accuracy on the hardest level
(4) and overall after training (and avg@k on level 4 with ``--eval_samples k``),
``prompts/never_solved`` at the last step, the mean hint rate, the mean wall time per step and the
mean tokens sampled per step. Prints a table (mean ± sd over seeds, cost relative to GRPO) and
appends one row per run to bench/results/toy_algorithms.csv with the device, versions and commit.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

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


def _summary(rows: list[dict], algos: list[str]) -> None:
    """Mean (and spread over seeds) per algorithm; step time and sampled tokens also relative to GRPO."""
    def stat(rs: list[dict], k: str) -> tuple[float, float]:
        v = [float(r[k]) for r in rs]
        m = sum(v) / len(v)
        return m, (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0

    base = [r for r in rows if r["algo"] == "grpo"]
    print(f"\n{'algo':<11} {'seeds':>5} {'acc L1':>13} {'acc L2':>13} {'acc L3':>13} {'acc L4':>13} "
          f"{'avg@k L4':>13} {'acc all':>13} {'never solved':>13} "
          f"{'hint rate':>9} {'s/step':>7} {'x grpo':>6} {'tokens/step':>11} {'x grpo':>6}")
    for algo in algos:
        rs = [r for r in rows if r["algo"] == algo]
        if not rs:
            continue
        cell = lambda k: "{:.3f} ± {:.3f}".format(*stat(rs, k))  # noqa: E731
        ratio = lambda k: f"{stat(rs, k)[0] / stat(base, k)[0]:.2f}" if base else "-"  # noqa: E731
        avg4 = cell("avg_level_4") if rs[0]["avg_level_4"] != "" else "-"
        print(f"{algo:<11} {len(rs):>5} {cell('acc_level_1'):>13} {cell('acc_level_2'):>13} "
              f"{cell('acc_level_3'):>13} {cell('acc_level_4'):>13} {avg4:>13} {cell('acc_all'):>13} "
              f"{cell('never_solved'):>13} "
              f"{stat(rs, 'hint_rate')[0]:>9.3f} {stat(rs, 'step_s')[0]:>7.2f} {ratio('step_s'):>6} "
              f"{stat(rs, 'sampled_tokens')[0]:>11.0f} {ratio('sampled_tokens'):>6}")


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
            r = _run(algo, seed, os.path.join(args.out, f"{algo}-s{seed}"), extra)
            rows.append({"time": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
                         "device": device, "torch": torch.__version__, "algo": algo, "seed": seed, **r,
                         "extra_args": " ".join(extra)})
            print(f"{algo:<11} seed {seed}: level-4 {r['acc_level_4']:.3f} all {r['acc_all']:.3f} "
                  f"never_solved {r['never_solved']:.3f} {r['step_s']:.1f} s/step", flush=True)
    _summary(rows, args.algos.split(","))
    append_rows(RESULTS, FIELDS, rows)


if __name__ == "__main__":
    main()
