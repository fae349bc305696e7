"""The sweep over checkpoints and the label-free pick: one protocol on every checkpoint, the table, and the checkpoint
AUCp selects (aucp_selection.json)."""
import json
import os

from tqdm import tqdm

from brainomaly import decisions
from brainomaly.data import dataset_layout
from brainomaly.evaluate.protocols import NEPTUNE_KEYS, PROTOCOLS, print_result, results_for_data, run_protocol
from brainomaly.run import checkpoint as ckpt
from brainomaly.run import run_config, run_layout
from brainomaly.run.networks import resolve_iteration
from brainomaly.run.settings import replace_config
from brainomaly.run.training_log import start_neptune


def checkpoint_sweep(runtime, config, name):
    """Run a protocol for every saved checkpoint; over a label-free one (AUCp) the rule --select picks the
    checkpoint and reconstruction to ship (no labels involved: decisions.py). Returns the table on every rank;
    rank 0 alone prints and writes it."""
    return sweep(runtime, config, name)["table"]


def select_checkpoint(runtime, config):
    """(iteration, reconstruction) the AUCp sweep over every checkpoint picks, without the refiner; every rank."""
    summary = sweep(runtime, replace_config(config, refiner="off"), "aucp")
    return summary["best_iteration"], summary["best_reconstruction"]


def sweep(runtime, config, name):
    """checkpoint_sweep's work: {"table": a row per checkpoint, and for AUCp the pick (decisions.selection_summary)},
    the same on every rank (every rank gets every score)."""
    protocol, c = PROTOCOLS[name], config
    dataset_layout.protocol_slices(c.image_dir, name)  # fail on a missing folder before any scoring
    iterations = ckpt.saved_iterations(c.model_save_dir, "G")
    if not iterations:
        raise ckpt.missing_checkpoint_error(c.model_save_dir, "all", "G", "no checkpoint saved yet")
    table, results = [], []
    for iteration in tqdm(iterations, desc=f"{name} over checkpoints", unit="ckpt", disable=not runtime.is_main):
        result = run_protocol(runtime, c, name, iteration)
        results.append(result)
        table.append({"iteration": iteration, "reconstruction": result["reconstruction"],
                      "auc": result["auc"], "n_patients": result["n_patients"],
                      **{f"auc_{k}": v for k, v in result["auc_by_reconstruction"].items()}})
    summary = {"protocol": name, "data": results[0]["data"], "table": table}
    if protocol.label_free:
        candidates = sweep_candidates(results, c.seed)
        chosen = decisions.pick(candidates, c.select, c.select_candidates)
        summary.update(decisions.selection_summary(candidates, chosen, c.select, c.select_candidates))
    if not runtime.is_main:
        return summary
    if protocol.label_free:
        print_selection(protocol, summary)
    else:
        print_sweep(protocol, table)
    run_layout.write_json(summary, run_layout.sweep_table(c.result_dir, name, "json"))
    run_layout.write_csv(table, run_layout.sweep_table(c.result_dir, name, "csv"))
    return summary


def sweep_candidates(results, seed):
    """decisions.Candidate of every (checkpoint, reconstruction without the refiner) of an AUCp sweep, on one
    paired bootstrap of its patients."""
    first = results[0]["patient_scores"]
    scores = {}
    for result in results:
        patients = result["patient_scores"]
        if patients["pid"] != first["pid"]:
            raise ValueError(f"checkpoint {result['checkpoint']} scored other patients than checkpoint "
                             f"{results[0]['checkpoint']}: the candidates of one sweep share their patients")
        for reconstruction in decisions.WITHOUT_REFINER:
            if str(reconstruction) in patients:
                scores[(result["checkpoint"], str(reconstruction))] = patients[str(reconstruction)]
    return decisions.candidates_from_scores(first["label"], scores, seed=seed)


def print_sweep(protocol, table):
    # a column per reconstruction any row has, but the one every row is scored with (its AUC column says it)
    others = [key for key in run_layout.columns(table) if key.startswith("auc_")
              and any(row["reconstruction"] != key[4:] for row in table)]
    print(f"\n{protocol.title} AUC by checkpoint")
    print(f"{'iteration':>10}  {'reconstruction':>14}  {'AUC':>7}" + "".join(f"  {k[4:]:>10}" for k in others))
    for row in table:
        print(f"{row['iteration']:>10}  {row['reconstruction']:>14}  {row['auc']:7.4f}"
              + "".join(f"  {row[k]:10.4f}" if k in row else f"  {'':>10}" for k in others))


def print_selection(protocol, summary):
    """The AUCp of every candidate with its bootstrap interval and its paired difference from the pick."""
    confidence = round(100 * summary["bootstrap"]["confidence"])
    print(f"\n{protocol.title} by checkpoint ({confidence}% intervals: paired patient bootstrap, "
          f"{summary['bootstrap']['draws']} draws)")
    print(f"{'iteration':>10}  {'reconstruction':>14}  {'AUCp':>7}  {'interval':>15}  {'minus the pick':>24}")
    for row in summary["candidates"]:
        chosen = row["iteration"] == summary["best_iteration"] and row["reconstruction"] == summary["best_reconstruction"]
        difference = "(the pick)" if chosen else (f"{row['difference_from_pick']:+.3f} [{row['difference_low']:+.3f}, "
                                                  f"{row['difference_high']:+.3f}]")
        print(f"{row['iteration']:>10}  {row['reconstruction']:>14}  {row['aucp']:7.4f}  "
              f"[{row['aucp_low']:.3f}, {row['aucp_high']:.3f}]  {difference:>24}")
    print(f"Checkpoint picked by the {summary['rule']} rule (no disease labels used): {summary['best_iteration']} "
          f"with the {summary['best_reconstruction']} reconstruction (AUCp {summary['best_aucp']:.4f}; "
          f"--select names the rule, docs/method.md compares them)")


def selected_checkpoint(result_dir):
    """(iteration, reconstruction) of the last AUCp sweep's pick, or None before any sweep."""
    path = run_layout.sweep_table(result_dir, "aucp", "json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    return (summary["best_iteration"], summary.get("best_reconstruction", "coarse")) if "best_iteration" in summary \
        else None


def test(runtime, config, name):
    """--mode test_NAME: protocol NAME at --test_iters (an iteration, latest, or all checkpoints); on a dataset the
    run was not trained on, written beside the run's own results (protocols.results_for_data)."""
    config = results_for_data(run_config.with_run_scoring_flags(config))
    if config.test_iters == "all":
        checkpoint_sweep(runtime, config, name)
        return
    result = run_protocol(runtime, config, name, resolve_iteration(config, config.test_iters))
    if not runtime.is_main:
        return
    if config.use_neptune:  # attach the metrics to the training run (--neptune_id) under --neptune_key
        run = start_neptune(config)
        prefix = config.neptune_key or f"Test_{PROTOCOLS[name].title}"
        for key in NEPTUNE_KEYS:
            run[f"{prefix}/{key}"] = result[key]
        run.stop()
    print_result(result, run_layout.CheckpointResults(config.result_dir, result["checkpoint"],
                                                      result["reconstruction"]).folder)
