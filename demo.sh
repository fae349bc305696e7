#!/usr/bin/env bash
# The main job on the embedded default data, from a fresh clone:
#   set up .venv (once) -> build the synthetic cohort data/Demo from the MNI152 template in nilearn ->
#   train a CPU-sized stage 1 -> pick the checkpoint by AUCp (no labels) -> train stage 2 on it ->
#   run the inductive, transductive and AUCp protocols with the refiner on and off -> print the table.
# Usage: bash demo.sh [--full] [extra main.py flags]     (outputs: runs/Demo, or runs/Demo-full)
set -euo pipefail
started=$(date +%s)
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$repo_root"

name=Demo
run=runs/Demo
# CPU configuration (README, "The CPU demo configuration", says what each choice costs and buys).
stage1=(--image_size 64 --g_conv_dim 32 --d_conv_dim 32 --g_repeat_num 3 --d_repeat_num 4 --batch_size 8
        --g_lr 2e-4 --d_lr 2e-4 --lambda_id 10)
stage2=(--refiner_dim 16 --refiner_dim_mults 1,2,4 --refiner_attn_levels 1 --refiner_heads 4
        --refiner_batch_size 8 --ddim_steps 3)
if [ "${1:-}" = "--full" ]; then
  shift
  run=runs/Demo-full
  stage1+=(--num_iters 6000 --model_save_step 500 --sample_step 500)
  stage2+=(--refiner_iters 2000)
else
  stage1+=(--num_iters 1000 --model_save_step 200 --sample_step 200)
  stage2+=(--refiner_iters 300)
fi
common=(--image_dir "data/$name" --run_dir "$run" --num_workers 0 --use_tensorboard false)
if [ -d "$run/models" ]; then
  echo "error: $run already holds a run; the demo never overwrites one." >&2
  echo "Fix: move or delete it (rm -r $run) and run bash demo.sh again." >&2
  exit 2
fi
if [ ! -d "data/$name/train" ]; then
  "$PYTHON" make_cohort.py "data/$name"
fi
"$PYTHON" baseline.py "data/$name"
"$PYTHON" main.py --mode train "${common[@]}" "${stage1[@]}" "$@"
"$PYTHON" main.py --mode train_refiner "${common[@]}" "${stage2[@]}" "$@"   # picks the checkpoint by AUCp
best=$("$PYTHON" -c "import json; print(json.load(open('$run/results/aucp_selection.json'))['best_iteration'])")
"$PYTHON" main.py --mode test_inductive "${common[@]}" --test_iters all --refiner off "$@" > /dev/null  # learning curve
for protocol in inductive transductive aucp; do
  "$PYTHON" main.py --mode "test_$protocol" "${common[@]}" "${stage2[@]}" --test_iters "$best" --save_maps 4 --rho 0.6 "$@"
done
for protocol in inductive transductive; do  # the ablation: the same checkpoint without the refiner
  "$PYTHON" main.py --mode "test_$protocol" "${common[@]}" --test_iters "$best" --refiner off "$@" > /dev/null
done
"$PYTHON" report.py --image_dir "data/$name" --run_dir "$run" --iteration "$best" --seconds $(( $(date +%s) - started ))
