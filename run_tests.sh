#!/usr/bin/env bash
# The test command: sets up .venv on a fresh machine (once, runtime and test packages), then runs the whole
# suite on the CPU.
set -euo pipefail
BRAINOMALY_REQUIREMENTS=requirements-dev.txt
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$repo_root"
CUDA_VISIBLE_DEVICES="" exec "$PYTHON" -m pytest -q "$@"
