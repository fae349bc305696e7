# Sourced by demo.sh, run_tests.sh and the train/test scripts: picks the Python to use, and on a fresh
# machine creates .venv with the pinned requirements.txt (about 2 minutes, once). run_tests.sh sets
# BRAINOMALY_REQUIREMENTS=requirements-dev.txt to add the test packages and the optional preprocessing packages
# (requirements-preprocess.txt, installed without dependency resolution: it lists every dependency itself).
# Set BRAINOMALY_PYTHON to use another interpreter (for example a conda environment's python).
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The scripts' data/NAME and runs/NAME are in the repository, from whatever folder they are run; BRAINOMALY_HOME
# names another folder that holds data/ and runs/. Paths typed on a command line (score.sh's PATH, --output,
# --image_dir) stay relative to the folder they were typed in.
home="${BRAINOMALY_HOME:-$repo_root}"

# stop with one message when dataset $1 is not in $home/data (before any work)
require_dataset() {
  if [ ! -d "$home/data/$1" ]; then
    echo "error: missing dataset folder $home/data/$1." >&2
    echo "Fix: put dataset $1 there in the layout of README, 'Data layout' (python prepare_data.py makes it)," \
         "or set BRAINOMALY_HOME to the folder that holds data/$1." >&2
    exit 2
  fi
}

# pip-install requirements file $1 into .venv unless this very file was installed there already ($3: pip options)
install_requirements() {
  local file="$repo_root/$1" stamp="$2" options="${3:-}"
  if [ ! -f "$stamp" ] || ! cmp -s "$file" "$stamp"; then
    echo "Setting up $venv from $1 (once; about 2 minutes)..." >&2
    python3 -m venv "$venv" || { echo "error: could not create $venv; install python3-venv (Python 3.11)." >&2; exit 2; }
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2 &&
      "$venv/bin/python" -m pip install --quiet $options -r "$file" >&2 ||
      { echo "error: pip could not install $1 into $venv (see the messages above)." >&2; exit 2; }
    cp "$file" "$stamp"
  fi
}

if [ -n "${BRAINOMALY_PYTHON:-}" ]; then
  PYTHON="$BRAINOMALY_PYTHON"
else
  venv="$repo_root/.venv"
  install_requirements requirements.txt "$venv/.requirements.installed"
  if [ "${BRAINOMALY_REQUIREMENTS:-requirements.txt}" = requirements-dev.txt ]; then
    install_requirements requirements-dev.txt "$venv/.requirements-dev.installed"
    install_requirements requirements-preprocess.txt "$venv/.requirements-preprocess.installed" --no-deps
  fi
  PYTHON="$venv/bin/python"
fi
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
# NGPU=N (N > 1): main.py runs as N processes on this machine under torchrun (DistributedDataParallel: NCCL on
# CUDA, gloo on CPU); --batch_size is per process. Several machines: call torchrun yourself (docs/distributed.md).
if [ "${NGPU:-1}" -gt 1 ]; then
  MAIN=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" "$repo_root/main.py")
else
  MAIN=("$PYTHON" "$repo_root/main.py")
fi
