"""Score mode: score an unlabelled folder of slices with checkpoint ITER and flag the patients above a
percentile of the known-healthy set's patient scores (a label-free threshold)."""
import json
import os
import time

import numpy as np

import data_loader
import metrics
import run_layout
import scoring
from checkpoint import replace_config
from networks import load_for_scoring, resolve_iteration
from protocols import score_protocol


def score_folder(runtime, config):
    """Score --image_dir (every image below it) with --test_iters; one CSV row per patient."""
    c = config
    folder = c.image_dir
    paths = data_loader.list_images_recursive(folder)
    iteration = resolve_iteration(c, c.test_iters)
    networks = load_for_scoring(runtime, c, iteration)
    threshold = healthy_threshold(runtime, networks)
    out = run_layout.CheckpointResults(c.result_dir, iteration, networks.reconstruction)
    tag = os.path.basename(os.path.normpath(folder))
    consumers = []
    if c.save_maps > 0:
        consumers.append(scoring.anomaly_panels(paths, None, None, out.folder_maps(tag), c.save_maps, folder,
                                                networks.config.image_size))
    scores = scoring.score_slices(runtime, networks, paths, consumers)
    patients = metrics.aggregate_patients([data_loader.patient_id(p) for p in paths], scores)
    output = c.output or out.folder_scores(tag)
    run_layout.write_csv([{"pid": pid, "n_slices": int(n), "score": f"{score:.6f}", "flagged": int(score > threshold)}
                          for pid, n, score in zip(patients["pid"], patients["n_slices"], patients["score"])], output)
    flagged = int((patients["score"] > threshold).sum())
    print(f"Scored {len(paths)} slices of {len(patients['pid'])} patients from {folder} with checkpoint "
          f"{iteration} ({networks.reconstruction}).\nFlagged {flagged} above the {c.flag_percentile:g}th "
          f"percentile of known-healthy patient scores ({threshold:.6f}).\nWrote {output}")


def healthy_threshold(runtime, networks):
    """The label-free flag threshold: a percentile of the known-healthy set's patient scores, taken from the
    AUCp run of this checkpoint (scored now, with the same networks, if it has not been)."""
    c = networks.config
    reference = run_layout.CheckpointResults(c.result_dir, networks.iteration, networks.reconstruction)
    if not os.path.isfile(reference.healthy_reference):
        training_dir = networks.training_config["image_dir"]
        print(f"No known-healthy reference for checkpoint {networks.iteration} yet: scoring {training_dir}/train/neg once.")
        started = time.time()
        paths, labels = data_loader.protocol_slices(training_dir, "aucp")
        reference_networks = networks._replace(config=replace_config(c, image_dir=training_dir, save_maps=0))
        score_protocol(runtime, reference_networks, "aucp", paths, labels, started)
    with open(reference.healthy_reference) as f:
        healthy = np.array(json.load(f)["healthy_patient_scores"])
    return metrics.healthy_percentile_threshold(healthy, c.flag_percentile)
