#!/usr/bin/env bash
# The default run's settings across seeds (docs/RESULTS.md, "Robust default settings"): each setting x
# seed trains 100 steps on the shipped toy with one thread, two runs at a time (so the step times are
# about twice a lone run's), then prints per run the 10-step reward means, the gap between the best and
# the last, and the no-hint greedy accuracy after training; the table is appended to
# bench/results/toy_default_sweep.md ($RESULTS) with the machine, versions and commit. Usage:
#   bash bench/toy_default_sweep.sh "0 1 2" "base|--lr_scheduler_type constant --prompts_per_step 64" "default|"
set -uo pipefail
cd "$(dirname "$0")/.."
SEEDS=$1; shift
OUT=${OUT:-outputs/default_sweep}
mkdir -p "$OUT"
jobs_list=()
for setting in "$@"; do
  for seed in $SEEDS; do jobs_list+=("${setting%%|*}|$seed|${setting#*|}"); done
done
run() {  # name|seed|args
  IFS='|' read -r name seed args <<<"$1"
  # shellcheck disable=SC2086
  .venv/bin/python -m fasthint.train --seed "$seed" --num_threads 1 --output_dir "$OUT/$name-s$seed" \
    --cache_dir "$OUT/cache" --save_steps 0 --resume none $args > "$OUT/$name-s$seed.log" 2>&1
}
for ((i = 0; i < ${#jobs_list[@]}; i += 2)); do
  run "${jobs_list[i]}" &
  if ((i + 1 < ${#jobs_list[@]})); then run "${jobs_list[i + 1]}" & fi
  wait
done
RESULTS=${RESULTS:-bench/results/toy_default_sweep.md}  # the table is appended there too
mkdir -p "$(dirname "$RESULTS")"
.venv/bin/python - "$OUT" <<'PY' | tee -a "$RESULTS"
import glob, json, os, platform, subprocess, sys
import torch
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
           platform.processor())
print(f"\n{cpu} ({os.cpu_count()} cores; each run --num_threads 1, two at a time), torch {torch.__version__}, "
      f"commit {commit}, {sys.argv[1]}\n")
print("| run | 10-step reward means, first -> last (best) | gap | greedy after: all / L1 / L2 / L3 | s/step |")
print("|---|---|---|---|---|")
for d in sorted(glob.glob(os.path.join(sys.argv[1], "*-s*/"))):
    try:
        rows = [json.loads(line) for line in open(d + "metrics.jsonl")]
        after = json.load(open(d + "eval.json"))["eval_after"]
    except OSError:
        print(f"| {os.path.basename(d[:-1])} | (failed: see its .log) | | | |")
        continue
    r = [x["reward/mean"] for x in rows]
    blocks = [sum(r[i:i + 10]) / len(r[i:i + 10]) for i in range(0, len(r), 10)]
    acc = " / ".join(f"{100 * after[k]:.1f}" for k in ("eval/accuracy", "eval/accuracy_level_1",
                                                         "eval/accuracy_level_2", "eval/accuracy_level_3"))
    step = sum(x["time/step_s"] for x in rows[1:]) / max(1, len(rows) - 1)
    print(f"| {os.path.basename(d[:-1])} | {blocks[0]:.3f} -> {blocks[-1]:.3f} ({max(blocks):.3f}) | "
          f"{max(blocks) - blocks[-1]:.3f} | {acc} | {step:.2f} |")
PY
