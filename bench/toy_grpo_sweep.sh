#!/usr/bin/env bash
# GRPO on the toy at several learning rates (same warm start, seed, steps); prints before/after
# no-hint accuracy per level. Usage: bash bench/toy_grpo_sweep.sh "1e-4 3e-4 1e-3" [extra train args]
set -uo pipefail
cd "$(dirname "$0")/.."
LRS=${1:-"1e-4 3e-4 1e-3"}; shift || true
OUT=${OUT:-outputs/sweep}
for lr in $LRS; do
  python3 -m fasthint.train --learning_rate "$lr" --output_dir "$OUT/lr$lr" --resume none --progress_bar false "$@" \
    2>&1 | grep -v -i warn | grep -E "accuracy|level|all|error" | sed "s/^/lr=$lr /"
  python3 - "$OUT/lr$lr/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def avg(k, a, b):
    v = [r[k] for r in rows[a:b] if r.get(k) is not None]
    return sum(v) / max(1, len(v))
n = len(rows)
print(f"  train reward first/last quarter: {avg('reward/mean', 0, n // 4):.3f} -> {avg('reward/mean', 3 * n // 4, n):.3f}; "
      f"step time {avg('time/step_s', 1, n):.2f} s; entropy {avg('entropy', 3 * n // 4, n):.3f}")
PY
done
