"""Bad input stops with one clear message and exit status 2; training survives kills and resumes exactly."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_FLAGS

import main
from brainomaly.data import dataset_check
from brainomaly.errors import UserError, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_args(root, run_dir, *extra):
    return ["--mode", "train", "--image_dir", root, "--run_dir", run_dir, *TINY_FLAGS, "--preload", "on", *extra]


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_missing_data_folder_exit_2_names_path(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    assert main.main(train_args(missing, str(tmp_path / "run"))) == 2
    err = capsys.readouterr().err
    assert f"missing data folder {missing}" in err and "Fix:" in err
    assert not os.path.exists(tmp_path / "run")


def test_corrupt_image_and_empty_folder_are_named_and_nothing_is_written(toy_dataset, tmp_path, capsys):
    corrupt = os.path.join(toy_dataset, "train/neg", "hea0__009.png")
    with open(corrupt, "wb") as f:
        f.write(b"not a png at all")
    for name in os.listdir(os.path.join(toy_dataset, "train/neg_mixed")):
        os.remove(os.path.join(toy_dataset, "train/neg_mixed", name))
    with open(os.path.join(toy_dataset, "train/pos", "notes.txt"), "w") as f:
        f.write("a non-image file is skipped with a warning")
    run_dir = str(tmp_path / "run")
    assert main.main(["--mode", "check_data", "--image_dir", toy_dataset, "--run_dir", run_dir]) == 2
    err = capsys.readouterr().err
    assert f"unreadable image {corrupt}" in err
    assert f"no images in {os.path.join(toy_dataset, 'train/neg_mixed')}" in err
    assert "skipped 1 non-image file(s)" in err
    assert main.main(train_args(toy_dataset, run_dir, "--num_iters", "2")) == 2
    assert not os.path.exists(run_dir)


def test_patient_in_two_folders_and_too_small_batch_are_refused(toy_dataset, capsys):
    os.rename(os.path.join(toy_dataset, "train/neg/hea0__000.png"), os.path.join(toy_dataset, "train/pos/hea0__000.png"))
    assert main.main(["--mode", "check_data", "--image_dir", toy_dataset, "--batch_size", "64"]) == 2
    err = capsys.readouterr().err
    assert "patient id 'hea0' has slices in" in err
    assert "for a batch of 64" in err


def test_too_small_batch_names_the_flag_of_the_stage_that_batches(toy_dataset, tmp_path, capsys):
    # 6 patients x 3 slices = 18 known-healthy slices: enough for stage 1's --batch_size 4, not for 32.
    run_dir = str(tmp_path / "run")
    stage2 = ["--mode", "train_refiner", "--image_dir", toy_dataset, "--run_dir", run_dir, *TINY_FLAGS]
    assert main.main([*stage2, "--refiner_batch_size", "32"]) == 2
    err = capsys.readouterr().err
    assert "only 18 slices in" in err and "for a batch of 32: add slices or lower --refiner_batch_size." in err
    assert main.main(train_args(toy_dataset, run_dir, "--batch_size", "32")) == 2
    assert "for a batch of 32: add slices or lower --batch_size." in capsys.readouterr().err
    assert not os.path.exists(run_dir)


def test_stage2_checks_only_the_set_it_batches(toy_dataset):
    # Stage 2 draws batches from train/neg alone: a mixed set smaller than its batch is no reason to refuse.
    for folder, keep in (("train/pos", 2), ("train/neg_mixed", 1)):  # 3 mixed slices left
        for name in sorted(os.listdir(os.path.join(toy_dataset, folder)))[keep:]:
            os.remove(os.path.join(toy_dataset, folder, name))
    dataset_check.check_dataset(toy_dataset, 4, batch_flag="--refiner_batch_size", mixed_in_batches=False)
    with pytest.raises(UserError, match="only 3 slices in the mixed set .* lower --batch_size"):
        dataset_check.check_dataset(toy_dataset, 4)


def test_missing_resume_checkpoint_names_resume_iters(toy_dataset, tmp_path, capsys):
    assert main.main(train_args(toy_dataset, str(tmp_path / "run"), "--resume_iters", "5")) == 2
    assert "Fix: pass one of them as --resume_iters, or train first" in capsys.readouterr().err


def test_run_cli_prints_a_user_error_and_returns_2(capsys):
    def fails(argv):
        raise UserError(f"missing folder {argv[0]}.\nFix: create it.")
    assert run_cli(fails, ["data/X"]) == 2
    assert capsys.readouterr().err == "error: missing folder data/X.\nFix: create it.\n"
    assert run_cli(lambda argv: 0, []) == 0


def test_resume_gives_the_same_weights_as_one_run(toy_dataset, tmp_path):
    one_run, two_runs = str(tmp_path / "one"), str(tmp_path / "two")
    assert main.main(train_args(toy_dataset, one_run, "--num_iters", "6", "--model_save_step", "3")) == 0
    assert main.main(train_args(toy_dataset, two_runs, "--num_iters", "3", "--model_save_step", "3")) == 0
    assert main.main(train_args(toy_dataset, two_runs, "--num_iters", "6", "--model_save_step", "3",
                                "--resume_iters", "latest")) == 0
    for part in ("G", "D"):
        ours, theirs = weights(f"{one_run}/models/6-{part}.ckpt"), weights(f"{two_runs}/models/6-{part}.ckpt")
        for name in ours:
            assert torch.allclose(ours[name], theirs[name], atol=1e-6), f"{part} {name} differs after resume"


def test_resume_latest_on_an_empty_run_starts_at_zero(toy_dataset, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert main.main(train_args(toy_dataset, run_dir, "--num_iters", "2", "--resume_iters", "latest")) == 0
    assert f"No stage-1 checkpoint in {run_dir}/models yet: starting from iteration 0." in capsys.readouterr().out
    assert os.path.isfile(f"{run_dir}/models/2-G.ckpt")


def test_new_run_refuses_to_overwrite_checkpoints(toy_dataset, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert main.main(train_args(toy_dataset, run_dir, "--num_iters", "2")) == 0
    before = os.path.getmtime(f"{run_dir}/models/2-G.ckpt")
    assert main.main(train_args(toy_dataset, run_dir, "--num_iters", "2")) == 2
    assert "--resume_iters latest" in capsys.readouterr().err
    assert os.path.getmtime(f"{run_dir}/models/2-G.ckpt") == before


def test_missing_and_mismatched_checkpoints(toy_dataset, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert main.main(train_args(toy_dataset, run_dir, "--num_iters", "4", "--model_save_step", "2")) == 0
    capsys.readouterr()
    test = ["--mode", "test_inductive", "--image_dir", toy_dataset, "--run_dir", run_dir, "--num_workers", "0"]
    assert main.main([*test, "--test_iters", "3"]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir}/models/3-G.ckpt" in err and "Saved iterations in" in err and "2, 4" in err
    assert main.main([*test, "--test_iters", "4", "--image_size", "48"]) == 2
    err = capsys.readouterr().err
    assert "--image_size 48 does not match" in err and "--image_size 32" in err
    assert main.main([*test, "--test_iters", "4", "--refiner", "on"]) == 2
    assert "no refiner checkpoint" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(toy_dataset, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert main.main(train_args(toy_dataset, run_dir, "--num_iters", "2")) == 0
    good = weights(f"{run_dir}/models/2-G.ckpt")
    assert main.main(train_args(toy_dataset, run_dir, "--num_iters", "4", "--resume_iters", "latest",
                                "--lambda_gp", "nan")) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at iteration 3" in err and "last good checkpoint is 2" in err
    assert sorted(os.listdir(f"{run_dir}/models")) == ["2-D.ckpt", "2-G.ckpt", "2-state.ckpt", "config.json"]
    assert all(torch.equal(good[k], v) for k, v in weights(f"{run_dir}/models/2-G.ckpt").items())


def saved_states(models):
    return [n for n in os.listdir(models) if n.endswith("-state.ckpt")] if os.path.isdir(models) else []


def test_training_killed_at_random_moments_resumes_to_the_end(toy_dataset, tmp_path):
    run_dir = str(tmp_path / "run")
    models = f"{run_dir}/models"
    env = {**os.environ, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, f"{REPO}/main.py", *train_args(toy_dataset, run_dir, "--num_iters", "60",
                                                              "--model_save_step", "1", "--sample_step", "1000")]
    rng = random.Random(0)
    kills = 0
    for attempt in range(4):
        resume = ["--resume_iters", "latest"] if saved_states(models) else []
        before = len(saved_states(models))
        process = subprocess.Popen(command + resume, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while process.poll() is None and len(saved_states(models)) <= before and time.time() < deadline:
            time.sleep(0.05)  # wait until this attempt has written a checkpoint, then kill at a random moment
        time.sleep(rng.uniform(0.0, 0.5))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
    assert kills >= 2, "training finished before it could be killed: make it longer"
    final = subprocess.run(command + ["--resume_iters", "latest"], env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    names = os.listdir(models)
    assert "60-G.ckpt" in names
    for name in names:
        if name.endswith(".ckpt") and not name.startswith("."):  # a hidden .NAME.tmpPID.ckpt: a killed write
            torch.load(f"{models}/{name}", weights_only=True)  # every checkpoint left behind loads
    # the killed and resumed run ends where one uninterrupted run of the same command ends
    # (that run in this process: the killed processes are the subject, the reference need not start Python again)
    one_run = str(tmp_path / "one_run")
    assert main.main(train_args(toy_dataset, one_run, "--num_iters", "60", "--model_save_step", "60",
                                "--sample_step", "1000")) == 0
    for part in ("G", "D"):
        ours, theirs = weights(f"{models}/60-{part}.ckpt"), weights(f"{one_run}/models/60-{part}.ckpt")
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.allclose(ours[name], theirs[name], atol=1e-6), f"{part} {name} differs after the kills"
    raw = [torch.load(f"{run}/models/60-state.ckpt", weights_only=True)["generator"] for run in (run_dir, one_run)]
    assert all(torch.allclose(raw[0][name], raw[1][name], atol=1e-6) for name in raw[0])


def test_interrupted_stage2_leaves_no_scoring_refiner_and_resumes_with_its_own_architecture(
        toy_dataset, tmp_path, capsys, monkeypatch):
    from brainomaly.train import stage2_refiner
    run_dir = str(tmp_path / "run")
    assert main.main(train_args(toy_dataset, run_dir, "--num_iters", "2", "--model_save_step", "1")) == 0
    stage2 = ["--mode", "train_refiner", "--image_dir", toy_dataset, "--run_dir", run_dir, "--num_workers", "0",
              "--use_tensorboard", "false", "--refiner_batch_size", "4", "--score_batch_size", "8",
              "--refiner_iters", "4", "--model_save_step", "2"]
    tiny_refiner = ["--refiner_dim", "8", "--refiner_dim_mults", "1,2", "--refiner_attn_levels", "1",
                    "--refiner_heads", "2"]

    def killed(*args):  # the job dies after the periodic save at refiner iteration 2, before the end
        raise KeyboardInterrupt
    monkeypatch.setattr(stage2_refiner, "holdout_check", killed)
    try:
        main.main([*stage2, *tiny_refiner])
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    models = f"{run_dir}/models"
    [picked] = stage2_refiner.unfinished_refiners(main.parse_config(["--run_dir", run_dir]))
    assert not os.path.exists(f"{models}/{picked}-R.ckpt")  # nothing a protocol would score as "the refiner"
    capsys.readouterr()

    # The requeued job repeats the plain command (train.sh hands stage 1's --resume_iters N to stage 2 as well):
    # the latest state continues, and the default --refiner_dim 64 does not apply to it.
    assert main.main([*stage2, "--resume_iters", "1"]) == 0
    out = capsys.readouterr().out
    assert f"Continuing the unfinished refiner of checkpoint {picked} (no new AUCp sweep)." in out
    assert "Resumed stage 2 of checkpoint" in out and "from refiner iteration 2" in out
    assert "(--resume_iters 1 names a stage-1 checkpoint; stage 2 keeps only its latest state" in out
    final = torch.load(f"{models}/{picked}-R.ckpt", weights_only=True)
    assert final["refiner_iteration"] == 4 and final["config"]["refiner_dim"] == 8
    assert final["holdout_check"] is not None
