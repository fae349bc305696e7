#!/usr/bin/env bash
# Refactoring check: a tiny deterministic run (toy cohort of tests/conftest.py: train 20 iterations, stage 2 10, the
# three protocols, AUCp over all checkpoints, score mode) whose CSVs and JSONs two versions must share.
# usage: bash bench/same_program.sh REPO OUT   e.g. on `git archive OLD` and on this tree, then cmp the CSVs.
set -euo pipefail
repo=$(cd "$1" && pwd); out=$2
[ ! -e "$out" ] || { echo "error: $out exists; pass a new folder." >&2; exit 2; }
mkdir -p "$out"; cd "$out"
export PYTHONPATH="$repo"
PY="${BRAINOMALY_PYTHON:-python3}"
# (the repository's path goes to Python as an argument, never inside its code)
"$PY" -c 'import sys; sys.path.insert(0, sys.argv[1] + "/tests"); from conftest import write_toy_dataset
write_toy_dataset("data/Toy")' "$repo"
T=(--image_dir data/Toy --run_dir runs/Toy --image_size 32 --g_conv_dim 8 --d_conv_dim 8 --g_repeat_num 1 --d_repeat_num 3 --batch_size 4 --num_workers 0 --use_tensorboard false --refiner_dim 8 --refiner_dim_mults 1,2 --refiner_attn_levels 1 --refiner_heads 2 --refiner_batch_size 4 --score_batch_size 8 --ddim_steps 2 ${EXTRA:-})
"$PY" "$repo/main.py" --mode train "${T[@]}" --num_iters 20 --model_save_step 10 > log.txt 2>&1
"$PY" "$repo/main.py" --mode train_refiner "${T[@]}" --refiner_iters 10 --refine_from 20 >> log.txt 2>&1
for p in inductive transductive aucp; do "$PY" "$repo/main.py" --mode test_$p "${T[@]}" --test_iters 20 >> log.txt 2>&1; done
"$PY" "$repo/main.py" --mode test_inductive "${T[@]}" --test_iters 20 --refiner off >> log.txt 2>&1
"$PY" "$repo/main.py" --mode test_aucp "${T[@]}" --test_iters all --refiner off >> log.txt 2>&1
"$PY" "$repo/main.py" --mode score "${T[@]}" --image_dir data/Toy/test --test_iters 20 --output score.csv >> log.txt 2>&1 || "$PY" "$repo/main.py" --mode score --image_dir data/Toy/test --run_dir runs/Toy --num_workers 0 --score_batch_size 8 --ddim_steps 2 --test_iters 20 --output score.csv >> log.txt 2>&1
echo done
