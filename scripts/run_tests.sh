#!/usr/bin/env bash
# The README's test command: set up (idempotent) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Two pytest-xdist workers: the 2-rank DeepSpeed tests spend much of their time waiting (for a launcher, a save, a
# signal), which the other worker fills: 12 min -> 7 on 2 cores. Each starts with half of the suite in order and
# takes from the other's when done (worksteal), so the tests that read one training run mostly make it once.
# `-n 0` after it runs the suite in this one process.
python -m pytest tests -q -n 2 --dist worksteal "$@"
