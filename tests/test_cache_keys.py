"""Caches computed from a checkpoint know what they were computed from: other settings or other weights, and they
are computed again."""
import json
import os
import shutil

from conftest import TINY_FLAGS

import main


def train(root, run_dir, *extra):
    assert main.main(["--mode", "train", "--image_dir", root, "--run_dir", run_dir, *TINY_FLAGS, *extra]) == 0


def aucp(root, run_dir, iteration, *extra):
    assert main.main(["--mode", "test_aucp", "--image_dir", root, "--run_dir", run_dir, "--num_workers", "0",
                      "--test_iters", str(iteration), *extra]) == 0


def test_score_mode_does_not_use_a_known_healthy_reference_made_with_another_score_region(toy_dataset, tmp_path,
                                                                                          capsys):
    run_dir = str(tmp_path / "run")
    train(toy_dataset, run_dir, "--num_iters", "2")
    aucp(toy_dataset, run_dir, 2, "--score_region", "image")
    assert main.main(["--mode", "score", "--image_dir", os.path.join(toy_dataset, "test/pos"), "--run_dir", run_dir,
                      "--num_workers", "0", "--test_iters", "2", "--output", str(tmp_path / "scores.csv")]) == 0
    assert "is out of date (it was computed with score_region image (now head))" in capsys.readouterr().out
    reference = f"{run_dir}/results/2/coarse/healthy_reference.json"
    used = json.load(open(reference))
    aucp(toy_dataset, run_dir, 2)  # the head-region reference, scored afresh
    assert used["healthy_patient_scores"] == json.load(open(reference))["healthy_patient_scores"]


def test_a_replaced_checkpoint_gets_its_intensity_correction_fitted_again(toy_dataset, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    models = f"{run_dir}/models"
    train(toy_dataset, run_dir, "--num_iters", "4", "--model_save_step", "2", "--g_ema", "0", "--g_lr", "1e-2")
    for iteration in (2, 4):
        aucp(toy_dataset, run_dir, iteration)
    shutil.copy(f"{models}/2-G.ckpt", f"{models}/4-G.ckpt")
    capsys.readouterr()
    aucp(toy_dataset, run_dir, 4)
    assert f"The intensity correction {models}/4-intensity.json is out of date" in capsys.readouterr().out
    fitted = [json.load(open(f"{models}/{iteration}-intensity.json")) for iteration in (2, 4)]
    assert fitted[0]["values"] == fitted[1]["values"] and fitted[0]["knots"] == fitted[1]["knots"]
