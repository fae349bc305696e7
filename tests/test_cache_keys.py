"""Caches computed from a checkpoint know what they were computed from: other settings or other weights, and they
are computed again."""
import json
import os
import shutil

from conftest import TINY_FLAGS, write_toy_dataset

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


def external_site(tmp_path, name="SiteB"):
    """Another site's dataset in the same layout: other patients (ids prefixed 'b'), other images."""
    root = write_toy_dataset(str(tmp_path / "data" / name), seed=1)
    for folder, _, files in os.walk(root):
        for file in files:
            os.rename(os.path.join(folder, file), os.path.join(folder, "b" + file))
    return root


def test_aucp_on_another_dataset_leaves_the_runs_reference_and_pick_alone_and_writes_beside_them(
        toy_dataset, tmp_path, capsys):
    """External validation (AUCp of a run on another site's data) must not become the run's known-healthy reference
    (score mode's threshold and colour scale) nor its checkpoint pick (stage 2, demo.sh and report.py read it)."""
    run_dir = str(tmp_path / "run")
    results = f"{run_dir}/results"
    train(toy_dataset, run_dir, "--num_iters", "4", "--model_save_step", "2")
    aucp(toy_dataset, run_dir, "all")
    own = [f"{results}/aucp_selection.json", f"{results}/4/coarse/healthy_reference.json",
           f"{results}/4/coarse/aucp.json"]
    before = {path: open(path).read() for path in own}
    site_b = external_site(tmp_path)
    capsys.readouterr()
    aucp(site_b, run_dir, "all")
    beside = f"{results}/on_SiteB"
    assert f"{site_b} is not the dataset this run was trained on" in capsys.readouterr().out
    assert {path: open(path).read() for path in own} == before
    external = json.load(open(f"{beside}/aucp_selection.json"))
    assert external["data"].startswith(os.path.realpath(site_b) + " (")
    assert json.load(open(f"{beside}/4/coarse/aucp.json"))["data"] == external["data"]
    assert json.load(open(f"{results}/aucp_selection.json"))["data"].startswith(os.path.realpath(toy_dataset) + " (")
    # the run's reference records the data it was computed on; one that does not (written before it did) is
    # computed again on the run's own data before score mode takes its threshold
    reference = f"{results}/4/coarse/healthy_reference.json"
    saved = json.load(open(reference))
    assert saved["made_with"]["data"].startswith(os.path.realpath(toy_dataset) + " (")
    del saved["made_with"]["data"]
    json.dump(saved, open(reference, "w"))
    assert main.main(["--mode", "score", "--image_dir", os.path.join(toy_dataset, "test/pos"), "--run_dir", run_dir,
                      "--num_workers", "0", "--test_iters", "4", "--output", str(tmp_path / "scores.csv")]) == 0
    assert "is out of date (it does not record the data it was computed on)" in capsys.readouterr().out
    scores = json.load(open(reference))["healthy_patient_scores"]
    assert scores == json.loads(before[reference])["healthy_patient_scores"]
