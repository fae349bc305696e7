"""Healing speed and staying healed: the stage-1 iteration from which a run's calibrated inductive AUC (f(x_c), no
refiner) reaches the cohort's CSF-fraction baseline and stays there to the run's last checkpoint, and what that
costs in minutes; and, after the first checkpoint that reaches the baseline, the share of the later checkpoints at
>= baseline - 0.02 and the largest fall between neighbouring checkpoints (calibrated and coarse).

Labels only judge here: the runs were trained and saved without them (bench/healing_runs.sh).
Minutes are iterations x the seconds per iteration that bench/benchmark.py measured for that recipe on a quiet
machine (--seconds RECIPE=S), not the wall-clock of the study runs, which shared two cores.

Usage: python bench/healing_speed.py --run RUN_DIR:COHORT:RECIPE ...
         [--recorded bench/results/selection_recorded_curves.json] --baseline COHORT=AUC ...
         [--seconds RECIPE=S ...] [--json OUT]"""
import argparse
import csv
import json
import os
import sys


def healed_from(iterations, aucs, baseline):
    """The first iteration from which every checkpoint's AUC is >= baseline (to the last one), or None."""
    healed = None
    for iteration, auc in zip(iterations, aucs):
        if auc >= baseline:
            healed = iteration if healed is None else healed
        else:
            healed = None
    return healed


def stability(iterations, aucs, baseline, margin=0.02):
    """(first iteration at >= baseline, share of the later checkpoints at >= baseline - margin, largest fall between
    neighbouring checkpoints from that one on); (None, None, None) where no checkpoint reaches the baseline, and a
    share of None where it is the last checkpoint."""
    first = next((k for k, auc in enumerate(aucs) if auc >= baseline), None)
    if first is None:
        return None, None, None
    later = aucs[first + 1:]
    share = sum(auc >= baseline - margin for auc in later) / len(later) if later else None
    falls = [aucs[k] - aucs[k + 1] for k in range(first, len(aucs) - 1)]
    return iterations[first], share, max([0.0] + falls)


def run_curve(run_dir):
    """(iterations, calibrated AUCs, coarse AUCs) from a run's results/inductive_by_iteration.csv."""
    path = os.path.join(run_dir, "results", "inductive_by_iteration.csv")
    with open(path) as f:
        rows = sorted(csv.DictReader(f), key=lambda row: int(row["iteration"]))
    return ([int(r["iteration"]) for r in rows], [float(r["auc_calibrated"]) for r in rows],
            [float(r["auc_coarse"]) for r in rows])


def recorded_curves(path, cohorts):
    """{name: (cohort, iterations, calibrated, coarse)} of the --full reference runs recorded before this study, on
    the cohorts given a baseline."""
    with open(path) as f:
        runs = json.load(f)["runs"]
    return {r["name"]: (r["cohort"], r["iterations"], r["inductive"]["calibrated"], r["inductive"]["coarse"])
            for r in runs if r["recipe"] == "full" and r["cohort"] in cohorts}


def shown(value):
    return "—" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def key_values(pairs, what):
    values = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        if not value:
            sys.exit(f"error: {what} {pair!r} is not KEY=VALUE.")
        values[key] = float(value)
    return values


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", default=[], help="RUN_DIR:COHORT:RECIPE")
    p.add_argument("--recorded", help="recorded --full curves (the reference recipe on Demo and CohortB)")
    p.add_argument("--baseline", action="append", required=True, help="COHORT=CSF-fraction inductive AUC")
    p.add_argument("--seconds", action="append", help="RECIPE=seconds per stage-1 iteration (bench/benchmark.py)")
    p.add_argument("--json", help="write the table here")
    args = p.parse_args(argv)
    baselines, seconds = key_values(args.baseline, "--baseline"), key_values(args.seconds, "--seconds")
    rows = []
    if args.recorded:
        for name, (cohort, iterations, calibrated, coarse) in recorded_curves(args.recorded, baselines).items():
            rows.append({"run": name, "cohort": cohort, "recipe": "reference", "iterations": iterations,
                         "calibrated": calibrated, "coarse": coarse})
    for spec in args.run:
        run_dir, cohort, recipe = spec.rsplit(":", 2)
        iterations, calibrated, coarse = run_curve(run_dir)
        rows.append({"run": run_dir, "cohort": cohort, "recipe": recipe, "iterations": iterations,
                     "calibrated": calibrated, "coarse": coarse})
    print("| recipe | cohort | baseline | calibrated inductive AUC by checkpoint | healed from | minutes | "
          "first >= baseline | share staying | largest fall | coarse: share staying, largest fall |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        baseline = baselines[row["cohort"]]
        row["baseline"] = baseline
        row["healed_from"] = healed_from(row["iterations"], row["calibrated"], baseline)
        per_iteration = seconds.get(row["recipe"])
        row["minutes"] = (None if row["healed_from"] is None or per_iteration is None
                          else round(row["healed_from"] * per_iteration / 60, 1))
        row["first_reached"], row["share_staying"], row["largest_fall"] = stability(
            row["iterations"], row["calibrated"], baseline)
        _, row["coarse_share_staying"], row["coarse_largest_fall"] = stability(
            row["iterations"], row["coarse"], baseline)
        curve = ", ".join(f"{i}: {a:.3f}" for i, a in zip(row["iterations"], row["calibrated"]))
        healed = (f"**{row['healed_from']}**" if row["healed_from"] is not None
                  else f"not by {row['iterations'][-1]}")
        print(f"| {row['recipe']} | {row['cohort']} | {baseline:.3f} | {curve} | {healed} | "
              f"{'' if row['minutes'] is None else row['minutes']} | {shown(row['first_reached'])} | "
              f"{shown(row['share_staying'])} | {shown(row['largest_fall'])} | "
              f"{shown(row['coarse_share_staying'])}, {shown(row['coarse_largest_fall'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds_per_iteration": seconds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
