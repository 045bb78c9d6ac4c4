#!/usr/bin/env bash
# Fetches into .whl/ the pure-Python wheels fasthint needs that the lent GPU machine's image lacks
# (it has torch, transformers, triton, pandas, pyarrow, xxhash, rich, sympy: see the device notes),
# at the versions of locks/cpu.txt; scripts/gpu_check.sh installs .whl/*.whl into /tmp/site first.
# Also the two comparison kernels bench/logprobs.py times (pure Python on torch + triton): Liger-Kernel
# and Cut Cross-Entropy, at the versions whose APIs the bench calls.
# Run here (with pip access), then name .whl in the device run's carry.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
pins=$(grep -i -E '^(datasets|dill|multiprocess|math-verify|latex2sympy2_extended|antlr4-python3-runtime|json5)==' locks/cpu.txt)
pins="$pins liger-kernel==0.8.5 cut-cross-entropy==25.1.1"
mkdir -p .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
ls .whl
