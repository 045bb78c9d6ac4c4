#!/usr/bin/env bash
# The main job: set up (first time only) and run the default training (the embedded toy, no download).
# Extra arguments are passed to fasthint.train, e.g. `bash scripts/train.sh --max_steps 10`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/torchrun --nproc_per_node=1 -m fasthint.train "$@"
