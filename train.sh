#!/usr/bin/env bash
# Train on data/NAME: stage 1 (Brainomaly GAN), then stage 2 (residual diffusion refiner) on the stage-1
# checkpoint that AUCp picks without labels. Extra flags go to main.py, e.g.
#   bash train.sh MedicalData --image_size 64 --num_iters 500 --model_save_step 100
#   NGPU=4 bash train.sh MedicalData     (4 processes on this machine, DDP; --batch_size is per process)
# Outputs: runs/NAME/{models,samples,logs,results}.  --refiner_iters 0 skips stage 2.
# data/ and runs/ are the repository's, from any folder (BRAINOMALY_HOME: another folder holding them).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash train.sh NAME [main.py flags]   (trains on data/NAME)" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
name=$1
shift
require_dataset "$name"
"${MAIN[@]}" --mode train --image_dir "$home/data/$name" --run_dir "$home/runs/$name" "$@"
"${MAIN[@]}" --mode train_refiner --image_dir "$home/data/$name" --run_dir "$home/runs/$name" "$@"
