"""prepare.json: how a dataset's slices were made from NIfTI scans, so that score mode repeats exactly that.

`prepare_data.py nifti` and `bids` write it into the dataset folder; stage 1 copies it into the run's model folder
(beside config.json), where score mode reads it. Kaggle and split-CSV datasets (already sliced) have none.
"""
import json
import os
import shutil

from atomic_files import atomic_output
from errors import UserError

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
