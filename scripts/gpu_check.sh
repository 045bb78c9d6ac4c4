#!/usr/bin/env bash
# The GPU checks, in order of importance, each under its own time limit so the whole stays within
# 10 minutes on one H200: issue 28's real-path smoke test (scripts/gpu_smoke.py: torch's peak against
# the rehearsal's); the GPU-only tests; issue 19's kernel benchmark (the policy loss of
# Qwen2.5-7B's head at N = 16k against the three bare GEMMs, Liger and the chunked torch path, then the
# log-prob op against Cut Cross-Entropy, then the other Qwen2.5 head shapes); issue 17's memory bench.
# (A CUDA training run is one of the GPU tests.) Runs on a CUDA machine whose Python already has torch/transformers/
# triton; the pure-Python packages it lacks (and Liger, CCE) travel as wheels in .whl/ (fetch them with
# scripts/gpu_wheels.sh; carry .whl). Results: bench/results/*.csv, copied with the log to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
start=$SECONDS
step() { echo; echo "== [$((SECONDS - start)) s] $*"; }
step "device and versions"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
step "issue 28: the real training path (random Qwen2.5-0.5B shape, bf16, packed, Triton head, 3 steps) vs the rehearsal"
timeout 150 python3 scripts/gpu_smoke.py 2>&1 | grep -v "it/s]" | tail -8
step "GPU-only tests (pytest -m gpu)"
timeout 90 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -15
# each bench run has a --budget (providers that would start after it are skipped, rows are kept as they
# come); the outer timeouts are only a safety margin
B="python3 bench/logprobs.py --device cuda --dtype bfloat16 --repeat 3"
step "issue 19: policy loss, Qwen2.5-7B head, N = 16k (the goal shape)"
timeout 200 $B --shape 16384,3584,152064 --ops policy_loss --timeout 50 --budget 180 \
  --providers matmuls,triton,liger,chunked,triton_atomic,triton_filter,torch
step "issue 19: log-probs + entropy under a random upstream gradient, same shape"
timeout 60 $B --shape 16384,3584,152064 --ops logprobs --providers triton,triton_atomic,chunked,cce --timeout 20 \
  --budget 50
step "issue 19: policy loss, the other Qwen2.5 heads (1.5B: N = 4k, 16k, 64k; 7B: N = 4k, 64k)"
timeout 90 $B --shape "4096,1536,151936;16384,1536,151936;65536,1536,151936;4096,3584,152064;65536,3584,152064" \
  --ops policy_loss --providers matmuls,triton,liger --timeout 25 --budget 80
step "issue 17: one policy update of a random Qwen2.5-1.5B-shaped model per trainer option"
timeout 50 python3 bench/memory.py --preset qwen2-1.5b --seqs 32 --min_len 256 --max_len 2048 \
  --micro_batch_tokens 16384 --repeat 2 2>&1 | tail -12
cp bench/results/logprobs.csv bench/results/memory.csv bench/results/gpu_smoke.md "$OUT/" 2>/dev/null || true
step "done"
