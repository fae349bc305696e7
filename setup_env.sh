# Sourced by demo.sh, run_tests.sh and the train/test scripts: picks the Python to use, and on a fresh
# machine creates .venv with the pinned requirements (about 2 minutes, once).
# Set BRAINOMALY_PYTHON to use another interpreter (for example a conda environment's python).
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -n "${BRAINOMALY_PYTHON:-}" ]; then
  PYTHON="$BRAINOMALY_PYTHON"
else
  venv="$repo_root/.venv"
  stamp="$venv/.requirements.installed"
  if [ ! -f "$stamp" ] || ! cmp -s "$repo_root/requirements.txt" "$stamp"; then
    echo "Setting up $venv from requirements.txt (once; about 2 minutes)..." >&2
    python3 -m venv "$venv" || { echo "error: could not create $venv; install python3-venv (Python 3.11)." >&2; exit 2; }
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2 &&
      "$venv/bin/python" -m pip install --quiet -r "$repo_root/requirements.txt" >&2 ||
      { echo "error: pip could not install requirements.txt into $venv (see the messages above)." >&2; exit 2; }
    cp "$repo_root/requirements.txt" "$stamp"
  fi
  PYTHON="$venv/bin/python"
fi
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
# NGPU=N (N > 1): main.py runs as N processes on this machine under torchrun (DistributedDataParallel: NCCL on
# CUDA, gloo on CPU); --batch_size is per process. Several machines: call torchrun yourself (see README).
if [ "${NGPU:-1}" -gt 1 ]; then
  MAIN=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" "$repo_root/main.py")
else
  MAIN=("$PYTHON" "$repo_root/main.py")
fi
