"""A run remembers how it was made: a resume continues it with its own settings, and its held-out known-healthy
patients are stored, so later changes to train/neg change no label-free number."""
import glob
import json
import os
import shutil

import torch
from conftest import TINY_FLAGS
from test_protocols import REPO, read_csv, run, train_sh_in_process

import main
from brainomaly.run import run_config

# a run unlike the defaults in every setting a resume could lose
RUN_FLAGS = [*TINY_FLAGS, "--seed", "3", "--g_lr", "3e-4", "--d_lr", "2e-4", "--lambda_id", "5",
             "--augment_shift", "0.1", "--g_ema", "0.9", "--healthy_holdout", "0.4", "--num_iters", "6",
             "--model_save_step", "3", "--sample_step", "3", "--refiner_iters", "2", "--refiner_lr", "1e-3",
             "--refiner_ema", "0.9", "--refine_from", "6"]


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def kill_after_first_checkpoint(run_dir):
    """What a kill of the run leaves once stage 1 has saved iteration 3 and before it saves 6."""
    models = os.path.join(run_dir, "models")
    for path in {*glob.glob(f"{models}/6-*"), *glob.glob(f"{models}/*-R*.ckpt"), *glob.glob(f"{models}/*.json")}:
        if not path.endswith("config.json"):
            os.remove(path)
    shutil.rmtree(os.path.join(run_dir, "results"), ignore_errors=True)


def test_resume_latest_after_a_kill_continues_the_run_with_its_own_settings(toy_dataset, tmp_path):
    work = str(tmp_path)
    # the uninterrupted run, trained in this process (the resume below is the script under test)
    assert train_sh_in_process(work, "Toy", *RUN_FLAGS) == 0
    shutil.copytree(f"{work}/runs/Toy", f"{work}/runs/Killed")
    kill_after_first_checkpoint(f"{work}/runs/Killed")
    shutil.copytree(f"{work}/data/Toy", f"{work}/data/Killed")

    # the documented resume, none of the run's flags repeated
    resumed = run(["bash", f"{REPO}/train.sh", "Killed", "--resume_iters", "latest", "--num_workers", "0",
                   "--use_tensorboard", "false"], work, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("6-G.ckpt", "6-D.ckpt", "6-R.ckpt"):
        ours, theirs = weights(f"{work}/runs/Toy/models/{name}"), weights(f"{work}/runs/Killed/models/{name}")
        for key in ours:
            assert torch.allclose(ours[key], theirs[key], atol=1e-6), f"{name} {key} differs after the resume"


def train(root, run_dir, *flags):
    return main.main(["--mode", "train", "--image_dir", root, "--run_dir", run_dir, *flags])


def test_a_resume_refuses_another_seed_and_records_a_changed_flag(toy_dataset, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert train(toy_dataset, run_dir, *RUN_FLAGS) == 0
    models = f"{run_dir}/models"
    before = sorted(os.listdir(models))
    capsys.readouterr()
    assert train(toy_dataset, run_dir, "--resume_iters", "latest", "--seed", "4") == 2
    err = capsys.readouterr().err
    assert "--seed 4" in err and "--seed 3" in err
    assert sorted(os.listdir(models)) == before

    assert train(toy_dataset, run_dir, "--resume_iters", "latest", "--num_iters", "7", "--num_workers", "0",
                 "--use_tensorboard", "false") == 0
    assert capsys.readouterr().out.count("--num_iters 6 -> 7: continuing to 7") == 1
    assert os.path.isfile(f"{models}/7-G.ckpt")
    saved = json.load(open(f"{models}/config.json"))
    assert saved["num_iters"] == 7 and saved["g_lr"] == 3e-4
    assert saved["history"][-1]["changed"] == {"num_iters": {"from": 6, "to": 7}}


def test_the_held_out_patients_are_stored_and_later_changes_to_train_neg_change_no_label_free_number(
        toy_dataset, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert train(toy_dataset, run_dir, *RUN_FLAGS, "--num_iters", "3") == 0
    saved = json.load(open(f"{run_dir}/models/config.json"))["known_healthy_patients"]
    stored = torch.load(f"{run_dir}/models/3-G.ckpt", weights_only=True)["config"]["known_healthy_patients"]
    assert stored == saved and len(saved["held_out"]) == 2 and len(saved["trained_on"]) == 4
    aucp = ["--mode", "test_aucp", "--image_dir", toy_dataset, "--run_dir", run_dir, "--test_iters", "3",
            "--num_workers", "0"]

    def label_free_numbers():
        assert main.main(aucp) == 0
        summary = json.load(open(f"{run_dir}/results/3/coarse/aucp.json"))
        rows = read_csv(f"{run_dir}/results/3/coarse/aucp.csv")
        return (summary["auc"], summary["auc_by_reconstruction"],
                sorted(row["pid"] for row in rows if row["label"] == "0"))

    before = label_free_numbers()
    assert before[2] == saved["held_out"]
    healthy = f"{toy_dataset}/train/neg"
    for name in sorted(os.listdir(healthy)):  # two new patients, and one trained-on patient gone
        if name.startswith(saved["held_out"][0]):
            for prefix in ("new", "later"):
                shutil.copy(f"{healthy}/{name}", f"{healthy}/{prefix}{name}")
        if name.startswith(saved["trained_on"][0]):
            os.remove(f"{healthy}/{name}")
    capsys.readouterr()
    assert label_free_numbers() == before
    out = capsys.readouterr().out
    assert "2 patient(s) in" in out and "are ignored" in out

    for name in os.listdir(healthy):
        if name.startswith(saved["held_out"][1]):
            os.remove(f"{healthy}/{name}")
    assert main.main(aucp) == 2
    assert saved["held_out"][1] in capsys.readouterr().err


def test_a_run_whose_data_moved_to_another_folder_scores_aucp_over_its_held_out_patients(toy_dataset, tmp_path):
    run_dir = str(tmp_path / "run")
    assert train(toy_dataset, run_dir, *RUN_FLAGS, "--num_iters", "2") == 0
    held_out = json.load(open(f"{run_dir}/models/config.json"))["known_healthy_patients"]["held_out"]
    moved = str(tmp_path / "elsewhere" / "Toy")  # as on another machine: the recorded folder is gone
    shutil.move(toy_dataset, moved)
    assert main.main(["--mode", "test_aucp", "--image_dir", moved, "--run_dir", run_dir, "--test_iters", "2",
                      "--num_workers", "0"]) == 0
    rows = read_csv(f"{run_dir}/results/2/coarse/aucp.csv")
    assert sorted(row["pid"] for row in rows if row["label"] == "0") == held_out


def file_bytes(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


def test_a_resume_from_an_older_checkpoint_is_refused_unless_the_newer_ones_are_set_aside(toy_dataset, tmp_path,
                                                                                             capsys):
    """--resume_iters 3 with checkpoint 6 saved would train 4-6 again and overwrite 6 (and leave its refiner and
    results paired with another generator): refused; --set_aside_newer moves them aside, nothing is lost."""
    run_dir = str(tmp_path / "run")
    models = f"{run_dir}/models"
    flags = [*TINY_FLAGS, "--num_iters", "6", "--model_save_step", "3", "--sample_step", "3"]
    assert train(toy_dataset, run_dir, *flags) == 0
    assert main.main(["--mode", "test_aucp", "--image_dir", toy_dataset, "--run_dir", run_dir, "--test_iters", "6",
                      "--num_workers", "0"]) == 0
    before = file_bytes(models)
    capsys.readouterr()
    assert train(toy_dataset, run_dir, "--resume_iters", "3", "--num_workers", "0") == 2
    err = capsys.readouterr().err
    assert (f"--resume_iters 3 would train again from iteration 3 and overwrite the newer checkpoint(s) 6 in "
            f"{models}") in err and "--set_aside_newer" in err and "Traceback" not in err
    assert file_bytes(models) == before

    assert train(toy_dataset, run_dir, "--resume_iters", "3", "--set_aside_newer", "--num_workers", "0") == 0
    out = capsys.readouterr().out
    aside = f"{models}/set_aside_after_3"
    assert f"Moved the checkpoint(s) after iteration 3 to {aside}" in out
    kept = file_bytes(aside)
    assert {name: kept[name] for name in before if name.startswith("6-")} == \
        {name: data for name, data in before.items() if name.startswith("6-")}
    assert os.path.isfile(f"{run_dir}/results/set_aside_after_3/6/coarse/aucp.json")
    assert not os.path.exists(f"{run_dir}/results/6")
    assert os.path.isfile(f"{models}/6-G.ckpt") and os.path.isfile(f"{models}/3-G.ckpt")


def test_scoring_and_the_pick_take_the_runs_recorded_flags_unless_typed(toy_dataset, tmp_path, capsys):
    """The run's --select, --select_candidates, --score_region, --ddim_steps and --refiner_samples (recorded in
    config.json) are what its protocols and its pick use when the command does not type them: the refiner's check
    was made with them, and the pick the refiner was trained on was made by them."""
    run_dir = str(tmp_path / "run")
    results = f"{run_dir}/results"
    recorded = ["--select", "max", "--select_candidates", "coarse", "--score_region", "image", "--refiner_samples", "2"]
    assert train(toy_dataset, run_dir, *TINY_FLAGS, *recorded, "--num_iters", "4", "--model_save_step", "2") == 0
    assert main.main(["--mode", "train_refiner", "--image_dir", toy_dataset, "--run_dir", run_dir, "--refine_from", "4",
                      "--refiner_iters", "2", "--num_workers", "0", "--use_tensorboard", "false"]) == 0
    scoring = ["--image_dir", toy_dataset, "--run_dir", run_dir, "--num_workers", "0"]
    capsys.readouterr()
    assert main.main(["--mode", "test_aucp", *scoring, "--test_iters", "all"]) == 0
    out = capsys.readouterr().out
    assert ("Scoring with this run's settings (its config.json; a typed flag overrides one): --score_region image, "
            "--ddim_steps 2, --refiner_samples 2, --select max, --select_candidates coarse.") in out
    selection = json.load(open(f"{results}/aucp_selection.json"))
    assert (selection["rule"], selection["candidate_set"]) == ("max", "coarse")
    assert selection["best_reconstruction"] == "coarse"

    assert main.main(["--mode", "test_inductive", *scoring, "--test_iters", "4", "--refiner", "on"]) == 0
    result = json.load(open(f"{results}/4/refined/inductive.json"))
    assert (result["score_region"], result["ddim_steps"], result["refiner_samples"]) == ("image", 2, 2)
    assert main.main(["--mode", "test_inductive", *scoring, "--test_iters", "4", "--refiner", "on",
                      "--ddim_steps", "1"]) == 0
    assert "--ddim_steps 1 typed (this run records 2): scoring with 1." in capsys.readouterr().out
    assert json.load(open(f"{results}/4/refined/inductive.json"))["ddim_steps"] == 1

    # a typed rule is used, and said to differ from the run's
    assert main.main(["--mode", "test_aucp", *scoring, "--test_iters", "all", "--select", "last"]) == 0
    assert "--select last typed (this run records max): scoring with last." in capsys.readouterr().out
    assert json.load(open(f"{results}/aucp_selection.json"))["rule"] == "last"


def test_every_flag_is_recorded_by_the_run_or_named_as_not_changing_what_it_trains():
    """A flag that changes what a run trains must be in RUN_FLAGS, or a resume and stage 2 silently use its
    default instead of the run's value; every other flag is named, with why, in NOT_RECORDED."""
    flags = {action.dest for action in main.build_parser()._actions if action.option_strings and action.dest != "help"}
    recorded, exempt = set(run_config.RUN_FLAGS), set(run_config.NOT_RECORDED)
    assert not recorded & exempt
    assert flags - recorded - exempt == set(), "flags neither recorded nor named as not recorded"
    assert (recorded | exempt) - flags == set(), "names of no flag"
    assert set(run_config.SCORING_FLAGS) <= recorded
