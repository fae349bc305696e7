"""Patient ids, what each protocol scores, and the whole stage-1 pipeline through the shell scripts."""
import csv
import json
import os
import subprocess
import sys
from typing import NamedTuple

import torch
from conftest import SLICES_PER_PATIENT, TINY_FLAGS

import main
from brainomaly.data.dataset_layout import patient_id, protocol_slices
from brainomaly.data.healthy_split import draw_split as known_healthy_split
from brainomaly.run.cache_keys import file_fingerprint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_patient_id_is_the_name_before_double_underscore():
    assert patient_id("/d/train/pos/pat_001__007.png") == "pat_001"
    assert patient_id("a__b__003.png") == "a"
    assert patient_id("/d/scan_42.png") == "scan_42.png"  # no `__`: its own patient


def labels_by_patient(root, protocol):
    paths, labels = protocol_slices(root, protocol)
    return {patient_id(p): label for p, label in zip(paths, labels)}


def test_each_protocol_scores_its_own_sets_with_its_labels(toy_dataset):
    inductive = labels_by_patient(toy_dataset, "inductive")
    assert inductive == {**{f"tpos{i}": 1 for i in range(3)}, **{f"tneg{i}": 0 for i in range(3)}}
    transductive = labels_by_patient(toy_dataset, "transductive")
    assert transductive == {**{f"mpos{i}": 1 for i in range(4)}, **{f"mneg{i}": 0 for i in range(4)}}
    # AUCp: known-healthy = 0, the WHOLE mixed set = 1 (its healthy part included): no disease label used.
    aucp = labels_by_patient(toy_dataset, "aucp")
    assert aucp == {**{f"hea{i}": 0 for i in range(6)}, **{f"mpos{i}": 1 for i in range(4)},
                    **{f"mneg{i}": 1 for i in range(4)}}


def run(command, cwd, home=None, **kwargs):
    """A shell script run in folder cwd, with data/ and runs/ in `home` (default: cwd, not the repository)."""
    env = {**os.environ, "PYTHONPATH": REPO, "BRAINOMALY_PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "",
           "BRAINOMALY_HOME": home or cwd}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)


def script_commands(script, args, home):
    """The main.py argument lists that `bash SCRIPT ARGS` runs, for train.sh, test_PROTOCOL.sh and score.sh, with
    data/ and runs/ in home."""
    name, *rest = args
    data, runs = ["--image_dir", f"{home}/data/{name}"], ["--run_dir", f"{home}/runs/{name}"]
    if script == "train.sh":
        return [["--mode", mode, *data, *runs, *rest] for mode in ("train", "train_refiner")]
    if script == "score.sh":
        iteration, path, *flags = rest
        return [["--mode", "score", "--image_dir", path, *runs, "--test_iters", iteration, *flags]]
    iteration, *flags = rest
    return [["--mode", script.removesuffix(".sh"), *data, *runs, "--test_iters", iteration, *flags]]


def main_commands(commands):
    """main.main on each argument list in turn, in this process, as the scripts do (set -e): the exit status of the
    first that fails, else 0."""
    for argv in commands:
        status = main.main(argv)
        if status != 0:
            return status
    return 0


def train_sh_in_process(home, name, *flags):
    """What `bash train.sh NAME FLAGS` runs (stage 1, then stage 2, on data/NAME into runs/NAME under home), in this
    process: for tests whose subject is not the script (starting Python and torch is most of a tiny run's time).
    Returns the exit status of the first stage that fails, else 0."""
    return main_commands(script_commands("train.sh", [name, *flags], home))


def protocol_in_process(home, protocol, name, iteration, *flags):
    """What `bash test_PROTOCOL.sh NAME ITER FLAGS` runs, in this process; its exit status."""
    return main_commands(script_commands(f"test_{protocol}.sh", [name, iteration, *flags], home))


class Finished(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run_in_process(command, capsys, home):
    """What run(command, ...) returns for `bash REPO/SCRIPT ARGS` (train.sh, test_PROTOCOL.sh or score.sh), from the
    main.py commands the script runs, in this process, with data/ and runs/ in home; paths typed in ARGS are relative
    to the current folder, as in the folder the script was run from."""
    _, script_path, *args = command
    capsys.readouterr()
    status = main_commands(script_commands(os.path.basename(script_path), args, home))
    out, err = capsys.readouterr()
    return Finished(status, out, err)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_protocol_scripts_print_their_usage_and_exit_2_without_name_and_iter(tmp_path):
    for protocol in ("inductive", "transductive", "aucp"):
        result = run(["bash", f"{REPO}/test_{protocol}.sh", "Toy"], str(tmp_path))
        assert result.returncode == 2
        assert result.stderr == (f"usage: bash test_{protocol}.sh NAME ITER [main.py flags]   "
                                 f"(ITER: an iteration, latest or all)\n")
    unknown = run(["bash", f"{REPO}/test_protocol.sh", "pixel", "Toy", "10"], str(tmp_path))
    assert unknown.returncode == 2 and unknown.stderr.startswith("usage: bash test_protocol.sh PROTOCOL NAME ITER")


def test_shell_scripts_train_and_run_the_three_protocols(toy_dataset, tmp_path, capsys):
    work = str(tmp_path)  # train.sh NAME reads data/NAME and writes runs/NAME in BRAINOMALY_HOME (here: work)
    train = run(["bash", f"{REPO}/train.sh", "Toy", *TINY_FLAGS, "--num_iters", "6", "--model_save_step", "3",
                 "--sample_step", "3", "--refiner_iters", "0"], work)
    assert train.returncode == 0, train.stderr[-2000:]
    models = os.path.join(work, "runs/Toy/models")
    assert {"3-G.ckpt", "3-D.ckpt", "3-state.ckpt", "6-G.ckpt", "6-D.ckpt", "config.json"} <= set(os.listdir(models))
    assert os.path.isfile(os.path.join(work, "runs/Toy/samples/6-images.png"))

    # AUCp: the known-healthy patient stage 1 held out (--healthy_holdout 0.2 of 6) against the 8 mixed-set ones
    expected = {"inductive": (3 + 3, "tpos", "tneg"), "transductive": (4 + 4, "mpos", "mneg"),
                "aucp": (1 + 8, "m", "hea")}
    for protocol, (n_patients, positive_prefix, negative_prefix) in expected.items():
        # Only the iteration: image size and widths come from the checkpoint's saved config.
        result = run(["bash", f"{REPO}/test_{protocol}.sh", "Toy", "6", "--num_workers", "0"], work)
        assert result.returncode == 0, result.stderr[-2000:]
        out = os.path.join(work, "runs/Toy/results/6/coarse")
        summary = json.load(open(os.path.join(out, f"{protocol}.json")))
        assert summary["n_patients"] == n_patients and summary["n_slices"] == n_patients * SLICES_PER_PATIENT
        assert summary["checkpoint"] == 6
        rows = read_csv(os.path.join(out, f"{protocol}.csv"))
        # the JSON's AUC is the one of the CSV's patient scores (diseased above healthy counts as 1; 9 significant
        # digits keep their order)
        positives = [float(r["score"]) for r in rows if r["label"] == "1"]
        negatives = [float(r["score"]) for r in rows if r["label"] == "0"]
        pairs = [(p > n) + 0.5 * (p == n) for p in positives for n in negatives]
        assert abs(summary["auc"] - sum(pairs) / len(pairs)) < 1e-3, summary["auc"]
        assert list(rows[0]) == ["pid", "label", "n_slices", "score", "prediction"]
        for row in rows:
            assert row["label"] == ("1" if row["pid"].startswith(positive_prefix) else "0")
            assert row["pid"].startswith((positive_prefix, negative_prefix))
        for plot in (f"{protocol}_roc.png", f"{protocol}_scores.png"):
            assert os.path.getsize(os.path.join(out, plot)) > 1000

    held_out = {patient_id(p) for p in known_healthy_split(os.path.join(work, "data/Toy"), 0.2, 0)[1]}
    aucp_rows = read_csv(os.path.join(work, "runs/Toy/results/6/coarse/aucp.csv"))
    assert {row["pid"] for row in aucp_rows if row["label"] == "0"} == held_out

    # the sweep over every checkpoint: test_aucp.sh's command in this process (the script ran above)
    selection = run_in_process(["bash", f"{REPO}/test_aucp.sh", "Toy", "all", "--num_workers", "0"], capsys, work)
    assert selection.returncode == 0, selection.stderr[-2000:]
    table = json.load(open(os.path.join(work, "runs/Toy/results/aucp_selection.json")))
    assert [row["iteration"] for row in table["table"]] == [3, 6]
    # the pick, by the default rule, is printed as written, with every candidate's interval
    assert table["rule"] == "smoothed_last_unless_beaten" and table["best_iteration"] in (3, 6)
    assert (f"Checkpoint picked by the smoothed_last_unless_beaten rule (no disease labels used): {table['best_iteration']} "
            f"with the {table['best_reconstruction']} reconstruction") in selection.stdout
    assert len(table["candidates"]) == 4 and all(r["aucp_low"] <= r["aucp"] <= r["aucp_high"] for r in table["candidates"])


def test_a_run_trained_without_a_holdout_scores_aucp_over_all_known_healthy_patients(toy_dataset, tmp_path):
    work = str(tmp_path)
    assert train_sh_in_process(work, "Toy", *TINY_FLAGS, "--num_iters", "2", "--model_save_step", "2",
                               "--sample_step", "2", "--refiner_iters", "0", "--healthy_holdout", "0") == 0
    assert protocol_in_process(work, "aucp", "Toy", "2", "--num_workers", "0") == 0
    summary = json.load(open(os.path.join(work, "runs/Toy/results/2/coarse/aucp.json")))
    assert summary["n_patients"] == 6 + 8 and summary["known_healthy"] == "all of train/neg"


def test_an_auc_estimate_outside_0_1_is_flagged_not_printed_as_a_figure(capsys):
    from brainomaly.evaluate.protocols import print_result
    result = {"protocol": "aucp", "auc": 0.84, "average_precision": 0.87, "sensitivity": 0.75, "specificity": 0.75,
              "threshold": 0.004, "checkpoint": 4000, "reconstruction": "coarse", "n_patients": 160,
              "n_slices": 1280, "seconds": 19.0, "rho": 0.6, "auc_estimate_from_rho": (0.84 - 0.3) / 0.4}
    print_result(result, "out")
    out = capsys.readouterr().out
    assert "AUC estimate (rho 0.6)" in out and "1.3500" in out and "outside [0, 1]" in out
    print_result({**result, "auc": 0.66, "auc_estimate_from_rho": (0.66 - 0.3) / 0.4}, "out")
    assert "outside [0, 1]" not in capsys.readouterr().out


def test_a_sweep_over_checkpoints_scored_with_different_reconstructions_writes_every_column(toy_dataset, tmp_path,
                                                                                            capsys):
    work = str(tmp_path)
    assert train_sh_in_process(work, "Toy", *TINY_FLAGS, "--num_iters", "6", "--model_save_step", "2",
                               "--sample_step", "6", "--refiner_iters", "1", "--refine_from", "4") == 0
    # --refiner auto scores checkpoint 4 refined (its refiner passed the check), 2 calibrated (its refiner failed
    # the check, and f(x_c) separated better) and 6 coarse (no refiner): the check's verdicts are set here
    models = os.path.join(work, "runs/Toy/models")
    refiner = torch.load(os.path.join(models, "4-R.ckpt"), weights_only=True)
    for iteration, helps in ((2, False), (4, True)):
        check = {**refiner["holdout_check"], "refiner_helps": helps, "fallback": "calibrated"}
        torch.save({**refiner, "refines": iteration, "holdout_check": check,  # a refiner of checkpoint ITER's G
                    "refines_weights": file_fingerprint(os.path.join(models, f"{iteration}-G.ckpt"))},
                   os.path.join(models, f"{iteration}-R.ckpt"))
    assert protocol_in_process(work, "aucp", "Toy", "all", "--num_workers", "0") == 0
    rows = read_csv(os.path.join(work, "runs/Toy/results/aucp_selection.csv"))
    assert [(row["iteration"], row["reconstruction"]) for row in rows] == [
        ("2", "calibrated"), ("4", "refined"), ("6", "coarse")]
    assert [bool(row["auc_refined"]) for row in rows] == [False, True, False]  # blank where not scored refined
    assert all(row["auc_coarse"] and row["auc_calibrated"] for row in rows)
    # the AUCp sweep prints the candidates of the pick (test_decisions); the inductive sweep prints this table
    capsys.readouterr()
    assert protocol_in_process(work, "inductive", "Toy", "all", "--num_workers", "0") == 0
    table = capsys.readouterr().out.split("AUC by checkpoint\n")[1].splitlines()
    header = table[0].split()
    assert header[:3] == ["iteration", "reconstruction", "AUC"] and sorted(header[3:]) == [
        "calibrated", "coarse", "refined"]
    assert [len(line.split()) for line in table[1:4]] == [5, 6, 5]
