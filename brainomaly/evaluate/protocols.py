"""The three protocols, scored through scoring.py and written as CSV + JSON + plots (see run_layout.py):

| protocol     | scored set (label 0 vs 1)                     | labels                 |
| inductive    | test/neg vs test/pos                          | true, evaluation only  |
| transductive | train/neg_mixed vs train/pos                  | true, evaluation only  |
| aucp         | train/neg vs train/pos + train/neg_mixed      | none (label-free)      |

AUCp's train/neg is the known-healthy patients stage 1 held out of training (--healthy_holdout, saved in the
checkpoint; all of train/neg for a run that held none out, as the reference): the GAN fits its own training
slices ever more closely (identity loss), so AUCp over them keeps rising after detection has peaked.

Also the run of a protocol over every saved checkpoint; over AUCp it is the label-free checkpoint selection.

Results on a dataset the run was not trained on (external validation: --image_dir another site's data) go to
RESULT_DIR/on_NAME/ beside the run's own (results_for_data): they never replace the run's known-healthy reference
(score mode's threshold, the panels' colour scale) or its checkpoint pick. Every result records the data it was
computed on (cache_keys.data_key).

Under torchrun the ranks share out the slices (scoring.py) and every rank gets all the scores, so every rank
computes the same results and tables; rank 0 alone writes and prints them.
"""
import json
import os
import time
from dataclasses import dataclass

from brainomaly import distributed, metrics, visualize
from brainomaly.data import dataset_layout, healthy_split
from brainomaly.evaluate import scoring
from brainomaly.evaluate.scoring_networks import load_for_scoring
from brainomaly.run import cache_keys, run_config, run_layout
from brainomaly.run.settings import replace_config
from brainomaly.run.training_log import log_protocol


@dataclass(frozen=True)
class Protocol:
    name: str
    title: str
    metric: str  # what its ROC AUC is called
    label_names: tuple  # (label 0, label 1) in plots and anomaly-map file names
    pixel_metrics: bool  # pixel AUROC and best Dice where the dataset has ground-truth masks
    label_free: bool  # no disease label used: --rho turns it into an AUC estimate; it selects checkpoints
    healthy_reference: bool  # keeps the known-healthy patient scores (score mode's flag threshold)

    @property
    def sets(self):
        """(folder, label) pairs it scores (dataset_layout.PROTOCOL_SETS)."""
        return dataset_layout.PROTOCOL_SETS[self.name]


PROTOCOLS = {p.name: p for p in (
    Protocol("inductive", "Inductive", "AUC", ("healthy", "diseased"), pixel_metrics=True, label_free=False,
             healthy_reference=False),
    Protocol("transductive", "Transductive", "AUC", ("healthy", "diseased"), pixel_metrics=True, label_free=False,
             healthy_reference=False),
    Protocol("aucp", "AUCp", "AUCp", ("known healthy", "mixed set"), pixel_metrics=False, label_free=True,
             healthy_reference=True),
)}
NEPTUNE_KEYS = ("auc", "average_precision", "sensitivity", "specificity", "threshold", "tn", "fp", "fn", "tp")


def held_out_known_healthy(training_config, image_dir):
    """The known-healthy slices of image_dir that stage 1 (trained with training_config) held out of training, or
    None when it held none out (a run from before --healthy_holdout, or --healthy_holdout 0) or image_dir is not
    the dataset it trained on, wherever that has moved (then none of its train/neg was trained on)."""
    if not healthy_split.is_training_data(training_config, image_dir):
        return None
    return healthy_split.run_split(image_dir, training_config)[1] or None


def results_for_data(config):
    """config with result_dir where results on config.image_dir go: unchanged for the data the run was trained on
    (wherever it has moved); for another dataset RESULT_DIR/on_NAME (run_layout.results_on), with the run's own
    folder kept as run_result_dir (the known-healthy reference is always the run's own)."""
    training_config = run_config.saved_run_settings(config.model_save_dir)
    if training_config is None or healthy_split.is_training_data(training_config, config.image_dir):
        return config
    folder = run_layout.results_on(config.result_dir, config.image_dir)
    distributed.main_print(f"{config.image_dir} is not the dataset this run was trained on "
                           f"({training_config.get('image_dir')}): its results go to {folder}; the run's own "
                           f"known-healthy reference and checkpoint pick are left as they are.")
    if distributed.is_main():
        run_layout.write_json({"data_folder": os.path.realpath(config.image_dir)}, run_layout.data_record(folder))
    return replace_config(config, result_dir=folder, run_result_dir=config.result_dir)


def protocol_slices(networks, name, image_dir):
    """(paths, labels) protocol NAME scores in image_dir with these networks: AUCp's label 0 is the known-healthy
    patients their stage 1 held out of training where it held some out."""
    known_healthy = held_out_known_healthy(networks.training_config, image_dir) if name == "aucp" else None
    return dataset_layout.protocol_slices(image_dir, name, known_healthy)


def run_protocol(runtime, config, name, iteration):
    """Score protocol NAME's sets with checkpoint ITER; write CSV, JSON and plots; return the JSON dict."""
    started = time.time()
    networks = load_for_scoring(runtime, config, iteration)
    paths, labels = protocol_slices(networks, name, config.image_dir)
    return score_protocol(runtime, networks, name, paths, labels, started)


def score_protocol(runtime, networks, name, paths, labels, started):
    """run_protocol with networks already loaded; networks.config names the data and result folders. Returns the
    result on every rank; rank 0 alone writes it."""
    protocol, c = PROTOCOLS[name], networks.config
    iteration, reconstruction = networks.iteration, networks.reconstruction
    out = run_layout.CheckpointResults(c.result_dir, iteration, reconstruction)
    consumers = []
    pixel_metrics = metrics.PixelMetrics() if protocol.pixel_metrics and dataset_layout.has_masks(c.image_dir) else None
    if pixel_metrics is not None:
        pixel_consumer = scoring.pixel_metrics_consumer(pixel_metrics, paths, c.image_dir, c.image_size)
        consumers.append(pixel_consumer)
    panels = None
    if c.save_maps > 0:
        panels = scoring.AnomalyPanels(paths, labels, protocol.label_names, out.protocol_maps(name), c.save_maps,
                                       c.image_dir, c.image_size)
        consumers.append(panels)
    healthy_maps = scoring.HealthyMapScale(labels) if protocol.healthy_reference else None
    if healthy_maps is not None:
        consumers.append(healthy_maps)
    beside = [scoring.ReconstructionScores(len(paths), c.score_region, other) for other in side_reconstructions(networks)]
    scores = scoring.score_slices(runtime, networks, paths, consumers + beside)
    pids = [dataset_layout.patient_id(p) for p in paths]
    patients = metrics.aggregate_patients(pids, scores, labels)
    result = {"protocol": name, "checkpoint": iteration, "reconstruction": reconstruction,
              "score_region": c.score_region, **cache_keys.data_key(c.image_dir, paths),
              **metrics.evaluate(patients["label"], patients["score"]),
              "n_patients": len(patients["pid"]), "n_slices": len(paths),
              "slice_auroc": metrics.slice_auroc(pids, scores, labels)}
    # the same slices scored with the other reconstructions, in the same pass: how much of the AUC is the tanh
    # head's per-intensity error (coarse against calibrated), and what the refiner adds (refined against both)
    result["auc_by_reconstruction"] = {reconstruction: result["auc"], **{
        other.reconstruction: metrics.patient_auc(pids, other.scores, labels) for other in beside}}
    # every reconstruction's patient and slice scores: the label-free decisions bootstrap them (decisions.py)
    by_reconstruction = {reconstruction: scores, **{other.reconstruction: other.scores for other in beside}}
    result["patient_scores"] = {"pid": patients["pid"].tolist(), "label": patients["label"].tolist(),
                                **{name: metrics.aggregate_patients(pids, values)["score"].tolist()
                                   for name, values in by_reconstruction.items()}}
    result["slice_scores"] = {"pid": pids, "label": [int(label) for label in labels],
                              **{name: [float(v) for v in values] for name, values in by_reconstruction.items()}}
    result["threshold_note"] = "sensitivity = specificity point, fitted on these same labels (optimistic)"
    if networks.refiner is not None:
        result.update(ddim_steps=c.ddim_steps, refiner_samples=c.refiner_samples,
                      refiner_holdout_check=getattr(networks.refiner, "holdout_check", None))
    if protocol.label_free:
        result["labels_used"] = "none: known-healthy set = 0, whole mixed set = 1"
        result["known_healthy"] = ("patients held out of stage-1 training"
                                   if held_out_known_healthy(networks.training_config, c.image_dir) is not None
                                   else "all of train/neg")
        if c.rho is not None:
            result["auc_estimate_from_rho"] = metrics.aucp_to_auc(result["auc"], c.rho)
            result["rho"] = c.rho
    if protocol.healthy_reference and runtime.is_main:
        healthy = patients["score"][patients["label"] == 0]
        run_layout.write_json({"checkpoint": iteration, "reconstruction": reconstruction,
                               "made_with": cache_keys.scoring_key(networks, paths),
                               "percentile_95": metrics.healthy_percentile_threshold(healthy, 95),
                               "map_scale": healthy_maps.scale(), "healthy_patient_scores": healthy.tolist()},
                              out.healthy_reference)
    if panels is not None:
        panels.write(known_healthy_reference(runtime, networks)["map_scale"])
    if pixel_metrics is not None:
        result["pixel_region_slices"] = pixel_consumer.regions()  # slices counted inside a brain mask / the head
        add_optional_metrics(result, "pixel_metrics", pixel_metrics.compute)
    result["seconds"] = round(time.time() - started, 2)
    if not runtime.is_main:
        return result
    run_layout.write_csv([{"pid": pid, "label": int(label), "n_slices": int(n), "score": f"{score:.9g}",
                           "prediction": int(score >= result["threshold"])}
                          for pid, label, n, score in zip(patients["pid"], patients["label"], patients["n_slices"],
                                                          patients["score"])], out.protocol_csv(name))
    run_layout.write_json(result, out.protocol_json(name))
    title = f"{protocol.title} - checkpoint {iteration} ({reconstruction})"
    visualize.save_roc_curve(patients["label"], patients["score"], out.roc_plot(name), title)
    visualize.save_score_histogram(patients["label"], patients["score"], result["threshold"], out.score_plot(name),
                                   title, label_names=protocol.label_names)
    log_protocol(c, result, out.folder)
    return result


def add_optional_metrics(result, name, compute):
    """result.update(compute()); a metric that cannot be computed on this data (e.g. pixel metrics where no
    scored slice has a lesion pixel) is left out with its reason under "not_computed", so the rest is written."""
    try:
        result.update(compute())
    except ValueError as err:
        result.setdefault("not_computed", {})[name] = str(err)


def side_reconstructions(networks):
    """The reconstructions scored beside the one the networks score with: coarse x_c, and f(x_c) where the
    networks have an intensity correction."""
    others = ["coarse"] + (["calibrated"] if networks.correction is not None else [])
    return [other for other in others if other != networks.reconstruction]


def print_result(result, out_dir):
    protocol = PROTOCOLS[result["protocol"]]
    rows = [(protocol.metric, result["auc"]), ("average precision", result["average_precision"]),
            ("sensitivity", result["sensitivity"]), ("specificity", result["specificity"]),
            ("threshold (sens = spec)", result["threshold"])]
    if "auc_estimate_from_rho" in result:
        rows.append((f"AUC estimate (rho {result['rho']})", result["auc_estimate_from_rho"]))
    for key in ("slice_auroc", "pixel_auroc", "pixel_auprc", "best_dice"):
        if key in result:
            rows.append((key.replace("_", " "), result[key]))
    print(f"\n{protocol.title} protocol, checkpoint {result['checkpoint']} "
          f"({result['reconstruction']} reconstruction): {result['n_patients']} patients, "
          f"{result['n_slices']} slices, {result['seconds']} s")
    for label, value in rows:
        print(f"  {label:<26} {value:.4f}")
    for name, reason in result.get("not_computed", {}).items():
        print(f"  {name.replace('_', ' '):<26} not computed: {reason}")
    estimate = result.get("auc_estimate_from_rho")
    if estimate is not None and not 0.0 <= estimate <= 1.0:
        print(f"  (the AUC estimate lies outside [0, 1]: the mixed set's healthy slices do not score like the "
              f"known-healthy ones to this model, or --rho {result['rho']} is off; read AUCp, not the estimate)")
    print(f"Results written to {out_dir}")


def known_healthy_reference(runtime, networks):
    """The AUCp run's known-healthy reference of these networks (patient scores: score mode's flag threshold;
    map_scale: the top of every anomaly panel's colour scale); the AUCp protocol is run where there is none yet, or
    where the one there was computed with other settings or weights (cache_keys)."""
    c = networks.config
    own = run_layout.own_results(c)
    reference = run_layout.CheckpointResults(own, networks.iteration, networks.reconstruction).healthy_reference
    training_dir = healthy_split.training_data_dir(networks.training_config, c.image_dir)
    reference_networks = networks._replace(config=replace_config(c, image_dir=training_dir, save_maps=0,
                                                                 result_dir=own, run_result_dir=None))
    paths, labels = protocol_slices(networks, "aucp", training_dir)
    why = distributed.broadcast(reference_out_of_date(reference, reference_networks, paths) if runtime.is_main
                                else None)
    if why:  # rank 0's answer: every rank takes part in scoring
        distributed.main_print(f"The known-healthy reference for checkpoint {networks.iteration} "
                               f"({networks.reconstruction}) {why}: scoring {training_dir}/train/neg and the mixed "
                               f"set (the AUCp protocol).")
        score_protocol(runtime, reference_networks, "aucp", paths, labels, time.time())
    if not runtime.is_main:  # rank 0 wrote it; it hands it to the others
        return distributed.broadcast(None)
    with open(reference) as f:
        return distributed.broadcast(json.load(f))


def reference_out_of_date(path, networks, paths):
    """None when the known-healthy reference at `path` was computed by these networks with these settings on these
    slices of the run's data, else why it must be computed (again)."""
    if not os.path.isfile(path):
        return "does not exist yet"
    try:
        with open(path) as f:
            saved = json.load(f)
    except ValueError:  # a torn file (a write cut short)
        return "cannot be read"
    why = cache_keys.stale_reason(saved.get("made_with"), cache_keys.scoring_key(networks, paths))
    return why and f"is out of date ({why})"
