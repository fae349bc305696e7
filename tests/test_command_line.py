"""The command line as a new user meets it: short answers to mistyped flags, defaults that work on any run, the
scripts' one rule for where data/ and runs/ are."""
import os
import shutil
import subprocess
import sys

import pytest
from conftest import TINY_FLAGS, write_toy_dataset
from test_protocols import REPO, run

import main


def test_a_mistyped_or_shortened_flag_is_refused_in_a_few_lines_naming_the_closest_flags(capsys):
    with pytest.raises(SystemExit) as exited:
        main.parse_config(["--lambda_g", "5"])  # a prefix of --lambda_gp is not taken for it
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) <= 3, err
    assert "--lambda_g is not a flag; did you mean --lambda_gp" in err and "python main.py --help" in err


def test_a_protocol_scores_the_newest_checkpoint_by_default(toy_dataset, tmp_path, capsys):
    assert main.parse_config(["--mode", "test_aucp"]).test_iters == "latest"
    run_dir = str(tmp_path / "run")  # no checkpoint yet: the message names the folder, not a file 'latest-G.ckpt'
    assert main.main(["--mode", "test_aucp", "--image_dir", toy_dataset, "--run_dir", run_dir]) == 2
    err = capsys.readouterr().err
    assert f"missing checkpoint {run_dir}/models/ITER-G.ckpt (no checkpoint saved yet)" in err and "latest-G" not in err


def test_demo_help_prints_its_usage_before_any_work(tmp_path):
    result = run(["bash", f"{REPO}/demo.sh", "--help"], str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Usage: bash demo.sh [--full] [--data NAME]" in result.stdout
    assert os.listdir(tmp_path) == []  # no cohort, no run


def test_the_scripts_find_data_and_runs_in_the_repository_from_any_folder(tmp_path):
    clone, elsewhere = tmp_path / "clone", tmp_path / "elsewhere"
    elsewhere.mkdir()
    clone.mkdir()
    for script in ("setup_env.sh", "train.sh", "test_protocol.sh", "test_aucp.sh", "score.sh"):
        shutil.copy(os.path.join(REPO, script), clone / script)
    os.symlink(os.path.join(REPO, "main.py"), clone / "main.py")
    write_toy_dataset(str(clone / "data" / "Toy"))
    shutil.copytree(clone / "data/Toy/test/pos", elsewhere / "scans")
    env = {**os.environ, "PYTHONPATH": REPO, "BRAINOMALY_PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("BRAINOMALY_HOME", None)

    def script(*command):
        return subprocess.run(["bash", *command], cwd=elsewhere, env=env, capture_output=True, text=True)

    train = script("../clone/train.sh", "Toy", *TINY_FLAGS, "--num_iters", "2", "--model_save_step", "2",
                   "--refiner_iters", "0")
    assert train.returncode == 0, train.stderr[-2000:]
    assert os.path.isfile(clone / "runs/Toy/models/2-G.ckpt")
    # a path typed on the command line is relative to the folder it was typed in
    score = script("../clone/score.sh", "Toy", "latest", "scans", "--num_workers", "0", "--output", "scores.csv")
    assert score.returncode == 0, score.stderr[-2000:]
    assert os.path.isfile(elsewhere / "scores.csv") and sorted(os.listdir(elsewhere)) == ["scans", "scores.csv"]

    missing = script("../clone/test_aucp.sh", "NoSuchData", "latest")
    assert missing.returncode == 2
    assert missing.stderr.startswith(f"error: missing dataset folder {clone}/data/NoSuchData.")
