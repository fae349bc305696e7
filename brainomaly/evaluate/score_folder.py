"""Score mode: score an unlabelled folder of slices, or NIfTI volumes (a .nii/.nii.gz file or a folder of them,
see volume_scoring.py), with checkpoint ITER and flag the patients above a percentile of the known-healthy set's
patient scores (a label-free threshold). Under torchrun the ranks share out the slices (scoring.py) and rank 0
writes the CSV and the panels."""
import os

import numpy as np

from brainomaly import metrics
from brainomaly.data import dataset_layout
from brainomaly.errors import UserError
from brainomaly.evaluate import scoring, volume_scoring
from brainomaly.evaluate.protocols import known_healthy_reference
from brainomaly.evaluate.scoring_networks import load_for_scoring
from brainomaly.run import run_config, run_layout
from brainomaly.run.networks import resolve_iteration


def refuse_shared_patient_ids(paths):
    """A patient id (the file name before `__`) must name slices in one folder only: the CSV has one row per id, so
    sub-01 of siteA and sub-01 of siteB would be scored as one patient."""
    folders = {}
    for path in paths:
        pid, folder = dataset_layout.patient_id(path), os.path.dirname(path)
        first = folders.setdefault(pid, (folder, path))
        if first[0] != folder:
            raise UserError(f"patient id {pid} (the file name before `__`) names slices in two folders: {first[0]} "
                            f"(e.g. {first[1]}) and {folder} (e.g. {path}); one CSV row would mix them.\nFix: if they "
                            f"are different patients, rename one's slices (e.g. "
                            f"{os.path.basename(folder)}_{dataset_layout.slice_filename(pid, 0)}) or score each "
                            f"folder separately; if they are one patient, put all its slices in one folder.")


def score_folder(runtime, config):
    """Score --image_dir (every image below it, or NIfTI volumes) with --test_iters; one CSV row per patient."""
    c = run_config.with_run_scoring_flags(config)  # scored as the run's known-healthy reference and check were
    folder = c.image_dir
    volume_scoring.require_csv_name(c.output)
    volumes = volume_scoring.find_volumes(folder)
    paths = None if volumes else dataset_layout.list_images_recursive(folder)
    if paths:
        refuse_shared_patient_ids(paths)
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
