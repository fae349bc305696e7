"""Summarise a finished run: the three protocols with the refiner on and off beside the baseline, and the
learning curve (AUCp and inductive AUC against iterations).

Usage: python report.py --image_dir data/Demo --run_dir runs/Demo --iteration ITER [--seconds S]
"""
import argparse
import glob
import json
import os

from brainomaly import decisions, visualize
from brainomaly.data.dataset_layout import PROTOCOL_SETS
from brainomaly.run import run_layout


def read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def summary_rows(image_dir, run_dir, iteration):
    """(name, {protocol: value or None}) rows: refined, calibrated, coarse and the CSF baseline. A reconstruction
    that was not scored on its own still gets its AUC where another run of the protocol scored it beside
    (auc_by_reconstruction); pixel metrics only come from its own run. A refined row of a refiner that failed
    stage 2's held-out check carries a "note": --refiner auto does not score with it."""
    rows = []
    result_dir = run_layout.default_folder(run_dir, "result_dir")
    check = read_json(run_layout.refiner_check(result_dir, iteration))
    results = {reconstruction: {p: read_json(run_layout.CheckpointResults(result_dir, iteration, reconstruction)
                                             .protocol_json(p)) for p in PROTOCOL_SETS}
               for reconstruction in run_layout.RECONSTRUCTIONS}
    for reconstruction in run_layout.RECONSTRUCTIONS:
        values = {}
        for p in PROTOCOL_SETS:
            beside = [r[p]["auc_by_reconstruction"][reconstruction] for r in results.values()
                      if r[p] and reconstruction in r[p].get("auc_by_reconstruction", {})]
            own = results[reconstruction][p]
            values[p] = own["auc"] if own else (beside[0] if beside else None)
        if any(v is not None for v in values.values()):
            inductive = results[reconstruction]["inductive"] or {}
            values.update({k: inductive.get(k) for k in ("pixel_auroc", "best_dice")})
            if reconstruction == "refined" and check and not check["refiner_helps"]:
                values["note"] = REFINER_NOT_USED  # scored with --refiner on to show what it did
            rows.append((f"Brainomaly-Diff, {reconstruction} (ckpt {iteration})", values))
    baseline = read_json(os.path.join(image_dir, "baseline.json"))
    if baseline:
        rows.append(("baseline: CSF fraction", {p: baseline["auc"].get(p) for p in PROTOCOL_SETS}))
    return rows


COLUMNS = (*PROTOCOL_SETS, "pixel_auroc", "best_dice")
REFINER_NOT_USED = "refiner failed its held-out check (not used)"


def print_table(rows):
    """Patient-level ROC AUC per protocol, and the inductive pixel AUROC and best Dice (where masks exist)."""
    print(f"\n{'patient-level ROC AUC':<40} {'inductive':>10} {'transductive':>13} {'AUCp':>7} "
          f"{'pixel AUROC':>12} {'best Dice':>10}")
    for name, values in rows:
        cells = [f"{values[k]:.3f}" if values.get(k) is not None else "n/a" for k in COLUMNS]
        note = f"   <- {values['note']}" if values.get("note") else ""
        print(f"{name:<40} {cells[0]:>10} {cells[1]:>13} {cells[2]:>7} {cells[3]:>12} {cells[4]:>10}{note}")


def learning_curve(run_dir, iteration=None):
    """Plot AUCp (label-free) and inductive AUC of every stage-1 checkpoint (coarse x_c and intensity-corrected
    f(x_c)), with the refined reconstruction's values at the checkpoint stage 2 refined (ITER), when the sweeps
    exist."""
    result_dir = run_layout.default_folder(run_dir, "result_dir")
    sweeps = {name: read_json(run_layout.sweep_table(result_dir, name, "json")) for name in ("aucp", "inductive")}
    if not sweeps["aucp"]:
        return None
    iterations = [row["iteration"] for row in sweeps["aucp"]["table"]]
    curves = {}
    for name, label in (("aucp", "AUCp (no labels)"), ("inductive", "inductive AUC")):
        for reconstruction in map(str, decisions.WITHOUT_REFINER):  # the sweeps scored with x_c report f(x_c) beside it
            if sweeps[name]:
                by_iteration = {row["iteration"]: row.get(f"auc_{reconstruction}", row["auc"] if row["reconstruction"]
                                                          == reconstruction else None) for row in sweeps[name]["table"]}
                if any(v is not None for v in by_iteration.values()):
                    curves[f"{label}, {reconstruction}"] = [by_iteration.get(i) for i in iterations]
        if iteration is not None:
            refined = read_json(run_layout.CheckpointResults(result_dir, iteration, "refined").protocol_json(name))
            if refined:
                curves[f"{label}, refined"] = [refined["auc"] if i == iteration else None for i in iterations]
    intervals, picked = aucp_intervals(sweeps["aucp"], iterations)
    path = run_layout.learning_curve(result_dir)
    visualize.save_learning_curve(iterations, curves, path, "AUCp (band: 95% bootstrap interval) and inductive AUC "
                                  "by stage-1 checkpoint", intervals, picked)
    return path


def aucp_intervals(selection, iterations):
    """({AUCp curve name: (lows, highs)}, (picked iteration, its curve name)) from an AUCp sweep's selection."""
    rows = selection.get("candidates", [])
    intervals = {}
    for reconstruction in map(str, decisions.WITHOUT_REFINER):
        by_iteration = {row["iteration"]: row for row in rows if row["reconstruction"] == reconstruction}
        if by_iteration:
            intervals[f"AUCp (no labels), {reconstruction}"] = tuple(
                [by_iteration[i][bound] if i in by_iteration else None for i in iterations]
                for bound in ("aucp_low", "aucp_high"))
    picked = None
    if "best_iteration" in selection:
        picked = (selection["best_iteration"],
                  f"AUCp (no labels), {selection.get('best_reconstruction', 'coarse')}")
    return intervals, picked


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_dir", required=True, help="dataset folder (its baseline.json is shown if present)")
    parser.add_argument("--run_dir", required=True, help="run folder written by train.sh / main.py")
    parser.add_argument("--iteration", required=True, type=int, help="checkpoint the protocols were run with")
    parser.add_argument("--seconds", type=float, default=None, help="wall time to print")
    args = parser.parse_args(argv)
    print_table(summary_rows(args.image_dir, args.run_dir, args.iteration))
    curve = learning_curve(args.run_dir, args.iteration)
    results = run_layout.iteration_dir(run_layout.default_folder(args.run_dir, "result_dir"), args.iteration)
    scored = [r for r in run_layout.RECONSTRUCTIONS if os.path.isdir(os.path.join(results, r))]
    if scored:
        print(f"\nPlots, CSVs and JSONs: {' and '.join(f'{results}/{r}/' for r in scored)}")
    maps = [f"{results}/{reconstruction}/maps_*/" for reconstruction in scored
            if glob.glob(os.path.join(results, reconstruction, "maps_*"))]
    if maps:
        print(f"Anomaly maps: {' and '.join(maps)}")
    if curve:
        print(f"Learning curve: {curve}")
    if args.seconds is not None:
        print(f"Wall time: {args.seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
