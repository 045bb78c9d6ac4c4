#!/usr/bin/env bash
# Set up (first time only), lint with ruff and run the test suite on CPU. Extra arguments go to pytest. Then the
# numeric tests under other CPUs' vector ISAs (scripts/test_isa.sh; FASTHINT_SKIP_ISA=1 skips) and the
# vLLM engine's tests in their own environment (scripts/test_vllm.sh; FASTHINT_SKIP_VLLM=1 skips).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .  # lint (pyproject.toml's [tool.ruff]); a finding fails the run
.venv/bin/python -m pytest -q "$@"
if [ "${FASTHINT_SKIP_ISA:-0}" != "1" ]; then
  bash scripts/test_isa.sh  # the numeric tests again under AVX2 and the scalar fallback (other CPUs' rounding)
fi
if [ "${FASTHINT_SKIP_VLLM:-0}" != "1" ]; then
  bash scripts/test_vllm.sh
fi
