#!/usr/bin/env bash
# Score new scans with the model trained on data/NAME, checkpoint ITER, e.g.
#   bash score.sh MedicalData 100000 new_scans/ --save_maps 4      (a folder of PNG/JPG slices <pid>__NNN.png)
#   bash score.sh MedicalData 100000 sub-01.nii.gz                 (a NIfTI volume, or a folder of them)
# Writes one row per patient/scan (pid, n_slices, score, flagged) to runs/NAME/results/ITER/.../scores_TAG.csv.
# NIfTI input is prepared exactly as the run's training data were (runs/NAME/models/prepare.json: N4, registration
# and brain mask when they had them, then the same slicing; --prepared for scans you prepared yourself), and each
# scan also gets TAG-folder/<pid>_anomaly.nii.gz (the map on the scan's own grid and affine) and <pid>_anomaly.png.
# A scan that cannot be prepared, given alone, stops with exit 2; inside a folder it is refused with a warning
# (exit 0 when at least one volume was scored). Existing outputs are never overwritten.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash score.sh NAME ITER PATH [main.py flags]   (PATH: folder of slices, .nii/.nii.gz, or folder of them)" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
name=$1
iteration=$2
folder=$3
shift 3
if [ ! -d "$home/runs/$name" ]; then
  echo "error: missing run folder $home/runs/$name (train it first: bash train.sh $name)." >&2
  exit 2
fi
"${MAIN[@]}" --mode score --image_dir "$folder" --run_dir "$home/runs/$name" --test_iters "$iteration" "$@"
