"""The demo's summary table and learning curve read what the protocols wrote."""
import json
import os

import report


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


def test_learning_curve_plots_aucp_and_inductive_by_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    write(f"{run}/results/aucp_selection.json", {"table": [{"iteration": 10, "auc": 0.55}, {"iteration": 20, "auc": 0.6}]})
    write(f"{run}/results/inductive_by_iteration.json",
          {"table": [{"iteration": 10, "auc": 0.7, "reconstruction": "coarse"},
                     {"iteration": 20, "auc": 0.8, "reconstruction": "coarse"}]})
    path = report.learning_curve(run)
    assert path == f"{run}/results/learning_curve.png" and os.path.getsize(path) > 1000
    assert report.learning_curve(str(tmp_path / "empty")) is None
