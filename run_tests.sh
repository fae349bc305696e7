#!/usr/bin/env bash
# The test command: sets up .venv on a fresh machine (once), then runs the whole suite on the CPU.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$repo_root"
CUDA_VISIBLE_DEVICES="" exec "$PYTHON" -m pytest -q "$@"
