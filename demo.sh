#!/usr/bin/env bash
# The main job on the embedded default data, from a fresh clone:
#   set up .venv (once) -> build the synthetic cohort data/Demo from the MNI152 template in nilearn ->
#   CSF-fraction baseline -> train stage 1 -> pick the checkpoint by AUCp (no labels) -> train stage 2 on it ->
#   run the AUCp, inductive and transductive protocols with the refiner on and off -> print the table.
# Usage: bash demo.sh [--full] [--data NAME] [extra main.py flags]
#   --full       the CPU recipe that heals (reference widths, 3,600 iterations; 47 min with --data CohortB on
#                2 cores with bf16 units, docs/experiments.md); with a GPU the GPU recipe runs either way
#   --data NAME  the same recipe on your own slices in data/NAME (no cohort is built); outputs runs/NAME-demo
# With a CUDA GPU the GPU recipe runs (real widths, 128 px); without one the CPU recipe (docs/experiments.md
# says what each choice costs and buys). Outputs: runs/Demo (runs/Demo-full, runs/NAME-demo).
# data/ and runs/ are the repository's, from any folder (BRAINOMALY_HOME: another folder holding them).
set -euo pipefail
started=$(date +%s)

# the command line first, before any work
for arg in "$@"; do
  case "$arg" in
    -h | --help) sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed -n 's/^# \{0,1\}//p'; exit 0 ;;
  esac
done
name=Demo
suffix=""
full=false
while [ $# -gt 0 ]; do
  case "$1" in
    --full) full=true; suffix="-full"; shift ;;
    --data)
      [ $# -ge 2 ] || { echo "error: --data needs a dataset name (a folder under data/)." >&2; exit 2; }
      name=$2; shift 2 ;;
    *) break ;;
  esac
done
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
# the rest goes to main.py: a mistyped flag stops here, not after the cohort and the baseline
"$PYTHON" -c 'import sys, main; main.parse_config(sys.argv[1:])' "$@" || exit 2
cd "$home"  # the demo takes no paths: it runs where data/ and runs/ are, and prints them from there
run="runs/$name${suffix}"
[ "$name" = Demo ] || run="runs/$name-demo$suffix"
data="data/$name"

if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  # GPU recipe: reference widths at 128 px; its time and AUCs are not measured (docs/experiments.md).
  stage1=(--image_size 128 --g_conv_dim 64 --d_conv_dim 64 --g_repeat_num 6 --d_repeat_num 6 --batch_size 16
          --g_lr 2e-4 --d_lr 2e-4 --lambda_id 10 --g_ema 0.999 --augment_shift 0.06
          --num_iters 4000 --model_save_step 500 --sample_step 500)
  stage2=(--refiner_dim 64 --refiner_dim_mults 1,2,4,8 --refiner_attn_levels 2 --refiner_batch_size 16
          --refiner_iters 1500 --ddim_steps 10)
  loader=(--num_workers 4)
else
  # CPU recipe (2 cores): docs/experiments.md, "The CPU recipe", says what each choice costs and buys.
  stage1=(--image_size 64 --batch_size 8 --g_lr 2e-4 --d_lr 2e-4 --lambda_id 10 --g_ema 0.99 --augment_shift 0.06)
  stage2=(--refiner_dim 16 --refiner_dim_mults 1,2,4 --refiner_attn_levels 1 --refiner_heads 4
          --refiner_batch_size 8 --ddim_steps 1)
  loader=(--num_workers 0)
  if $full; then
    # The healing point of the study at fixed wall-clock (docs/experiments.md): reference widths at 64 px,
    # started at x_c = x so that what it scores is G's own change; it heals from 2,000-2,800 iterations on.
    stage1+=(--g_conv_dim 64 --d_conv_dim 64 --g_repeat_num 6 --d_repeat_num 5 --map_init identity
             --num_iters 3600 --model_save_step 400 --sample_step 400)
    stage2+=(--refiner_iters 1500)
  else
    # The demo's widths: the fastest to train; no point of the study heals within its 15 minutes.
    stage1+=(--g_conv_dim 32 --d_conv_dim 32 --g_repeat_num 3 --d_repeat_num 4
             --num_iters 800 --model_save_step 200 --sample_step 200)
    stage2+=(--refiner_iters 500)
  fi
fi
common=(--image_dir "$data" --run_dir "$run" "${loader[@]}" --use_tensorboard false)
if [ -d "$run/models" ]; then
  echo "error: $run already holds a run; the demo never overwrites one." >&2
  echo "Fix: move or delete it (rm -r $run) and run bash demo.sh again." >&2
  exit 2
fi
if [ "$name" = Demo ] && [ ! -d "$data/train" ]; then
  "$PYTHON" "$repo_root/make_cohort.py" "$data"
elif [ ! -d "$data" ]; then
  echo "error: missing dataset folder $data." >&2
  echo "Fix: put your slices there in the layout of README, 'Data layout' (python prepare_data.py makes it)." >&2
  exit 2
fi
"$PYTHON" "$repo_root/baseline.py" "$data" || echo "(no CSF-fraction baseline for $data)"
# stage 1 records the stage-2 flags too, so that `bash train.sh NAME --resume_iters latest` after a kill runs both
# stages as this recipe does (docs/reproducibility.md, "Resume")
"$PYTHON" "$repo_root/main.py" --mode train "${common[@]}" "${stage1[@]}" "${stage2[@]}" "$@"
"$PYTHON" "$repo_root/main.py" --mode train_refiner "${common[@]}" "${stage2[@]}" "$@"   # picks the checkpoint by AUCp
# (paths go to Python as arguments, never inside its code: a quote in a dataset name must not end a string)
best=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["best_iteration"])' "$run/results/aucp_selection.json")
protocols=(aucp transductive)  # AUCp first: its known-healthy maps set every panel's colour scale
has_test=false
[ -d "$data/test/pos" ] && [ -d "$data/test/neg" ] && has_test=true && protocols+=(inductive)
rho=()  # (expanded as ${rho[@]+...}: an empty array under set -u is an error on bash before 4.4, e.g. macOS's)
[ "$name" = Demo ] && rho=(--rho 0.6)  # the cohort's healthy share of the mixed set (48 of 80 subjects)
for protocol in "${protocols[@]}"; do
  "$PYTHON" "$repo_root/main.py" --mode "test_$protocol" "${common[@]}" "${stage2[@]}" --test_iters "$best" --save_maps 4 ${rho[@]+"${rho[@]}"} "$@"
done
if [ -f "$run/models/$best-R.ckpt" ] && [ ! -f "$run/results/$best/refined/aucp.json" ]; then
  # auto scored x_c (the refiner failed its held-out check): score x_r as well, so the table shows what it did
  for protocol in "${protocols[@]}"; do
    "$PYTHON" "$repo_root/main.py" --mode "test_$protocol" "${common[@]}" "${stage2[@]}" --test_iters "$best" --refiner on "$@" > /dev/null
  done
fi
for protocol in "${protocols[@]}"; do  # the ablation: the same checkpoint without the refiner
  "$PYTHON" "$repo_root/main.py" --mode "test_$protocol" "${common[@]}" --test_iters "$best" --refiner off "$@" > /dev/null
done
if $has_test; then  # the learning curve: every stage-1 checkpoint, coarse
  "$PYTHON" "$repo_root/main.py" --mode test_inductive "${common[@]}" --test_iters all --refiner off "$@" > /dev/null
fi
"$PYTHON" "$repo_root/report.py" --image_dir "$data" --run_dir "$run" --iteration "$best" --seconds $(( $(date +%s) - started ))
