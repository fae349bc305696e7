#!/usr/bin/env bash
# The transductive protocol on data/NAME with checkpoint ITER (a number, latest, or all), e.g.
#   bash test_transductive.sh MedicalData 100000
# The architecture comes from the checkpoint; extra flags go to main.py (e.g. --refiner off, --save_maps 8).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash test_transductive.sh NAME ITER [main.py flags]   (ITER: an iteration, latest or all)" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
name=$1
iteration=$2
shift 2
"$PYTHON" "$repo_root/main.py" --mode test_transductive --image_dir "data/$name" --run_dir "runs/$name" \
  --test_iters "$iteration" "$@"
