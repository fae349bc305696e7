"""The demo's summary table and learning curve read what the protocols wrote."""
import json
import os

from brainomaly.evaluate import report


def write(path, payload):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f)


def test_summary_rows_put_refined_coarse_and_baseline_side_by_side(tmp_path, capsys):
    run, data = str(tmp_path / "run"), str(tmp_path / "data")
    write(f"{run}/results/40/refined/inductive.json", {"auc": 0.9, "pixel_auroc": 0.7, "best_dice": 0.2})
    write(f"{run}/results/40/refined/aucp.json", {"auc": 0.6})
    write(f"{run}/results/40/coarse/inductive.json", {"auc": 0.8})
    write(f"{data}/baseline.json", {"auc": {"inductive": 0.75, "transductive": 0.7, "aucp": None}})
    rows = dict(report.summary_rows(data, run, 40))
    assert rows["Brainomaly-Diff, refined (ckpt 40)"] == {"inductive": 0.9, "transductive": None, "aucp": 0.6,
                                                          "pixel_auroc": 0.7, "best_dice": 0.2}
    assert rows["Brainomaly-Diff, coarse (ckpt 40)"]["inductive"] == 0.8
    assert rows["baseline: CSF fraction"]["transductive"] == 0.7
    report.print_table(list(rows.items()))
    assert "0.900" in capsys.readouterr().out


def write_sweeps(run):
    """The AUCp selection and the inductive sweep of checkpoints 10 and 20, as the protocols write them."""
    write(f"{run}/results/aucp_selection.json", {
        "table": [{"iteration": 10, "auc": 0.55, "reconstruction": "coarse"},
                  {"iteration": 20, "auc": 0.6, "reconstruction": "coarse"}],
        "best_iteration": 20, "best_reconstruction": "coarse",
        "candidates": [{"iteration": 10, "reconstruction": "coarse", "aucp": 0.55, "aucp_low": 0.4, "aucp_high": 0.7},
                       {"iteration": 20, "reconstruction": "coarse", "aucp": 0.6, "aucp_low": 0.45, "aucp_high": 0.75}]})
    write(f"{run}/results/inductive_by_iteration.json",
          {"table": [{"iteration": 10, "auc": 0.7, "reconstruction": "coarse"},
                     {"iteration": 20, "auc": 0.8, "reconstruction": "coarse"}]})


def test_learning_curve_plots_aucp_and_inductive_by_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    write_sweeps(run)
    path = report.learning_curve(run)
    assert path == f"{run}/results/learning_curve.png" and os.path.getsize(path) > 1000
    assert report.learning_curve(str(tmp_path / "empty")) is None


def test_learning_curve_marks_the_refined_checkpoint_beside_the_coarse_curves(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    write_sweeps(run)
    write(f"{run}/results/20/refined/inductive.json", {"auc": 0.85})
    write(f"{run}/results/20/refined/aucp.json", {"auc": 0.65})
    plotted = {}
    monkeypatch.setattr(report.visualize, "save_learning_curve",
                        lambda iterations, curves, path, title, intervals, picked: plotted.update(
                            iterations=iterations, curves=curves, intervals=intervals, picked=picked))
    report.learning_curve(run, iteration=20)
    assert plotted["iterations"] == [10, 20]
    # AUCp's bootstrap interval as a band, and the label-free pick marked on its curve
    assert plotted["intervals"] == {"AUCp (no labels), coarse": ([0.4, 0.45], [0.7, 0.75])}
    assert plotted["picked"] == (20, "AUCp (no labels), coarse")
    assert plotted["curves"] == {"AUCp (no labels), coarse": [0.55, 0.6], "AUCp (no labels), refined": [None, 0.65],
                                 "inductive AUC, coarse": [0.7, 0.8], "inductive AUC, refined": [None, 0.85]}


def test_refined_row_of_a_refiner_that_failed_its_held_out_check_says_it_was_not_used(tmp_path, capsys):
    run, data = str(tmp_path / "run"), str(tmp_path / "data")
    write(f"{run}/results/40/refined/inductive.json", {"auc": 0.75})
    write(f"{run}/results/40/coarse/inductive.json", {"auc": 0.78})
    write(f"{run}/results/40/refiner_check.json", {"checkpoint": 40, "refiner_helps": False})
    rows = report.summary_rows(data, run, 40)
    report.print_table(rows)
    lines = capsys.readouterr().out.splitlines()
    refined = next(line for line in lines if "refined (ckpt 40)" in line)
    coarse = next(line for line in lines if "coarse (ckpt 40)" in line)
    assert "0.750" in refined and refined.endswith("refiner failed its held-out check (not used)")
    assert "held-out check" not in coarse

    write(f"{run}/results/40/refiner_check.json", {"checkpoint": 40, "refiner_helps": True})
    assert "note" not in dict(report.summary_rows(data, run, 40))["Brainomaly-Diff, refined (ckpt 40)"]


def test_report_names_only_the_result_folders_that_exist(tmp_path, capsys):
    run, data = str(tmp_path / "run"), str(tmp_path / "data")
    write(f"{run}/results/40/coarse/inductive.json", {"auc": 0.78})
    os.makedirs(f"{run}/results/40/coarse/maps_inductive")
    report.main(["--image_dir", data, "--run_dir", run, "--iteration", "40"])
    out = capsys.readouterr().out
    assert f"Plots, CSVs and JSONs: {run}/results/40/coarse/\n" in out
    assert f"Anomaly maps: {run}/results/40/coarse/maps_*/\n" in out
    assert "refined" not in out
