#!/usr/bin/env bash
# Runs the GPU-only tests and a short default training run on a CUDA machine whose Python already
# has torch/transformers/triton (missing pure-Python wheels may be carried in .whl/).
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
timeout 240 python3 bench/memory.py --preset qwen2-1.5b --seqs 32 --min_len 256 --max_len 2048 \
  --micro_batch_tokens 16384 --repeat 2 2>&1 | tail -12
cp bench/results/memory.csv "$OUT/memory.csv" 2>/dev/null || true
