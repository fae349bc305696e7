#!/usr/bin/env bash
# The runs of the healing-speed study (docs/experiments.md, "Healing speed"): the --full recipe of demo.sh and the
# levers on top of it, stage 1 only, a checkpoint every 200 iterations, each checkpoint scored by the inductive
# protocol without the refiner (coarse and calibrated). Labels only judge: nothing here steers a run.
# Then: python bench/healing_speed.py --run RUNS/NAME:BASELINE_AUC ...
# Usage: bash bench/healing_runs.sh RECIPE COHORT [DATA_ROOT] [RUNS_ROOT]
#   RECIPE: reference | warmup | ttur | betas | ramp | lazy_gp | stacked (all of them) | stacked_gp1 (the penalty on
#           every step) | stacked_reflect (and --g_padding reflect) | stacked_ema | stacked_r1 | stacked_cosine |
#           stacked_diffaug (the stacked levers and one stabiliser, docs/method.md)   COHORT: a folder under DATA_ROOT
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../setup_env.sh"
cd "$repo_root"
recipe=$1 cohort=$2
data=${3:-data}
runs=${4:-runs}
iters=${HEALING_ITERS:-1600}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread a process: two runs share a 2-core machine

reference=(--image_size 64 --batch_size 8 --g_lr 2e-4 --d_lr 2e-4 --lambda_id 10 --g_ema 0.99 --augment_shift 0.06
           --g_conv_dim 64 --d_conv_dim 64 --g_repeat_num 6 --d_repeat_num 5 --map_init identity)
warmup=(--d_warmup 200) ttur=(--d_lr 6e-4) betas=(--beta1 0 --beta2 0.99)
ramp=(--lambda_id_start 1 --lambda_id_ramp 1000) lazy_gp=(--gp_every 4)
stacked=("${warmup[@]}" "${ttur[@]}" "${betas[@]}" "${ramp[@]}" "${lazy_gp[@]}")
# the stabilisers, each on top of the stacked levers: a long EMA that takes effect (no warm-up, started once G has
# begun to heal), R1 beside the WGAN-GP term, a cosine decay over the last half, DiffAugment for the critic
ema=(--g_ema 0.999 --g_ema_warmup false --g_ema_start 400) r1=(--r1_gamma 1)
cosine=(--lr_decay true --lr_decay_shape cosine --num_iters_decay $((iters / 2)) --lr_update_step 10)
diffaug=(--diffaug translation,cutout)
case "$recipe" in
  reference) levers=() ;;
  warmup) levers=("${warmup[@]}") ;;
  ttur) levers=("${ttur[@]}") ;;
  betas) levers=("${betas[@]}") ;;
  ramp) levers=("${ramp[@]}") ;;
  lazy_gp) levers=("${lazy_gp[@]}") ;;
  stacked) levers=("${stacked[@]}") ;;
  stacked_ema) levers=("${stacked[@]}" "${ema[@]}") ;;
  stacked_r1) levers=("${stacked[@]}" "${r1[@]}") ;;
  stacked_cosine) levers=("${stacked[@]}" "${cosine[@]}") ;;
  stacked_diffaug) levers=("${stacked[@]}" "${diffaug[@]}") ;;
  stacked_gp1) levers=("${warmup[@]}" "${ttur[@]}" "${betas[@]}" "${ramp[@]}") ;;
  stacked_reflect) levers=("${stacked[@]}" --g_padding reflect) ;;
  *) echo "error: unknown recipe $recipe." >&2
     echo "Fix: one of reference warmup ttur betas ramp lazy_gp stacked stacked_gp1 stacked_reflect stacked_ema" \
          "stacked_r1 stacked_cosine stacked_diffaug." >&2
     exit 2 ;;
esac
run=(--image_dir "$data/$cohort" --run_dir "$runs/heal-$cohort-$recipe" --num_workers 0 --use_tensorboard false)
started=$(date +%s)
[ -f "$runs/heal-$cohort-$recipe/models/$iters-G.ckpt" ] || "$PYTHON" main.py --mode train "${run[@]}" \
  "${reference[@]}" "${levers[@]}" --num_iters "$iters" --model_save_step 200 --sample_step 400
trained=$(date +%s)
"$PYTHON" main.py --mode test_inductive "${run[@]}" --test_iters all --refiner off > /dev/null
echo "heal-$cohort-$recipe: stage 1 $((trained - started)) s, scoring $(( $(date +%s) - trained )) s"
