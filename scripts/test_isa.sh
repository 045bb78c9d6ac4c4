#!/usr/bin/env bash
# The numeric tests again as other x86-64 CPUs run them. Float rounding follows the vector ISA: torch's
# own kernels (ATEN_CPU_CAPABILITY), MKL (MKL_ENABLE_INSTRUCTIONS) and oneDNN (ONEDNN_MAX_CPU_ISA) are held
# to AVX2 (a CPU without AVX-512, e.g. AMD EPYC Zen 2/3), then to their scalar/SSE fallback. A tolerance
# that holds on one CPU only fails here. On a CPU below a level the level simply runs natively.
# Extra arguments go to pytest; FASTHINT_ISA_TESTS overrides the test files.
set -euo pipefail
cd "$(dirname "$0")/.."
TESTS=${FASTHINT_ISA_TESTS:-"tests/test_softcap.py tests/test_linear_logprobs.py tests/test_fused_loss.py
  tests/test_policy_loss.py tests/test_advantages.py tests/test_loss_terms.py tests/test_packing.py
  tests/test_mini_batches.py tests/test_correction.py tests/test_affinity.py"}
for isa in avx2 default; do
  if [ "$isa" = avx2 ]; then mkl=AVX2; dnn=AVX2; else mkl=SSE4_2; dnn=SSE41; fi
  echo "== numeric tests with ATEN_CPU_CAPABILITY=$isa MKL_ENABLE_INSTRUCTIONS=$mkl ONEDNN_MAX_CPU_ISA=$dnn"
  # shellcheck disable=SC2086
  ATEN_CPU_CAPABILITY=$isa MKL_ENABLE_INSTRUCTIONS=$mkl ONEDNN_MAX_CPU_ISA=$dnn \
    .venv/bin/python -m pytest -q -p no:cacheprovider -m "not slow" $TESTS "$@"
done
