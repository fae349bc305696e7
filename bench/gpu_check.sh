#!/usr/bin/env bash
# The GPU check, about 8 minutes on one H100/H200: the CUDA benchmark at 192 px with the fast path on (bf16 +
# channels_last) and off (fp32 NCHW), then a 2,000-iteration GPU recipe (demo.sh's) on the demo cohort with its
# three protocols; every figure goes to JSON under bench/results/.
#   bash bench/gpu_check.sh
# The cohort must be built beforehand (python make_cohort.py data/Demo): this script needs no nibabel or nilearn.
# Every size comes from the environment, so the same script runs end to end on a CPU at tiny sizes:
#   GPU_CHECK_DEVICE        cuda (default) or cpu
#   GPU_CHECK_DATA          dataset folder (default data/Demo)
#   GPU_CHECK_OUT           where the JSON goes (default bench/results)
#   GPU_CHECK_RUN           the recipe's run folder (default runs/gpu-check; it must not hold a run yet)
#   GPU_CHECK_BENCH_FLAGS   benchmark sizes (default: 192 px, batch 16, reference widths, 3 repeats)
#   GPU_CHECK_RECIPE_FLAGS  the recipe's network sizes (default: demo.sh's GPU recipe)
#   GPU_CHECK_ITERS         stage-1 iterations (default 2000; a checkpoint every quarter)
#   GPU_CHECK_REFINER_ITERS stage-2 iterations (default 500)
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
PYTHON=${BRAINOMALY_PYTHON:-${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}}
device=${GPU_CHECK_DEVICE:-cuda}
data=${GPU_CHECK_DATA:-data/Demo}
out=${GPU_CHECK_OUT:-bench/results}
run=${GPU_CHECK_RUN:-runs/gpu-check}
iters=${GPU_CHECK_ITERS:-2000}
refiner_iters=${GPU_CHECK_REFINER_ITERS:-500}
read -r -a bench_flags <<< "${GPU_CHECK_BENCH_FLAGS:---image_size 192 --batch_size 16 --g_conv_dim 64 --d_conv_dim 64 --g_repeat_num 6 --d_repeat_num 6 --repeats 3 --warmup 1}"
read -r -a recipe <<< "${GPU_CHECK_RECIPE_FLAGS:---image_size 128 --g_conv_dim 64 --d_conv_dim 64 --g_repeat_num 6 --d_repeat_num 6 --batch_size 16 --g_lr 2e-4 --d_lr 2e-4 --lambda_id 10 --g_ema 0.999 --augment_shift 0.06 --refiner_dim 64 --refiner_dim_mults 1,2,4,8 --refiner_attn_levels 2 --refiner_batch_size 16 --ddim_steps 10 --num_workers 4}"

if [ ! -d "$data/train" ]; then
  echo "error: missing dataset $data (no $data/train)." >&2
  echo "Fix: build it first where nibabel and nilearn are installed (python make_cohort.py $data) and bring it along, or set GPU_CHECK_DATA." >&2
  exit 2
fi
if [ -d "$run/models" ]; then
  echo "error: $run already holds a run." >&2
  echo "Fix: delete it (rm -r $run) or set GPU_CHECK_RUN to another folder." >&2
  exit 2
fi
mkdir -p "$out"
tag=$device
started=$(date +%s)

# 1. the benchmark, fast path on and off (the reference mode is measured in the first)
"$PYTHON" bench/benchmark.py --device "$device" "${bench_flags[@]}" --bf16 on --channels_last on \
  --out "$out/${tag}_192_fast_path_on.json"
"$PYTHON" bench/benchmark.py --device "$device" "${bench_flags[@]}" --bf16 off --channels_last off --skip_reference \
  --out "$out/${tag}_192_fast_path_off.json"
bench_done=$(date +%s)

# 2. the recipe: stage 1, stage 2 on the checkpoint AUCp picks, the three protocols on it
save_step=$(( iters >= 4 ? iters / 4 : 1 ))
common=(--device "$device" --image_dir "$data" --run_dir "$run" --use_tensorboard false "${recipe[@]}")
"$PYTHON" main.py --mode train "${common[@]}" --num_iters "$iters" --model_save_step "$save_step" \
  --sample_step "$save_step"
train_done=$(date +%s)
"$PYTHON" main.py --mode train_refiner "${common[@]}" --refiner_iters "$refiner_iters"
refiner_done=$(date +%s)
best=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["best_iteration"])' "$run/results/aucp_selection.json")
for protocol in aucp transductive inductive; do
  "$PYTHON" main.py --mode "test_$protocol" "${common[@]}" --test_iters "$best"
done
done_at=$(date +%s)

"$PYTHON" - "$run" "$out/${tag}_gpu_check_recipe.json" "$best" "$iters" "$refiner_iters" \
  "$(( bench_done - started ))" "$(( train_done - bench_done ))" "$(( refiner_done - train_done ))" \
  "$(( done_at - refiner_done ))" <<'EOF'
import glob, json, os, sys
run, path, best, iters, refiner_iters, *seconds = sys.argv[1:]
results = {}
for name in sorted(glob.glob(os.path.join(run, "results", "**", "*.json"), recursive=True)):
    with open(name) as f:
        results[os.path.relpath(name, os.path.join(run, "results"))] = json.load(f)
with open(os.path.join(run, "models", "config.json")) as f:
    fast_path = json.load(f).get("fast_path")
report = {"run_dir": run, "best_iteration": int(best), "num_iters": int(iters), "refiner_iters": int(refiner_iters),
          "fast_path": fast_path, "results": results,
          "seconds": dict(zip(("benchmark", "stage1", "stage2", "protocols"), map(int, seconds)))}
with open(path, "w") as f:
    json.dump(report, f, indent=2)
print(f"Wrote {path}: stage 1 {seconds[1]} s, stage 2 {seconds[2]} s, protocols {seconds[3]} s, "
      f"benchmark {seconds[0]} s")
EOF
