"""The run-folder layout, in one place (and the JSON/CSV writers of its files): written by the protocols and
score mode, read by report.py.

RUN_DIR/
    models/   logs/   samples/                        (the default --model_save_dir, --log_dir, --sample_dir)
    results/                                          (the default --result_dir)
        ITER/{refined,calibrated,coarse}/PROTOCOL.{json,csv}, PROTOCOL_roc.png, PROTOCOL_scores.png, maps_PROTOCOL/
        ITER/{refined,calibrated,coarse}/healthy_reference.json  (the AUCp run's known-healthy patient scores)
        ITER/refiner_check.json                       (stage 2's check on held-out known-healthy slices)
        ITER/{refined,calibrated,coarse}/scores_FOLDER.csv, maps_score_FOLDER/   (score mode)
        aucp_selection.{json,csv}, inductive_by_iteration.{json,csv}, transductive_by_iteration.{json,csv}
        learning_curve.png
        on_NAME/                                      (the same files for a protocol run on another dataset,
                                                       data/NAME: never the run's own reference or pick)
"""
import csv
import hashlib
import json
import os
import re

from brainomaly.atomic_files import atomic_output
from brainomaly.decisions import Reconstruction
from brainomaly.errors import UserError
from brainomaly.run import checkpoint as ckpt

# config key -> its default folder under --run_dir
RUN_FOLDERS = {"log_dir": "logs", "model_save_dir": "models", "sample_dir": "samples", "result_dir": "results"}
RECONSTRUCTIONS = tuple(r.value for r in reversed(Reconstruction))  # one folder each under results/ITER/, refined first
# per protocol, the table of its run over every checkpoint (AUCp's is the label-free checkpoint selection)
SWEEP_NAMES = {"inductive": "inductive_by_iteration", "transductive": "transductive_by_iteration",
               "aucp": "aucp_selection"}


def default_folder(run_dir, key):
    return f"{run_dir}/{RUN_FOLDERS[key]}"


def iteration_dir(result_dir, iteration):
    return os.path.join(result_dir, str(iteration))


def sweep_table(result_dir, protocol, extension):
    return os.path.join(result_dir, f"{SWEEP_NAMES[protocol]}.{extension}")


def results_on(result_dir, image_dir):
    """The folder of results on image_dir, a dataset the run was not trained on: RESULT_DIR/on_NAME (NAME: the
    dataset folder's name), beside the run's own results; where on_NAME holds results on another folder of the same
    name (its data.json), on_NAME-HASH (a hash of the resolved path)."""
    resolved = os.path.realpath(image_dir)
    folder = os.path.join(result_dir, "on_" + (re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(resolved)) or "data"))
    try:
        with open(data_record(folder)) as f:
            recorded = json.load(f).get("data_folder")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded not in (None, resolved):
        folder += "-" + hashlib.sha256(resolved.encode()).hexdigest()[:8]
    return folder


def data_record(folder):
    """on_NAME/data.json: which dataset folder the results in `folder` were computed on."""
    return os.path.join(folder, "data.json")


def own_results(config):
    """The run's own result folder, also while config.result_dir names the folder of another dataset's results."""
    return getattr(config, "run_result_dir", None) or config.result_dir


def refiner_check(result_dir, iteration):
    """Stage 2's label-free check on held-out known-healthy slices (also inside ITER-R.ckpt)."""
    return os.path.join(iteration_dir(result_dir, iteration), "refiner_check.json")


def learning_curve(result_dir):
    return os.path.join(result_dir, "learning_curve.png")


class CheckpointResults:
    """The files of one checkpoint scored with one reconstruction (refined or coarse)."""

    def __init__(self, result_dir, iteration, reconstruction):
        self.folder = os.path.join(iteration_dir(result_dir, iteration), reconstruction)

    def protocol_json(self, protocol):
        return os.path.join(self.folder, f"{protocol}.json")

    def protocol_csv(self, protocol):
        return os.path.join(self.folder, f"{protocol}.csv")

    def roc_plot(self, protocol):
        return os.path.join(self.folder, f"{protocol}_roc.png")

    def score_plot(self, protocol):
        return os.path.join(self.folder, f"{protocol}_scores.png")

    def protocol_maps(self, protocol):
        return os.path.join(self.folder, f"maps_{protocol}")

    @property
    def healthy_reference(self):
        return os.path.join(self.folder, "healthy_reference.json")

    def folder_scores(self, tag):
        return os.path.join(self.folder, f"scores_{tag}.csv")

    def folder_maps(self, tag):
        return os.path.join(self.folder, f"maps_score_{tag}")


def set_aside_after(config, iteration):
    """Move what the run holds of the iterations after ITER (their checkpoints, refiners and intensity corrections,
    their results and sample grids) into set_aside_after_ITER/ of the models, results and samples folders (a new
    folder each time: set_aside_after_ITER-2, ...), and the result tables over checkpoints into the results one, so
    that a resume from ITER overwrites none of them. Returns the models' folder they went to, or None (nothing)."""
    newer = ckpt.files_after(config.model_save_dir, iteration)
    if not newer:
        return None
    name = f"set_aside_after_{iteration}"
    suffix, n = "", 1
    while any(os.path.exists(os.path.join(folder, name + suffix))
              for folder in (config.model_save_dir, config.result_dir, config.sample_dir)):
        n += 1
        suffix = f"-{n}"
    moves = [(os.path.join(config.model_save_dir, file), os.path.join(config.model_save_dir, name + suffix, file))
             for files in newer.values() for file in files]
    for later in newer:
        moves.append((iteration_dir(config.result_dir, later),
                      os.path.join(config.result_dir, name + suffix, str(later))))
        moves.append((os.path.join(config.sample_dir, f"{later}-images.png"),
                      os.path.join(config.sample_dir, name + suffix, f"{later}-images.png")))
    for table in [*SWEEP_NAMES.values(), "learning_curve"]:
        for extension in ("json", "csv", "png"):
            file = f"{table}.{extension}"
            moves.append((os.path.join(config.result_dir, file), os.path.join(config.result_dir, name + suffix, file)))
    for source, target in moves:
        if os.path.exists(source):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(source, target)
    return os.path.join(config.model_save_dir, name + suffix)


def write_json(payload, path, what="result"):
    """Atomic (atomic_files): a failed write is a UserError naming the file, and leaves no partial JSON."""
    with atomic_output(path, what) as tmp:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)


def columns(rows):
    """Every key of the rows, in the order they first appear: rows may differ in their keys (a checkpoint sweep
    scores some checkpoints with the refiner and some without), and a table needs a column for each."""
    return list(dict.fromkeys(key for row in rows for key in row))


def write_csv(rows, path, what="result table"):
    """Atomic, like write_json; a row without one of the columns (see columns) leaves that cell blank."""
    with atomic_output(path, what) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns(rows), restval="")
            writer.writeheader()
            writer.writerows(rows)


def refuse_existing_outputs(paths):
    """Score mode never overwrites: any of `paths` (None skipped) that exists, from a previous scoring run, stops
    this one before anything is scored or written."""
    existing = [path for path in paths if path is not None and os.path.exists(path)]
    if existing:
        raise UserError(f"{len(existing)} output(s) of this scoring run already exist, e.g. {existing[0]}; nothing "
                        f"was written.\nFix: pass another --output CSV (the maps go to the folder named like it), "
                        f"or move those files away.")
