"""Both stages through train.sh, scoring with the refiner on and off, anomaly maps, and scoring new scans."""
import json
import os

import numpy as np
from conftest import TINY_FLAGS
from test_protocols import REPO, read_csv, run, run_in_process


def test_two_stages_refined_and_coarse_scoring_maps_and_new_scans(toy_dataset, tmp_path, capsys, monkeypatch):
    work = str(tmp_path)
    train = run(["bash", f"{REPO}/train.sh", "Toy", *TINY_FLAGS, "--num_iters", "4", "--model_save_step", "2",
                 "--sample_step", "2", "--refiner_iters", "3"], work)
    assert train.returncode == 0, train.stderr[-3000:]
    # The commands after it run what the scripts run in this process (starting Python and torch was most of the
    # test's time), from the same folder; the scripts themselves are tested in test_protocols and test_command_line.
    monkeypatch.chdir(work)

    def in_process(command, cwd):
        return run_in_process(command, capsys, cwd)

    selection = json.load(open(f"{work}/runs/Toy/results/aucp_selection.json"))
    best = selection["best_iteration"]
    # the pick chose among every checkpoint's coarse and calibrated AUCp, each with its bootstrap interval
    assert {(row["iteration"], row["reconstruction"]) for row in selection["candidates"]} == {
        (row["iteration"], reconstruction) for row in selection["table"] for reconstruction in ("coarse", "calibrated")}
    assert all(row["aucp_low"] <= row["aucp"] <= row["aucp_high"] for row in selection["candidates"])
    models = f"{work}/runs/Toy/models"
    assert os.path.isfile(f"{models}/{best}-R.ckpt") and os.path.isfile(f"{models}/{best}-R-state.ckpt")
    assert f"{models}/{best}-R.ckpt refines {models}/{best}-G.ckpt" in train.stdout

    # auto follows stage 2's held-out check: the refiner when it passed, else its fallback with a warning.
    check = json.load(open(f"{work}/runs/Toy/results/{best}/refiner_check.json"))
    auto = in_process(["bash", f"{REPO}/test_inductive.sh", "Toy", str(best), "--num_workers", "0", "--ddim_steps",
                       "2"], work)
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert ("failed its held-out check" in auto.stdout) != check["refiner_helps"]
    assert f"({'refined' if check['refiner_helps'] else check['fallback']} reconstruction)" in auto.stdout
    assert check["bar"] == check["fallback"] == selection["best_reconstruction"]

    # on: the refiner, whatever its check said; twice with the same seed, same scores.
    test = ["bash", f"{REPO}/test_inductive.sh", "Toy", str(best), "--num_workers", "0", "--ddim_steps", "2",
            "--refiner", "on"]
    first = in_process([*test, "--save_maps", "1"], work)
    assert first.returncode == 0, first.stderr[-3000:]
    refined_dir = f"{work}/runs/Toy/results/{best}/refined"
    summary = json.load(open(f"{refined_dir}/inductive.json"))
    assert summary["reconstruction"] == "refined" and summary["ddim_steps"] == 2
    scores_once = read_csv(f"{refined_dir}/inductive.csv")
    assert in_process(test, work).returncode == 0
    assert read_csv(f"{refined_dir}/inductive.csv") == scores_once
    maps = sorted(os.listdir(f"{refined_dir}/maps_inductive"))
    assert len(maps) == 2 and maps[0].startswith("diseased_") and maps[1].startswith("healthy_")

    # off: the ablation scores the same checkpoint with x_c alone, in its own folder.
    off = in_process([*test[:-2], "--refiner", "off"], work)
    assert off.returncode == 0, off.stderr[-3000:]
    coarse = json.load(open(f"{work}/runs/Toy/results/{best}/coarse/inductive.json"))
    assert coarse["reconstruction"] == "coarse" and coarse["n_patients"] == summary["n_patients"]
    assert read_csv(f"{work}/runs/Toy/results/{best}/coarse/inductive.csv") != scores_once

    # Stage 2 again on the same checkpoint would overwrite its refiner: refused.
    again = in_process(["bash", f"{REPO}/train.sh", "Toy", *TINY_FLAGS, "--num_iters", "4", "--refine_from",
                        str(best), "--resume_iters", "latest", "--refiner_iters", "3"], work)
    assert again.returncode == 0  # resuming a finished run is allowed and changes nothing
    fresh = in_process(["bash", f"{REPO}/train.sh", "Toy", *TINY_FLAGS, "--refiner_iters", "3"], work)
    assert fresh.returncode == 2 and "would overwrite" in fresh.stderr

    # Scoring new scans: one row per patient, flagged above the known-healthy 95th percentile.
    score = in_process(["bash", f"{REPO}/score.sh", "Toy", str(best), "data/Toy/test/pos", "--num_workers", "0",
                        "--ddim_steps", "2", "--output", "new_scores.csv"], work)
    assert score.returncode == 0, score.stderr[-3000:]
    rows = read_csv(f"{work}/new_scores.csv")
    assert [r["pid"] for r in rows] == ["tpos0", "tpos1", "tpos2"] and all(r["n_slices"] == "3" for r in rows)
    healthy = json.load(open(f"{refined_dir}/healthy_reference.json"))["healthy_patient_scores"]
    threshold = np.percentile(healthy, 95)
    assert [r["flagged"] for r in rows] == [str(int(float(r["score"]) > threshold)) for r in rows]
    again = in_process(["bash", f"{REPO}/score.sh", "Toy", str(best), "data/Toy/test/pos", "--num_workers", "0",
                        "--ddim_steps", "2", "--output", "new_scores.csv"], work)
    assert again.returncode == 2 and "new_scores.csv" in again.stderr and "already exist" in again.stderr and "--output" in again.stderr
    assert read_csv(f"{work}/new_scores.csv") == rows
