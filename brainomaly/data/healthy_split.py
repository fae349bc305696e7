"""The known-healthy split: which patients of train/neg stage 1 trains on and which it holds out (AUCp's label-0 set,
the refiner's check), drawn once per run and recorded in its config."""
import os

import numpy as np

from brainomaly import distributed, seeds
from brainomaly.data import dataset_layout
from brainomaly.data.dataset_layout import HEALTHY_FOLDER, patient_id, require_images
from brainomaly.errors import UserError


def hold_out_patients(paths, fraction, seed):
    """(kept, held_out) slice paths: a seeded `fraction` of the patients (at least one, never all) held out whole,
    so no slice of a held-out patient is trained on. One patient only: nothing is held out."""
    patients = sorted({patient_id(p) for p in paths})
    n_held = min(len(patients) - 1, max(1, round(fraction * len(patients)))) if fraction > 0 else 0
    held = {patients[i] for i in np.random.default_rng(seed).permutation(len(patients))[:n_held]}
    return [p for p in paths if patient_id(p) not in held], [p for p in paths if patient_id(p) in held]


def draw_split(root, fraction, seed):
    """(trained_on, held_out) slices of the known-healthy set train/neg: the seeded --healthy_holdout share of
    its patients that neither stage trains on (AUCp's label-0 set and the refiner's check)."""
    return hold_out_patients(require_images(root, HEALTHY_FOLDER), fraction, seeds.seed(seed, "healthy_holdout"))


KNOWN_HEALTHY_KEY = "known_healthy_patients"  # {"held_out": [pid, ...], "trained_on": [pid, ...]}


def patient_ids(paths):
    return sorted({dataset_layout.patient_id(p) for p in paths})


def is_training_data(training_config, image_dir):
    """Whether image_dir is the dataset the run was trained on: the folder it names, or (the run and its data
    moved to another folder or machine) one whose train/neg holds the run's held-out patients and some of those
    it trained on."""
    trained_dir = training_config.get("image_dir", image_dir)
    if os.path.realpath(trained_dir) == os.path.realpath(image_dir):
        return True
    recorded = training_config.get(KNOWN_HEALTHY_KEY)
    folder = os.path.join(image_dir, dataset_layout.HEALTHY_FOLDER)
    if not recorded or not os.path.isdir(folder):
        return False
    present = set(patient_ids(dataset_layout.list_images(folder, warn=False)))
    return set(recorded["held_out"]) <= present and bool(set(recorded["trained_on"]) & present)


def training_data_dir(training_config, image_dir):
    """The folder the run was trained on: the one it names, or image_dir where the run's data has moved there."""
    trained_dir = training_config.get("image_dir", image_dir)
    if not os.path.isdir(trained_dir) and is_training_data(training_config, image_dir):
        return image_dir
    return trained_dir


def run_split(root, training_config, unset_fraction=0.0):
    """(trained_on, held_out) slices of ROOT/train/neg for the run trained with training_config: its recorded
    patients; a run that recorded none (from before the record) draws them again from its --healthy_holdout and
    --seed (unset_fraction: for a run from before --healthy_holdout, which held none out)."""
    recorded = training_config.get(KNOWN_HEALTHY_KEY)
    if not recorded:
        return draw_split(root, training_config.get("healthy_holdout", unset_fraction), training_config.get("seed", 0))
    folder = os.path.join(root, dataset_layout.HEALTHY_FOLDER)
    paths = dataset_layout.require_images(root, dataset_layout.HEALTHY_FOLDER)
    present = set(patient_ids(paths))
    held_out, trained_on = set(recorded["held_out"]), set(recorded["trained_on"])
    missing = sorted(held_out - present)
    if missing:
        raise UserError(f"the held-out known-healthy patient(s) {', '.join(missing)} of this run are missing from "
                        f"{folder}: AUCp, the refiner's check and score mode's threshold score exactly the patients "
                        f"stage 1 held out.\nFix: put their slices back in {folder}.")
    added = present - held_out - trained_on
    if added:
        distributed.note_once(f"note: {len(added)} patient(s) in {folder} joined after this run started; they are "
                              f"ignored (neither trained on nor held out).")
    gone = trained_on - present
    if gone:
        distributed.note_once(f"note: {len(gone)} known-healthy patient(s) this run trained on are no longer in "
                              f"{folder}.")
    return ([p for p in paths if dataset_layout.patient_id(p) in trained_on],
            [p for p in paths if dataset_layout.patient_id(p) in held_out])
