"""prepare.json: how a dataset's slices were made from NIfTI scans, so that score mode repeats exactly that.

`prepare_data.py nifti` and `bids` write it into the dataset folder; stage 1 copies it into the run's model folder
(beside config.json), where score mode reads it. Kaggle and split-CSV datasets (already sliced) have none.
"""
import json
import os
import shutil
import sys
from dataclasses import dataclass

from brainomaly.atomic_files import atomic_output
from brainomaly.errors import UserError

RECORD_NAME = "prepare.json"


def package_versions(names=("numpy", "nibabel", "nilearn", "antspyx", "pybids")):
    """{package: version} of the installed packages among names (a missing optional one is left out)."""
    from importlib import metadata
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def make_record(command, min_brain_fraction, slices, image_size, masks, preprocess):
    """The prepare.json content; preprocess is a preprocessing.PreprocessSettings or None."""
    return {"command": command, "preprocess": preprocess.record() if preprocess is not None else None,
            "min_brain_fraction": None if slices else min_brain_fraction, "slices": slices, "image_size": image_size,
            "brain_masks_given": bool(masks), "versions": package_versions()}


def write_record(record, path):
    with atomic_output(path, "preparation record") as tmp:
        with open(tmp, "w") as handle:
            json.dump(record, handle, indent=2)
            handle.write("\n")


def read_record(path):
    """The record at path, or None when there is none."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the preparation record {path} ({err}).\nFix: restore it from the dataset "
                        f"folder the run was trained on (its {RECORD_NAME}).") from err


def copy_into_run(image_dir, model_dir):
    """Stage 1: keep the training data's record with the checkpoints (none for already-sliced datasets: any stale
    copy is removed so it cannot describe other data)."""
    source, target = os.path.join(image_dir, RECORD_NAME), os.path.join(model_dir, RECORD_NAME)
    if os.path.isfile(source):
        with atomic_output(target, "preparation record") as tmp:
            shutil.copyfile(source, tmp)
    elif os.path.isfile(target):
        os.remove(target)


@dataclass
class ScoringPreparation:
    """How score mode prepares a NIfTI scan: what the run recorded, or what --prepared says."""
    min_brain_fraction: float = 0.3
    slice_range: tuple = None     # (start, stop) or None
    preprocess: object = None     # the run's preprocessing.PreprocessSettings, None when it recorded none
    repeat_preprocessing: bool = False  # False with --prepared: scans are on the template grid already
    description: str = "sliced as given"
    slice_size: int = None        # side of the training slices as written to PNG; None: the network's --image_size


def no_record_preparation(path, min_brain_fraction, slices, prepared_size):
    """--prepared on a run without prepare.json: the slicing flags as given, and the slice size, which must be."""
    from brainomaly.data.nifti_volumes import parse_slices
    if prepared_size is None:
        raise UserError(f"this run records no preparation of its training data ({path} is missing), so the size its "
                        f"slices were written at is unknown; a scan's slices must be made at that size and resized "
                        f"as the loader resized the training slices, or the score is not comparable.\nFix: add "
                        f"--prepared_size N, the side in pixels of the training slices (the --image_size given to "
                        f"prepare_data.py or make_cohort.py, e.g. 128 for make_cohort.py's default).")
    fraction = 0.3 if min_brain_fraction is None else min_brain_fraction
    return ScoringPreparation(fraction, parse_slices(slices) if slices else None, slice_size=prepared_size,
                              description="as given (--prepared): sliced without further preparation")


def for_scoring(model_dir, prepared, min_brain_fraction=None, slices=None, prepared_size=None):
    """The ScoringPreparation of a run (its model folder's prepare.json) and the score-mode flags.

    By default a scan is prepared exactly as the training data were; a run without a record refuses NIfTI scans
    unless --prepared (then --prepared_size is required), and recorded values are never silently replaced by flags
    that differ."""
    from brainomaly.data.nifti_volumes import parse_slices
    if prepared_size is not None and prepared_size < 8:
        raise UserError(f"--prepared_size {prepared_size} is too small.\nFix: give the side in pixels of the "
                        f"training slices, e.g. 192.")
    path = os.path.join(model_dir, RECORD_NAME)
    record = read_record(path)
    if record is None:
        if not prepared:
            raise UserError(f"this run records no preparation of its training data ({path} is missing): its slices "
                            f"were not made from NIfTI scans by prepare_data.py nifti or bids, so score mode cannot "
                            f"repeat that preparation.\nFix: if the scans are prepared as the training data were "
                            f"(skull stripping, registration, bias correction), add --prepared --prepared_size N "
                            f"(N: the side in pixels of the training slices; then pass the --min_brain_fraction or "
                            f"--slices the slices were chosen with); otherwise build the training data with "
                            f"prepare_data.py nifti or bids and train again.")
        return no_record_preparation(path, min_brain_fraction, slices, prepared_size)
    recorded_range = parse_slices(record["slices"]) if record.get("slices") else None
    recorded_fraction = record.get("min_brain_fraction")
    recorded_size = record.get("image_size")
    if recorded_size is None:
        raise UserError(f"{path} records no image_size, the size the training slices were written at.\nFix: restore "
                        f"the {RECORD_NAME} that prepare_data.py wrote into the dataset folder the run was trained on.")
    # flag: (value given, value it means, recorded value, record key)
    given = {"--min_brain_fraction": (min_brain_fraction, min_brain_fraction, recorded_fraction, "min_brain_fraction"),
             "--slices": (slices, parse_slices(slices) if slices else None, recorded_range, "slices"),
             "--prepared_size": (prepared_size, prepared_size, recorded_size, "image_size")}
    for flag, (text, value, recorded, key) in given.items():
        if value is not None and value != recorded:
            raise UserError(f"{flag} {text} differs from the training data's preparation ({key} "
                            f"{record.get(key)}, recorded in {path}).\nFix: drop {flag}: score mode repeats the "
                            f"recorded preparation.")
    settings = record.get("preprocess")
    if settings is None:
        return ScoringPreparation(recorded_fraction, recorded_range, slice_size=recorded_size,
                                  description="as the training data (prepare.json: no preprocessing)")
    from brainomaly.data import preprocessing
    recorded = preprocessing.PreprocessSettings.from_record(settings)
    if prepared:
        return ScoringPreparation(recorded_fraction, recorded_range, recorded, False, "as given (--prepared): on "
                                  "the template grid, sliced with the template's brain mask", recorded_size)
    ants = preprocessing.require_ants()
    if settings.get("antspyx") and settings["antspyx"] != ants.__version__:
        print(f"warning: the training data were preprocessed with antspyx {settings['antspyx']}, these scans are "
              f"prepared with {ants.__version__}: registrations may differ slightly (install antspyx=="
              f"{settings['antspyx']} to repeat it exactly).", file=sys.stderr)
    return ScoringPreparation(recorded_fraction, recorded_range, recorded, True, f"as the training data "
                              f"(prepare.json: N4, {settings['registration']} registration to "
                              f"{settings['template']}, template brain mask)", recorded_size)
