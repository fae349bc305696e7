#!/usr/bin/env bash
# Score an unlabelled folder of slices with the model trained on data/NAME, checkpoint ITER, e.g.
#   bash score.sh MedicalData 100000 new_scans/ --save_maps 4
# Writes one row per patient (pid, n_slices, score, flagged) to runs/NAME/results/ITER/.../scores_FOLDER.csv.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash score.sh NAME ITER FOLDER [main.py flags]" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
name=$1
iteration=$2
folder=$3
shift 3
"${MAIN[@]}" --mode score --image_dir "$folder" --run_dir "runs/$name" --test_iters "$iteration" "$@"
