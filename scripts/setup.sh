#!/usr/bin/env bash
# Creates ./.venv (if needed) and installs fasthint with the CPU torch wheel and the exact package
# versions of locks/cpu.txt (the ones docs/RESULTS.md was measured with). Idempotent and quick when
# nothing changed. Every pip call uses constraints.txt too, so no CUDA torch is ever pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.fasthint-installed
want=$(cat pyproject.toml constraints.txt locks/cpu.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pyver=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$pyver" != "3.11" ]; then
    echo "note: locks/cpu.txt was made with Python 3.11 (this is $pyver); if pip cannot satisfy it, run" \
         "bash scripts/lock.sh to make a lock for this Python" >&2
  fi
  .venv/bin/python -m pip install -q -c constraints.txt -c locks/cpu.txt "torch==2.13.0"
  .venv/bin/python -m pip install -q -c constraints.txt -c locks/cpu.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi
