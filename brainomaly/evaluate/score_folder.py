"""Score mode: score an unlabelled folder of slices, or NIfTI volumes (a .nii/.nii.gz file or a folder of them,
see volume_scoring.py), with checkpoint ITER and flag the patients above a percentile of the known-healthy set's
patient scores (a label-free threshold). Under torchrun the ranks share out the slices (scoring.py) and rank 0
writes the CSV and the panels."""

import numpy as np

from brainomaly import metrics
from brainomaly.data import dataset_layout
from brainomaly.evaluate import scoring, volume_scoring
from brainomaly.evaluate.protocols import known_healthy_reference
from brainomaly.evaluate.scoring_networks import load_for_scoring
from brainomaly.run import run_layout
from brainomaly.run.networks import resolve_iteration


def score_folder(runtime, config):
    """Score --image_dir (every image below it, or NIfTI volumes) with --test_iters; one CSV row per patient."""
    c = config
    folder = c.image_dir
    volumes = volume_scoring.find_volumes(folder)
    paths = None if volumes else dataset_layout.list_images_recursive(folder)
    # how the scans will be prepared, settled before any network is loaded: a refusal costs nothing
    preparation = volume_scoring.scoring_preparation(c) if volumes else None
    iteration = resolve_iteration(c, c.test_iters)
    networks = load_for_scoring(runtime, c, iteration)
    reference = known_healthy_reference(runtime, networks)
    threshold = metrics.healthy_percentile_threshold(np.array(reference["healthy_patient_scores"]), c.flag_percentile)
    out = run_layout.CheckpointResults(c.result_dir, iteration, networks.reconstruction)
    tag = volume_scoring.input_tag(folder)
    if volumes:  # whole scans, by rank 0 alone (volumes are not shared out): maps written back onto each grid
        if not runtime.is_main:
            return None
        return volume_scoring.score_volumes_command(volumes, scoring.anomaly_maps(runtime, networks), networks.config,
                                                    threshold, c.output or out.folder_scores(tag),
                                                    f"checkpoint {iteration} ({networks.reconstruction})", preparation)
    output = c.output or out.folder_scores(tag)
    run_layout.refuse_existing_outputs([output, out.folder_maps(tag) if c.save_maps > 0 else None])
    panels = scoring.AnomalyPanels(paths, None, None, out.folder_maps(tag), c.save_maps, folder,
                                   networks.config.image_size)
    scores = scoring.score_slices(runtime, networks, paths, [panels] if c.save_maps > 0 else [])
    panels.write(reference.get("map_scale", 1.0))
    if not runtime.is_main:
        return
    patients = metrics.aggregate_patients([dataset_layout.patient_id(p) for p in paths], scores)
    run_layout.write_csv([{"pid": pid, "n_slices": int(n), "score": f"{score:.9g}", "flagged": int(score > threshold)}
                          for pid, n, score in zip(patients["pid"], patients["n_slices"], patients["score"])], output)
    flagged = int((patients["score"] > threshold).sum())
    print(f"Scored {len(paths)} slices of {len(patients['pid'])} patients from {folder} with checkpoint "
          f"{iteration} ({networks.reconstruction}).\nFlagged {flagged} above the {c.flag_percentile:g}th "
          f"percentile of known-healthy patient scores ({threshold:.6f}).\nWrote {output}")
