#!/usr/bin/env bash
# The runs of the label-free decisions study (docs/experiments.md, "The label-free decisions against the labels"):
# three cohorts, the quick demo's stage-1 recipe with a checkpoint every 100 iterations, two seeds, zero and
# identity map init, the default and a doubled --healthy_holdout. Each run: stage 1; every checkpoint scored by
# AUCp and the inductive protocol without the refiner; the quick demo's refiner on the pick, scored forced on.
# Then: python bench/selection_study.py --run RUNS/NAME:NAME ... --recorded bench/results/selection_recorded_curves.json
# Usage: bash bench/selection_runs.sh [DATA_ROOT] [RUNS_ROOT]   (default data/ and runs/ of the repository)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../setup_env.sh"
cd "$repo_root"
data=${1:-data}
runs=${2:-runs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread a process: the runs share the machine with their scoring

[ -d "$data/Demo/train" ] || "$PYTHON" make_cohort.py "$data/Demo"
[ -d "$data/CohortB/train" ] || "$PYTHON" make_cohort.py "$data/CohortB" --seed 11 --severity 0.3 0.9 --lesions \
  --csf_signal 0.16 --gamma_sd 0.2 --noise 0.015 0.045 --bias 0.2
[ -d "$data/CohortC/train" ] || "$PYTHON" make_cohort.py "$data/CohortC" --seed 29 --severity 0.5 1.1 \
  --csf_signal 0.06 --gamma_sd 0.08 --noise 0.02 0.05 --bias 0.25 --mixed 60 --disease_share 0.5 --healthy 60

stage1=(--image_size 64 --batch_size 8 --g_lr 2e-4 --d_lr 2e-4 --lambda_id 10 --g_ema 0.99 --augment_shift 0.06
        --g_conv_dim 32 --d_conv_dim 32 --g_repeat_num 3 --d_repeat_num 4 --num_iters 800 --model_save_step 100
        --sample_step 400)
stage2=(--refiner_dim 16 --refiner_dim_mults 1,2,4 --refiner_attn_levels 1 --refiner_heads 4 --refiner_batch_size 8
        --ddim_steps 1 --refiner_iters 500)
common=(--num_workers 0 --use_tensorboard false)

study_run() {  # NAME COHORT [stage-1 flags]
  local name=$1 cohort=$2; shift 2
  local run=(--image_dir "$data/$cohort" --run_dir "$runs/$name" "${common[@]}")
  [ -f "$runs/$name/models/800-G.ckpt" ] || "$PYTHON" main.py --mode train "${run[@]}" "${stage1[@]}" "$@"
  for protocol in aucp inductive; do
    "$PYTHON" main.py --mode "test_$protocol" "${run[@]}" --test_iters all --refiner off > /dev/null
  done
  local best
  best=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["best_iteration"])' "$runs/$name/results/aucp_selection.json")
  [ -f "$runs/$name/models/$best-R.ckpt" ] || "$PYTHON" main.py --mode train_refiner "${run[@]}" --refine_from "$best" "${stage2[@]}"
  "$PYTHON" main.py --mode test_inductive "${run[@]}" --test_iters "$best" --refiner on "${stage2[@]}" > /dev/null
}

study_run Demo-s0-zero Demo --seed 0
study_run CohortB-s0-zero CohortB --seed 0
study_run CohortC-s0-zero CohortC --seed 0
study_run Demo-s1-identity Demo --seed 1 --map_init identity
study_run CohortB-s1-identity CohortB --seed 1 --map_init identity
study_run CohortC-s1-identity CohortC --seed 1 --map_init identity
study_run CohortC-s2-zero-h40 CohortC --seed 2 --healthy_holdout 0.4
study_run CohortB-s2-identity-h40 CohortB --seed 2 --map_init identity --healthy_holdout 0.4
