"""Importers of slice collections: the Kaggle Alzheimer MRI tree and a split CSV over sliced PNGs."""
import hashlib
import os
import re
import shutil
import sys

import numpy as np

from brainomaly.data.dataset_layout import LAYOUT_FOLDERS, is_image_file, patient_id, slice_filename
from brainomaly.data.layout_staging import FOLDER_ALIASES, Staging, count_layout, print_counts, read_csv_rows
from brainomaly.data.slice_files import read_grayscale, save_slice_png
from brainomaly.errors import UserError

KAGGLE_HEALTHY = "No Impairment"
KAGGLE_IMPAIRED = ("Very Mild Impairment", "Mild Impairment", "Moderate Impairment")

# ADNI split CSVs of the reference (data/AD_DS1.csv, AD_DS2.csv): key CLASS or CLASS:SPLIT -> folder.
DEFAULT_CLASS_MAP = {
    "AD_Mixed": "train/pos",
    "NL_Mixed": "train/neg_mixed",
    "NL:train": "train/neg",
    "AD:test": "test/pos",
    "NL:test": "test/neg",
}
SKIP = "skip"


# ----------------------------------------------------------------------------------------------------
# kaggle: "Best Alzheimer MRI dataset" 2D slices
# ----------------------------------------------------------------------------------------------------

def slug(text):
    """Readable file-name part: letters, digits, '.', '-' and single '_' (never '__')."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip())
    text = re.sub(r"_{2,}", "_", text)
    text = re.sub(r"-{2,}", "-", text).strip("-_.")
    return text or "image"


def kaggle_class_images(src, split, cls):
    folder = os.path.join(src, split, cls)
    if not os.path.isdir(folder):
        raise UserError(f"missing class folder {folder}.\nFix: point --src at the Kaggle 'Combined Dataset' "
                        f"folder, which holds train/ and test/ with the folders {KAGGLE_HEALTHY!r}, "
                        f"{', '.join(repr(c) for c in KAGGLE_IMPAIRED)}.")
    images = sorted(os.path.join(folder, n) for n in os.listdir(folder) if is_image_file(n))
    if not images:
        raise UserError(f"no images in class folder {folder}.\nFix: re-extract the Kaggle archive there.")
    return images


def read_subjects(path, src, images):
    """{image path: subject} from the --subjects CSV (columns image, subject; image: its path under src, or its file
    name where that is unique); every image must be listed once."""
    rows = read_csv_rows(path, [("image",), ("subject",)], "image-to-subject table", flag="--subjects")
    by_path = {os.path.relpath(p, src).replace(os.sep, "/"): p for p in images}
    by_name = {}
    for image in images:
        by_name.setdefault(os.path.basename(image), []).append(image)
    subjects, rows_of = {}, {}
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        entry, subject = row.get("image", ""), row.get("subject", "")
        if not entry or not subject:
            raise UserError(f"{path} row {number} has no image or no subject.\nFix: fill both cells or remove the row.")
        key = entry.replace("\\", "/").strip("/")
        matches = [by_path[key]] if key in by_path else by_name.get(key, [])
        if len(matches) != 1:
            found = (f"names {len(matches)} images (e.g. {os.path.relpath(matches[0], src)} and "
                     f"{os.path.relpath(matches[1], src)})" if matches else "is no image")
            raise UserError(f"{path} row {number}: {entry} {found} under --src {src}.\nFix: give the image's path "
                            f"under --src, e.g. train/{KAGGLE_HEALTHY}/NAME.jpg.")
        if matches[0] in subjects:
            raise UserError(f"{path} lists {entry} twice (rows {rows_of[matches[0]]} and {number}).\nFix: keep one "
                            f"row per image.")
        subjects[matches[0]], rows_of[matches[0]] = subject, number
    missing = [image for image in images if image not in subjects]
    if missing:
        raise UserError(f"{path} gives no subject for {len(missing)} of the {len(images)} images (e.g. "
                        f"{os.path.relpath(missing[0], src)}).\nFix: add a row (image, subject) for each image, or "
                        f"drop --subjects to make each image its own patient.")
    return subjects


def kaggle_units(src, found, subjects_csv):
    """{(split, healthy?): [unit]}, a unit = the [(path, class, patient id or None)] that go to one folder together:
    one image each without a subject table, else one subject (wholly in test when any of its images is), and
    notes."""
    if subjects_csv is None:
        units = {(split, True): [[(p, KAGGLE_HEALTHY, None)] for p in found[split, KAGGLE_HEALTHY]]
                 for split in ("train", "test")}
        units.update({(split, False): [[(p, c, None)] for c in KAGGLE_IMPAIRED for p in found[split, c]]
                      for split in ("train", "test")})
        return units, []
    classes = {p: (split, cls) for (split, cls), paths in found.items() for p in paths}
    subject_of = read_subjects(subjects_csv, src, list(classes))
    members, ids = {}, {}
    for path in sorted(classes):
        members.setdefault(subject_of[path], []).append(path)
    units = {(split, healthy): [] for split in ("train", "test") for healthy in (True, False)}
    spanning = 0
    for subject in sorted(members):
        pid = slug(subject)
        if pid in ids:
            raise UserError(f"subjects {ids[pid]} and {subject} in {subjects_csv} give the same file name {pid}.\n"
                            f"Fix: make the subject ids differ in letters or digits.")
        ids[pid] = subject
        kinds = sorted({classes[p][1] for p in members[subject]}, key=((KAGGLE_HEALTHY,) + KAGGLE_IMPAIRED).index)
        healthy = kinds == [KAGGLE_HEALTHY]
        if KAGGLE_HEALTHY in kinds and not healthy:
            raise UserError(f"subject {subject} has images of {' and '.join(kinds)} in {subjects_csv}; a patient has "
                            f"one label.\nFix: give separate visits their own subject ids, or correct the rows.")
        splits = {classes[p][0] for p in members[subject]}
        spanning += len(splits) == 2
        units["test" if "test" in splits else "train", healthy].append(
            [(p, classes[p][1], pid) for p in members[subject]])
    notes = [f"note: {spanning} subject(s) have images in both train/ and test/; each went wholly to the test set."] \
        if spanning else []
    return units, notes


def kaggle_plan(src, mixed_disease_share=0.4, neg_share=0.5, seed=0, subjects_csv=None):
    """{folder: [(source path, class name, patient id or None)]} and notes; deterministic for a seed. The shares
    count units: images, or subjects with --subjects."""
    if not 0.0 < mixed_disease_share < 1.0:
        raise UserError(f"--mixed_disease_share {mixed_disease_share} is outside (0, 1).\nFix: use e.g. 0.4.")
    if not 0.0 < neg_share < 1.0:
        raise UserError(f"--neg_share {neg_share} is outside (0, 1).\nFix: use e.g. 0.5.")
    if not os.path.isdir(src):
        raise UserError(f"--src {src} is not a folder.\nFix: pass the Kaggle 'Combined Dataset' folder.")
    classes = (KAGGLE_HEALTHY,) + KAGGLE_IMPAIRED
    found = {(split, cls): kaggle_class_images(src, split, cls) for split in ("train", "test") for cls in classes}
    units, notes = kaggle_units(src, found, subjects_csv)
    unit = "image" if subjects_csv is None else "subject"
    rng = np.random.default_rng(seed)
    plan = {folder: [] for folder in LAYOUT_FOLDERS}
    plan["test/neg"] = [item for group in units["test", True] for item in group]
    plan["test/pos"] = [item for group in units["test", False] for item in group]
    healthy = units["train", True]
    order = rng.permutation(len(healthy))
    n_neg = min(len(healthy) - 1, max(1, int(round(neg_share * len(healthy))))) if len(healthy) > 1 else 0
    if n_neg == 0:
        raise UserError(f"only {len(healthy)} {unit}(s) in {os.path.join(src, 'train', KAGGLE_HEALTHY)}; the "
                        f"known-healthy and mixed sets each need one.\nFix: check the extracted dataset.")
    plan["train/neg"] = [item for i in sorted(order[:n_neg]) for item in healthy[i]]
    plan["train/neg_mixed"] = [item for i in sorted(order[n_neg:]) for item in healthy[i]]
    impaired = units["train", False]
    n_mixed_healthy = len(healthy) - n_neg
    wanted = int(round(mixed_disease_share * n_mixed_healthy / (1.0 - mixed_disease_share)))
    if wanted > len(impaired):
        notes.append(f"note: {mixed_disease_share:.0%} diseased in the mixed set needs {wanted} impaired training "
                     f"{unit}s but only {len(impaired)} exist; using all of them "
                     f"(diseased share {len(impaired) / (len(impaired) + n_mixed_healthy):.1%}).")
        wanted = len(impaired)
    if not impaired:
        raise UserError(f"no impaired {unit} is left for the mixed set in {os.path.join(src, 'train')}.\nFix: check "
                        f"the extracted dataset (and the --subjects table).")
    wanted = max(1, wanted)
    chosen = sorted(rng.choice(len(impaired), size=wanted, replace=False))
    plan["train/pos"] = [item for i in chosen for item in impaired[i]]
    return plan, notes


IMAGES_AS_PATIENTS = (
    "warning: the Kaggle images carry no subject ids, so each image is its own patient: slices of one subject can "
    "land in the trained-on known-healthy set, the held-out known-healthy patients and the test set at once, which "
    "inflates AUCp and the inductive AUC. If you know which images belong to which subject, pass --subjects CSV "
    "(columns image, subject) to keep each subject's images together as one patient.")


def prepare_kaggle(src, out, mixed_disease_share=0.4, neg_share=0.5, seed=0, overwrite=False, *, subjects=None):
    """Kaggle 'Combined Dataset' -> layout of grayscale PNGs: one patient per image, or per subject of the subjects
    CSV (image -> subject; a subject's images are <subject>__NNN.png in one folder). Returns the counts."""
    if subjects is None:
        print(IMAGES_AS_PATIENTS, file=sys.stderr)
    plan, notes = kaggle_plan(src, mixed_disease_share, neg_share, seed, subjects)
    sizes, used, digests, slices = {}, set(), {"train": {}, "test": {}}, {}
    with Staging(out, overwrite, sources=[src]) as stage:
        for folder in LAYOUT_FOLDERS:
            for path, cls, pid in plan[folder]:
                image = read_grayscale(path)
                sizes[image.shape[::-1]] = sizes.get(image.shape[::-1], 0) + 1
                base = f"{slug(cls).lower()}_{slug(os.path.splitext(os.path.basename(path))[0])}"
                name, k = f"{base}.png", 2
                if pid is not None:  # one subject's images: <subject>__NNN.png, numbered in path order
                    name = slice_filename(pid, slices.get(pid, 0))
                    slices[pid] = slices.get(pid, 0) + 1
                while name in used:  # names are unique over the whole output, so ids never collide
                    name, k = f"{base}-{k}.png", k + 1
                used.add(name)
                save_slice_png(image, stage.target(folder, name))
                stage.record(folder, name, patient_id(name), os.path.abspath(path))
                pixels = np.rint(image * 255).astype(np.uint8)
                digests[folder.split("/")[0]].setdefault(hashlib.sha1(pixels).hexdigest(), name)
    counts = count_layout(out)
    print_counts(out, counts, "images" if subjects is None else "slices")
    mixed = counts["train/pos"][1] + counts["train/neg_mixed"][1]
    print(f"  mixed set: {counts['train/pos'][1] / mixed:.1%} of its patients diseased; healthy share rho = "
          f"{counts['train/neg_mixed'][1] / mixed:.3f} (the rho for mapping AUCp to an AUC estimate)")
    print("  image sizes (width x height: count): "
          + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(sizes.items())))
    for note in notes:
        print(note)
    shared = set(digests["train"]) & set(digests["test"])
    if shared:
        example = digests["test"][next(iter(sorted(shared)))]
        print(f"warning: {len(shared)} test image(s) are pixel-identical to a training image (e.g. test {example}); "
              f"inductive results on this split are optimistic.", file=sys.stderr)
    return counts


# ----------------------------------------------------------------------------------------------------
# csv: ADNI-style split CSV over already-sliced PNGs
# ----------------------------------------------------------------------------------------------------

def parse_class_map(text):
    """'AD_Mixed=train/pos,NL:train=train/neg' -> dict merged over DEFAULT_CLASS_MAP."""
    mapping = dict(DEFAULT_CLASS_MAP)
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, folder = item.partition("=")
        folder = folder.strip().lower().replace("\\", "/").strip("/")
        folder = SKIP if folder == SKIP else FOLDER_ALIASES.get(folder)
        if not sep or not key.strip() or folder is None:
            raise UserError(f"--class_map entry '{item}' is not CLASS[:SPLIT]=FOLDER with FOLDER one of "
                            f"{', '.join(LAYOUT_FOLDERS)} or skip.\nFix: e.g. --class_map AD_Mixed=train/pos,"
                            f"NL:train=train/neg.")
        mapping[key.strip()] = folder
    return mapping


def index_slices(src):
    """{patient id: [slice paths]} of every `<pid>__<index>.<ext>` image under src (recursive)."""
    by_name, by_patient = {}, {}
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not is_image_file(name) or "__" not in name:
                continue
            path = os.path.join(root, name)
            if name in by_name:
                raise UserError(f"slice {name} is found twice under {src}: {by_name[name]} and {path}.\n"
                                f"Fix: point --src at a folder that holds each slice once.")
            by_name[name] = path
            by_patient.setdefault(patient_id(name), []).append(path)
    return by_patient


def prepare_csv(split, src, out, class_map=None, link=False, overwrite=False):
    """Split CSV (patient_id, class, split) + sliced PNGs under src -> layout. Returns the counts."""
    mapping = class_map if isinstance(class_map, dict) else parse_class_map(class_map)
    rows = read_csv_rows(split, [("patient_id",), ("class",)], "patient split")
    if not os.path.isdir(src):
        raise UserError(f"--src {src} is not a folder.\nFix: pass the folder holding the <pid>__<slice>.png files.")
    assignment, unmatched = {}, {}
    for number, row in enumerate(rows, start=2):
        pid, cls, part = row.get("patient_id", ""), row.get("class", ""), row.get("split", "")
        if not pid:
            raise UserError(f"{split} row {number} has no patient_id.\nFix: fill it or remove the row.")
        folder = mapping.get(f"{cls}:{part}", mapping.get(cls))
        if folder is None:
            unmatched.setdefault(f"{cls}:{part}" if part else cls, number)
            continue
        if folder == SKIP:
            continue
        if pid in assignment and assignment[pid][0] != folder:
            raise UserError(f"patient {pid} is assigned to two folders in {split}: {assignment[pid][0]} "
                            f"(row {assignment[pid][1]}) and {folder} (row {number}).\n"
                            f"Fix: keep each patient in one folder (train and test must not share patients).")
        assignment.setdefault(pid, (folder, number))
    if unmatched:
        listed = ", ".join(f"{key} (row {row})" for key, row in unmatched.items())
        raise UserError(f"{split}: no folder for class[:split] {listed}.\nFix: map them with --class_map, "
                        f"e.g. --class_map {next(iter(unmatched))}=train/pos (or =skip to leave them out).")
    slices = index_slices(src)
    missing = [pid for pid in assignment if pid not in slices]
    if len(missing) == len(assignment):
        raise UserError(f"none of the {len(assignment)} patients in {split} has slices under {src} "
                        f"(looked for files named <patient_id>__NNN.png, e.g. {slice_filename(missing[0], 0)}).\n"
                        f"Fix: point --src at the folder of sliced PNGs.")
    if missing:
        print(f"warning: {len(missing)} of {len(assignment)} patients in {split} have no slices under {src} "
              f"and are left out (e.g. {', '.join(missing[:5])}).", file=sys.stderr)
    with Staging(out, overwrite, sources=[src]) as stage:
        for pid, (folder, _) in assignment.items():
            for path in slices.get(pid, []):
                name = os.path.basename(path)
                target = stage.target(folder, name)
                if link:
                    try:
                        os.link(path, target)
                    except OSError as err:
                        raise UserError(f"cannot hard-link {path} into {out} ({err}).\nFix: put --out on the "
                                        f"same file system as --src, or drop --link to copy.") from err
                else:
                    shutil.copyfile(path, target)
                stage.record(folder, name, pid, os.path.abspath(path))
    counts = count_layout(out)
    print_counts(out, counts, "slices")
    unused = len(set(slices) - set(assignment))
    if unused:
        print(f"  ({unused} patients with slices under {src} are not in {split} and were not used)")
    return counts
