#!/usr/bin/env bash
# One protocol on data/NAME with checkpoint ITER (a number, latest, or all): what test_inductive.sh,
# test_transductive.sh and test_aucp.sh run, e.g.
#   bash test_protocol.sh inductive MedicalData 100000
# The architecture comes from the checkpoint; extra flags go to main.py (e.g. --refiner off, --save_maps 8).
set -euo pipefail
protocol=${1:-}
case "$protocol" in
  inductive | transductive | aucp) shift ;;
  *)
    echo "usage: bash test_protocol.sh PROTOCOL NAME ITER [main.py flags]   (PROTOCOL: inductive, transductive" \
         "or aucp; ITER: an iteration, latest or all)" >&2
    exit 2 ;;
esac
if [ $# -lt 2 ]; then
  echo "usage: bash test_$protocol.sh NAME ITER [main.py flags]   (ITER: an iteration, latest or all)" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
name=$1
iteration=$2
shift 2
require_dataset "$name"
"${MAIN[@]}" --mode "test_$protocol" --image_dir "$home/data/$name" --run_dir "$home/runs/$name" \
  --test_iters "$iteration" "$@"
