#!/usr/bin/env bash
# Runs the GPU-only tests, a short default training run and the memory/kernel benchmarks on a CUDA
# machine whose Python already has torch/transformers/triton; the pure-Python packages it lacks travel
# as wheels in .whl/ (fetch them with scripts/gpu_wheels.sh; carry .whl). At most 8 minutes on one H200.
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -15
python3 -m fasthint.train --max_steps 20 --cache_dir /tmp/fh-cache --output_dir "$OUT/run" --resume none \
  --progress_bar false "$@" 2>&1 | grep -v -i warn | tail -25
cp "$OUT/run/metrics.jsonl" "$OUT/metrics.jsonl" 2>/dev/null || true
# Issue 17: one policy update of a random Qwen2.5-1.5B-shaped model (no download) per trainer option:
# tokens/s, peak memory, activation memory, MFU; rows appended to bench/results/memory.csv (copied to $OUT).
timeout 180 python3 bench/memory.py --preset qwen2-1.5b --seqs 32 --min_len 256 --max_len 2048 \
  --micro_batch_tokens 16384 --repeat 2 2>&1 | tail -12
cp bench/results/memory.csv "$OUT/memory.csv" 2>/dev/null || true
# Issue 19: the policy-gradient loss of Qwen2.5-7B's head (N=16k, bf16): the Triton kernel with the objective
# in its epilogue against the chunked torch path, torch eager, Liger's GRPO loss (where installed) and the
# three bare GEMMs (the floor); rows appended to bench/results/logprobs.csv (copied to $OUT).
timeout 150 python3 bench/logprobs.py --shape 16384,3584,152064 --dtype bfloat16 --ops policy_loss \
  --providers triton,chunked,torch,liger,matmuls --repeat 3 2>&1 | tail -10
cp bench/results/logprobs.csv "$OUT/logprobs.csv" 2>/dev/null || true
