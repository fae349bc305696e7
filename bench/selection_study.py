"""The label-free checkpoint-selection rules against the labels: per run, the regret of each rule (the best
inductive AUC by labels among all candidates - the inductive AUC of the rule's pick), and per rule its mean, its
worst and how often it is within 0.02 of the best.

Two kinds of runs:
- scored runs: run folders whose every checkpoint was scored by AUCp and the inductive protocol without the
  refiner (`python main.py --mode test_aucp --test_iters all --refiner off ...`, then test_inductive), so their
  JSONs hold every reconstruction's patient and slice scores: every rule runs on its real paired bootstrap;
- recorded curves (bench/results/selection_recorded_curves.json): runs of which only the AUCs by checkpoint
  were kept. Their bootstrap is simulated: Gaussian draws with the Hanley-McNeil standard error of each AUCp and,
  between candidates, the median correlation of the scored runs' draws (printed).

Then the refiner's check: on every case where a refiner was scored both ways (its inductive AUC with the refiner
forced on, and without it with the check's bar), does the check's verdict (decisions.refiner_verdict) match the
sign of the labelled change, where that change is at least 0.01? Scored runs recompute it from the patient scores
in refiner_check.json; recorded cases (the same JSON, "checks") simulate the draws as above, with the median
correlation of refined and bar draws in the scored runs. Beside it, the variant that compares the error with the
bar's own (not the lowest without the refiner), and the check before the bootstrap (lower error than f(x_c), and
an AUCp at least every reconstruction's without the refiner).

Usage: python bench/selection_study.py --run RUN_DIR:LABEL [...] [--recorded JSON] [--json OUT]
"""
import argparse
import json
import os
import sys

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from brainomaly import decisions  # noqa: E402
from brainomaly.run import run_layout  # noqa: E402

WITHIN = 0.02  # regret counted as "as good as the best"
ENSEMBLE_LAST = 3  # checkpoints averaged by the checkpoint-ensemble rule


def hanley_mcneil_se(auc, n_negative, n_positive):
    """Standard error of an AUC from its value and the class sizes (Hanley & McNeil 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    variance = (auc * (1 - auc) + (n_positive - 1) * (q1 - auc ** 2) + (n_negative - 1) * (q2 - auc ** 2))
    return float(np.sqrt(variance / (n_negative * n_positive)))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def scored_run(run_dir, label):
    """{"candidates", "inductive": {(it, rec): AUC}, "ensemble_inductive", "slice_candidates"} of a scored run."""
    result_dir = run_layout.default_folder(run_dir, "result_dir")
    aucp = read_json(run_layout.sweep_table(result_dir, "aucp", "json"))
    iterations = [row["iteration"] for row in aucp["table"]]
    patient_scores, slice_scores, inductive, inductive_scores = {}, {}, {}, {}
    for iteration in iterations:
        own = run_layout.CheckpointResults(result_dir, iteration, "coarse")
        a, i = read_json(own.protocol_json("aucp")), read_json(own.protocol_json("inductive"))
        for reconstruction in decisions.WITHOUT_REFINER:
            name = str(reconstruction)
            if name in a["patient_scores"]:
                patient_scores[(iteration, name)] = a["patient_scores"][name]
                slice_scores[(iteration, name)] = a["slice_scores"][name]
                inductive[(iteration, name)] = i["auc_by_reconstruction"][name]
                inductive_scores[(iteration, name)] = np.asarray(i["patient_scores"][name])
        patients, slices, test_labels = a["patient_scores"], a["slice_scores"], i["patient_scores"]["label"]
    candidates = decisions.candidates_from_scores(patients["label"], patient_scores)
    slice_candidates = decisions.candidates_from_scores(slices["label"], slice_scores, cluster=slices["pid"])
    last = iterations[-ENSEMBLE_LAST:]
    ensemble = np.mean([inductive_scores[(it, "coarse")] for it in last], axis=0)
    return {"label": label, "candidates": candidates, "slice_candidates": slice_candidates, "inductive": inductive,
            "ensemble_inductive": float(roc_auc_score(test_labels, ensemble)), "scored": True,
            "n_healthy": int(np.sum(np.asarray(patients["label"]) == 0)),
            "n_mixed": int(np.sum(np.asarray(patients["label"]) == 1))}


def draw_correlation(runs):
    """Median correlation between the bootstrap draws of two candidates of one scored run."""
    correlations = []
    for run in runs:
        draws = np.array([c.draws for c in run["candidates"]])
        if len(draws) > 1:
            matrix = np.corrcoef(draws)
            correlations += list(matrix[np.triu_indices(len(draws), 1)])
    return float(np.median(correlations)) if correlations else 0.5


def recorded_run(record, correlation, seed=0):
    """The same structure from a recorded curve, with simulated draws (see the module's docstring)."""
    keys = [(it, rec) for rec in record["aucp"] for it in record["iterations"]]
    keys.sort(key=lambda key: (key[0], decisions.reconstruction_rank(key[1])))
    aucp = {(it, rec): record["aucp"][rec][k] for rec in record["aucp"] for k, it in enumerate(record["iterations"])}
    se = np.array([hanley_mcneil_se(aucp[key], record["n_healthy"], record["n_mixed"]) for key in keys])
    covariance = correlation * np.outer(se, se) + (1 - correlation) * np.diag(se ** 2)
    rng = np.random.default_rng(seed)
    draws = rng.multivariate_normal([aucp[key] for key in keys], covariance, size=decisions.BOOTSTRAP_DRAWS).T
    candidates = [decisions.Candidate(it, rec, aucp[(it, rec)], draws[k]) for k, (it, rec) in enumerate(keys)]
    inductive = {(it, rec): record["inductive"][rec][k] for rec in record["inductive"]
                 for k, it in enumerate(record["iterations"])}
    return {"label": record["name"], "candidates": candidates, "inductive": inductive, "scored": False,
            "n_healthy": record["n_healthy"], "n_mixed": record["n_mixed"]}


def rule_picks(run):
    """{rule name: inductive AUC of its pick} for one run."""
    inductive, candidates = run["inductive"], run["candidates"]
    picks = {}
    for candidate_set in decisions.CANDIDATE_SETS:
        allowed = decisions.restrict(candidates, decisions.CANDIDATE_SETS[candidate_set])  # a run without a
        # calibrated AUCp recorded has coarse candidates only, in either set
        for rule, select in decisions.RULES.items():
            chosen = select(allowed)
            picks[f"{rule} ({candidate_set})"] = (inductive[(chosen.iteration, str(chosen.reconstruction))],
                                                  chosen.iteration, str(chosen.reconstruction))
    if run["scored"]:
        slices = decisions.restrict(run["slice_candidates"], ("coarse", "calibrated"))
        for rule in ("max", "one_se"):
            chosen = decisions.RULES[rule](slices)
            picks[f"slice-level {rule} (coarse+calibrated)"] = (
                inductive[(chosen.iteration, str(chosen.reconstruction))], chosen.iteration, str(chosen.reconstruction))
        picks[f"ensemble of the last {ENSEMBLE_LAST} (coarse)"] = (run["ensemble_inductive"], None, "ensemble")
    return picks


def old_verdict(errors, aucp):
    """The check before the bootstrap: lower held-out error than f(x_c) (x_c without a correction), and an AUCp at
    least that of every reconstruction without the refiner."""
    bar = "calibrated" if "calibrated" in errors else "coarse"
    return errors["refined"] < errors[bar] and all(aucp["refined"] >= aucp[name] for name in aucp if name != "refined")


def scored_check(run_dir, label):
    """The check case of a scored run whose pick has a refiner scored forced on, or None."""
    result_dir = run_layout.default_folder(run_dir, "result_dir")
    iteration = read_json(run_layout.sweep_table(result_dir, "aucp", "json"))["best_iteration"]
    check_path = run_layout.refiner_check(result_dir, iteration)
    refined_path = run_layout.CheckpointResults(result_dir, iteration, "refined").protocol_json("inductive")
    if not (os.path.isfile(check_path) and os.path.isfile(refined_path)):
        return None
    check = read_json(check_path)
    patients = check["patient_scores"]
    bootstrap = decisions.PairedBootstrap(patients["label"])
    draws = {name: bootstrap.auc(patients[name]) for name in ("coarse", "calibrated", "refined") if name in patients}
    errors = {name: check[f"{name}_error"] for name in draws}
    without = read_json(run_layout.CheckpointResults(result_dir, iteration, "coarse").protocol_json("inductive"))
    return {"label": label, "iteration": iteration, "bar": check["bar"], "errors": errors, "draws": draws,
            "refined": read_json(refined_path)["auc"], "without": without["auc_by_reconstruction"][check["bar"]]}


def recorded_check(record, correlation, seed=0):
    """A recorded check case with simulated paired draws of refined and the bar."""
    names = list(record["aucp"])
    se = np.array([hanley_mcneil_se(record["aucp"][n], record["n_healthy"], record["n_mixed"]) for n in names])
    covariance = correlation * np.outer(se, se) + (1 - correlation) * np.diag(se ** 2)
    samples = np.random.default_rng(seed).multivariate_normal([record["aucp"][n] for n in names], covariance,
                                                             size=decisions.BOOTSTRAP_DRAWS).T
    return {"label": record["name"], "iteration": record["iteration"], "bar": record["bar"],
            "errors": record["errors"], "draws": {n: (record["aucp"][n], samples[k]) for k, n in enumerate(names)},
            "refined": record["inductive_refined"], "without": record["inductive_without"]}


def check_table(cases):
    """Print and return each case's verdicts against the labelled change."""
    print(f"\n{'check case':<52} {'bar':>10} {'labelled change':>15} {'verdict':>8} {'right':>6} {'before':>7} {'right':>6}"
          f" {'own-error bar':>14} {'right':>6}")
    rows = []
    for case in cases:
        verdict = decisions.refiner_verdict(case["bar"], case["errors"], case["draws"])
        # the variant whose error bar is the bar's own error (x_c's where the pick chose x_c)
        bar_error = {name: error for name, error in case["errors"].items() if name in ("refined", case["bar"])}
        strict = decisions.refiner_verdict(case["bar"], bar_error, case["draws"])
        before = old_verdict(case["errors"], {n: d[0] for n, d in case["draws"].items()})
        change = case["refined"] - case["without"]
        decided = abs(change) >= 0.01
        right = (verdict.refiner_helps == (change > 0)) if decided else None
        right_before = (before == (change > 0)) if decided else None
        right_strict = (strict.refiner_helps == (change > 0)) if decided else None
        rows.append({"case": case["label"], "bar": case["bar"], "change": change, "passes": verdict.refiner_helps,
                     "right": right, "passed_before": bool(before), "right_before": right_before,
                     "passes_own_error_bar": strict.refiner_helps, "right_own_error_bar": right_strict,
                     "aucp_difference": verdict.aucp_difference,
                     "interval": [verdict.difference_low, verdict.difference_high]})
        show = {True: "yes", False: "NO", None: "-"}
        print(f"{case['label']:<52} {case['bar']:>10} {change:+15.3f} {'pass' if verdict.refiner_helps else 'fail':>8} "
              f"{show[right]:>6} {'pass' if before else 'fail':>7} {show[right_before]:>6}"
              f" {'pass' if strict.refiner_helps else 'fail':>14} {show[right_strict]:>6}")
    for key, name in (("right", "the check"), ("right_own_error_bar", "the check with the bar's own error"),
                      ("right_before", "the check before the bootstrap")):
        decided = [row[key] for row in rows if row[key] is not None]
        print(f"{name}: right in {sum(decided)} of {len(decided)} cases with a labelled change of 0.01 or more")
    return rows


def check_correlation(cases):
    """Median correlation of the refined and the bar's draws in the scored check cases."""
    values = [np.corrcoef(case["draws"]["refined"][1], case["draws"][case["bar"]][1])[0, 1] for case in cases]
    return float(np.median(values)) if values else 0.5


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[], help="RUN_DIR:LABEL of a scored run")
    parser.add_argument("--recorded", default=None, help="JSON of recorded curves")
    parser.add_argument("--json", default=None, help="write the regret table here")
    args = parser.parse_args(argv)
    runs = [scored_run(*spec.split(":", 1)) for spec in args.run]
    checks = [case for case in (scored_check(*spec.split(":", 1)) for spec in args.run) if case is not None]
    correlation = draw_correlation(runs)
    if args.recorded:
        runs += [recorded_run(record, correlation) for record in read_json(args.recorded)["runs"]]
    print(f"median correlation of two candidates' bootstrap draws in the scored runs: {correlation:.2f}")
    table = {}
    for run in runs:
        best = max(run["inductive"].values())
        for rule, (auc, iteration, reconstruction) in rule_picks(run).items():
            table.setdefault(rule, {})[run["label"]] = {"regret": best - auc, "auc": auc, "iteration": iteration,
                                                         "reconstruction": reconstruction, "best": best}
    labels = [run["label"] for run in runs]
    print(f"\n{'rule':<44} {'mean':>6} {'worst':>6} {'<=0.02':>7}  regret per run")
    summary = {}
    for rule, per_run in table.items():
        regrets = np.array([per_run[label]["regret"] for label in labels if label in per_run])
        summary[rule] = {"mean": float(regrets.mean()), "worst": float(regrets.max()),
                         "within": f"{int(np.sum(regrets <= WITHIN + 1e-9))}/{len(regrets)}", "runs": per_run}
        print(f"{rule:<44} {regrets.mean():6.3f} {regrets.max():6.3f} {summary[rule]['within']:>7}  "
              + " ".join(f"{r:.3f}" for r in regrets))
    print("\nruns: " + "; ".join(f"{k + 1} {label}" for k, label in enumerate(labels)))
    correlation_check = check_correlation(checks)
    print(f"\nmedian correlation of refined and bar draws in the scored check cases: {correlation_check:.2f}")
    if args.recorded:
        checks += [recorded_check(record, correlation_check) for record in read_json(args.recorded).get("checks", [])]
    check_rows = check_table(checks)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"draw_correlation": correlation, "rules": summary, "runs": labels,
                       "check_draw_correlation": correlation_check, "checks": check_rows}, f, indent=1)


if __name__ == "__main__":
    main()
