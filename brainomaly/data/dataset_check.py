"""check_dataset: the layout, image and batch-size checks run before any work, every problem reported at once."""
import os
import sys

from tqdm import tqdm

from brainomaly.data.dataset_layout import (
    MASK_FOLDERS,
    MIXED_FOLDERS,
    describe_folder,
    list_images,
    mask_path,
    patient_id,
)
from brainomaly.data.healthy_split import draw_split
from brainomaly.data.slice_files import open_image
from brainomaly.errors import UserError


def mask_coverage(root, images_by_folder):
    """Report of masks/ and brain_masks/ for check_data: (summary lines, warnings). A folder where some slices
    have a mask and others not names the ones without: a warning, not an error (pixel metrics skip a slice
    without an anomaly mask and count the head of one without a brain mask), but most often a file gone missing."""
    lines, warnings = [], []
    n_total = sum(len(images) for images in images_by_folder.values())
    for mask_folder in MASK_FOLDERS:
        if not os.path.isdir(os.path.join(root, mask_folder)):
            lines.append(f"{mask_folder + '/':<13} absent" + (
                ": pixel metrics are not computed" if mask_folder == "masks" else
                ": pixel metrics count the head (input above the background level) as the region"))
            continue
        covered = 0
        for folder, images in images_by_folder.items():
            missing = [p for p in images if not os.path.isfile(mask_path(root, p, mask_folder))]
            covered += len(images) - len(missing)
            if missing and len(missing) < len(images):
                shown = ", ".join(mask_path(root, p, mask_folder) for p in missing[:3])
                warnings.append(f"{len(missing)} of the {len(images)} slices in {os.path.join(root, folder)} have "
                                f"no {mask_folder[:-1].replace('_', ' ')} while the others have one; missing: "
                                f"{shown}" + (", ..." if len(missing) > 3 else "") +
                                ". Add them at the same relative path, or pixel metrics " +
                                ("leave those slices out." if mask_folder == "masks" else
                                 "count the head of those slices instead."))
        lines.append(f"{mask_folder + '/':<13} {covered} of {n_total} slices")
    return lines, warnings


def trained_healthy_count(root, healthy_holdout, seed):
    """(slices of train/neg stage 1 trains on, patients it holds out) with --healthy_holdout and --seed."""
    trained_on, held_out = draw_split(root, healthy_holdout, seed)
    return len(trained_on), len({patient_id(p) for p in held_out})


def check_dataset(root, batch_size, full=False, batch_flag="--batch_size", mixed_in_batches=True,
                  healthy_holdout=0.0, seed=0):
    """Validate the layout before any work starts; every problem found is reported in one UserError.

    Required: train/pos, train/neg_mixed, train/neg with images (the test folders are optional).
    Errors: missing or empty required folders, unreadable images, too few slices for a batch, a patient id
    in two folders. Reported only: non-image files (skipped), mixed image sizes (all are resized anyway).
    full=True decodes every image (check_data mode); otherwise only the headers are read.
    batch_flag names the flag that set batch_size (stage 2 batches with --refiner_batch_size).
    mixed_in_batches=False: only train/neg is drawn in batches (stage 2), so only its size is checked.
    healthy_holdout, seed: stage 1's --healthy_holdout and --seed; the known-healthy slices left to train on after
    the held-out patients are what must fill a batch. full=True also reports masks/ and brain_masks/.
    """
    if not os.path.isdir(root):
        raise UserError(f"missing data folder {root}.\nFix: pass --image_dir (train.sh NAME reads data/NAME); "
                        f"the layout is in README, 'Data layout'.")
    problems, folders_of_patient, sizes, summary, images_by_folder = [], {}, {}, [], {}
    for folder in ("train/pos", "train/neg_mixed", "train/neg", "test/pos", "test/neg"):
        path = os.path.join(root, folder)
        required = folder.startswith("train/")
        if not os.path.isdir(path):
            if required:
                problems.append(f"missing folder {path}: put the {describe_folder(folder)} there.")
            continue
        images = list_images(path)
        if not images and required:
            problems.append(f"no images in {path}: put the {describe_folder(folder)} there (PNG/JPG).")
        for image_path in tqdm(images, desc=f"checking {folder}", leave=False, disable=len(images) < 2000):
            size, reason = open_image(image_path, full)
            if reason:
                problems.append(f"unreadable image {image_path} ({reason}): replace or remove it.")
            else:
                sizes.setdefault(size, image_path)
            folders_of_patient.setdefault(patient_id(image_path), set()).add(folder)
        summary.append((folder, len(images), len({patient_id(p) for p in images})))
        images_by_folder[folder] = images
    for folder, count, _ in summary:
        if folder == "train/neg" and 0 < count < batch_size:
            problems.append(f"only {count} slices in {os.path.join(root, folder)} for a batch of {batch_size}: "
                            f"add slices or lower {batch_flag}.")
        elif folder == "train/neg" and count and healthy_holdout > 0:
            trained, held = trained_healthy_count(root, healthy_holdout, seed)
            if trained < batch_size:
                problems.append(f"only {trained} of the {count} slices in {os.path.join(root, folder)} are trained "
                                f"on ({held} patient(s) held out by --healthy_holdout {healthy_holdout:g}) for a "
                                f"batch of {batch_size}: add slices or patients, lower {batch_flag} or "
                                f"--healthy_holdout.")
    mask_lines = []
    if full:
        mask_lines, mask_warnings = mask_coverage(root, images_by_folder)
        for warning in mask_warnings:
            print(f"warning: {warning}", file=sys.stderr)
    mixed_count = sum(count for folder, count, _ in summary if folder in MIXED_FOLDERS)
    if mixed_in_batches and 0 < mixed_count < batch_size:
        problems.append(f"only {mixed_count} slices in the mixed set ({root}/train/pos + train/neg_mixed) for a "
                        f"batch of {batch_size}: add slices or lower {batch_flag}.")
    shared = {pid: sorted(f) for pid, f in folders_of_patient.items() if len(f) > 1}
    for pid, folders in list(shared.items())[:10]:
        problems.append(f"patient id {pid!r} has slices in {' and '.join(os.path.join(root, f) for f in folders)}: "
                        f"a patient belongs to one folder; move or rename its slices.")
    if len(shared) > 10:
        problems.append(f"... and {len(shared) - 10} more patient ids found in two folders.")
    if len(sizes) > 1:
        examples = ", ".join(f"{w}x{h} (e.g. {p})" for (w, h), p in list(sizes.items())[:3])
        print(f"note: {len(sizes)} different image sizes in {root}: {examples}; all are padded, cropped to a "
              f"square and resized to --image_size.", file=sys.stderr)
    if full:
        print(f"{'folder':<16} {'slices':>8} {'patients':>9}")
        for folder, count, patients in summary:
            print(f"{folder:<16} {count:>8} {patients:>9}")
        for line in mask_lines:
            print(line)
    if problems:
        raise UserError(f"{len(problems)} problem(s) in {root}:\n  " + "\n  ".join(problems))
    if full:
        print(f"{root}: no problems found.")
