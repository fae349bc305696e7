"""Build the dataset layout (train/pos, train/neg_mixed, train/neg, test/pos, test/neg) from raw data.

Three sources, one subcommand each:

    python prepare_data.py nifti  --volumes DIR --split split.csv --out data/NAME [--masks DIR]
                                  [--min_brain_fraction 0.3 | --slices 40:80] [--image_size 192] [--preprocess]
    python prepare_data.py bids   --root DATASET --out data/NAME --healthy RULE --mixed RULE [--test RULE]
                                  --diseased RULE [--session LABEL] [--run N] [--preprocess] (slicing as nifti)
    python prepare_data.py preprocess SCAN.nii.gz --out DIR [--registration affine|syn]
    python prepare_data.py kaggle --src "Combined Dataset" --out data/NAME
                                  [--mixed_disease_share 0.4] [--neg_share 0.5] [--seed 0]
    python prepare_data.py csv    --split AD_DS1.csv --src DIR --out data/NAME [--class_map K=FOLDER,...] [--link]

Every subcommand writes into a staging folder inside OUT and moves the five layout folders into place
only when everything succeeded, so a failure leaves OUT as it was. A non-empty OUT is refused unless
--overwrite is given; then the five layout folders and the records below are replaced and other files in OUT are
left alone.
A manifest `OUT/prepare_data_manifest.csv` records where every written image came from; from NIfTI scans,
`OUT/prepare.json` records how they were prepared (score mode repeats it, preparation_record.py), `bids` writes
`OUT/split.csv` (who went where, bids_layout.py) and `--preprocess` keeps each scan's brain mask and transform in
`OUT/preprocessed/` (preprocessing.py).

Orientation of NIfTI slices (radiological display convention): each volume is reoriented to the closest
canonical RAS orientation, axial slices are taken along the inferior->superior axis (slice index 000 =
most inferior voxel plane of the canonical volume), and each slice is written with anterior at the top
of the image and the patient's right on the image's left (as a radiologist views an axial slice from the
feet). Training flips slices left/right at random anyway, so only the anterior-up convention matters for
the look of the samples.
"""
import argparse
import csv
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

import preparation_record
from data_loader import is_image_file, patient_id, read_grayscale, save_slice_png, slice_filename
from errors import UserError, run_cli

LAYOUT_FOLDERS = ("train/pos", "train/neg_mixed", "train/neg", "test/pos", "test/neg")
MANIFEST_NAME = "prepare_data_manifest.csv"
PREPROCESSED = "preprocessed"
# Files and folders besides the layout that describe one preparation: replaced (or removed) with the layout.
RECORD_FILES = (preparation_record.RECORD_NAME, "split.csv", PREPROCESSED)
NIFTI_EXTENSIONS = (".nii.gz", ".nii")

# Folder names accepted in a NIfTI split CSV ("folder" column), lower-cased, "\" read as "/".
FOLDER_ALIASES = {
    "pos": "train/pos", "train/pos": "train/pos", "train_pos": "train/pos",
    "neg_mixed": "train/neg_mixed", "train/neg_mixed": "train/neg_mixed", "train_neg_mixed": "train/neg_mixed",
    "neg": "train/neg", "train/neg": "train/neg", "train_neg": "train/neg",
    "test_pos": "test/pos", "test/pos": "test/pos",
    "test_neg": "test/neg", "test/neg": "test/neg",
}

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
# Output folder handling (shared by all subcommands)
# ----------------------------------------------------------------------------------------------------

class Staging:
    """Write the layout into OUT/.prepare_data-XXXX, then move the five folders into OUT on success."""

    def __init__(self, out, overwrite, sources=()):
        self.out = os.path.abspath(out)
        for source in sources:
            source = os.path.abspath(source)
            if _inside(self.out, source) or _inside(source, self.out):
                raise UserError(f"output folder {out} and source {source} overlap (one contains the other).\n"
                                f"Fix: pick an --out outside the source folder, e.g. data/NAME.")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise UserError(f"--out {out} exists and is not a folder.\nFix: choose another --out path.")
        if os.path.isdir(self.out) and os.listdir(self.out) and not overwrite:
            raise UserError(f"output folder {out} is not empty; nothing was written.\n"
                            f"Fix: choose a new --out, or add --overwrite to replace its "
                            f"{', '.join(LAYOUT_FOLDERS)} folders and its {', '.join(RECORD_FILES)} (other files "
                            f"there are kept).")
        self.created = not os.path.exists(self.out)
        self.path = None
        self.manifest = []  # rows: folder, file, patient_id, source, slice

    def __enter__(self):
        os.makedirs(self.out, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=".prepare_data-", dir=self.out)
        for folder in LAYOUT_FOLDERS:
            os.makedirs(os.path.join(self.path, folder))
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self._commit()
        shutil.rmtree(self.path, ignore_errors=True)
        if exc_type is not None and self.created and os.path.isdir(self.out) and not os.listdir(self.out):
            os.rmdir(self.out)  # we created it; leave no empty folder behind
        return False

    def target(self, folder, name):
        return os.path.join(self.path, folder, name)

    def record_path(self, name):
        """Where to write one of RECORD_FILES; it is moved into OUT with the layout."""
        assert name in RECORD_FILES, name
        return os.path.join(self.path, name)

    def record(self, folder, name, pid, source, slice_index=""):
        self.manifest.append((folder, name, pid, source, slice_index))

    def _commit(self):
        with open(os.path.join(self.path, MANIFEST_NAME), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("folder", "file", "patient_id", "source", "slice"))
            writer.writerows(sorted(self.manifest))
        for folder in LAYOUT_FOLDERS:
            final = os.path.join(self.out, folder)
            if os.path.lexists(final):
                shutil.rmtree(final) if os.path.isdir(final) and not os.path.islink(final) else os.remove(final)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(os.path.join(self.path, folder), final)
        for name in RECORD_FILES:  # a record of an earlier preparation must not describe this one
            final = os.path.join(self.out, name)
            if os.path.isdir(final) and not os.path.islink(final):
                shutil.rmtree(final)
            elif os.path.lexists(final):
                os.remove(final)
            if os.path.lexists(os.path.join(self.path, name)):
                os.replace(os.path.join(self.path, name), final)
        os.replace(os.path.join(self.path, MANIFEST_NAME), os.path.join(self.out, MANIFEST_NAME))


def _inside(path, parent):
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def count_layout(out):
    """{folder: (images, patients)} of a written layout."""
    counts = {}
    for folder in LAYOUT_FOLDERS:
        path = os.path.join(out, folder)
        names = [n for n in os.listdir(path) if is_image_file(n)] if os.path.isdir(path) else []
        counts[folder] = (len(names), len({patient_id(n) for n in names}))
    return counts


def print_counts(out, counts, unit):
    print(f"wrote {out}:")
    for folder in LAYOUT_FOLDERS:
        images, patients = counts[folder]
        extra = f" from {patients} patients" if unit == "slices" else ""
        print(f"  {folder:<16} {images:>7} {unit}{extra}")


def read_csv_rows(path, required_any, what):
    """Rows of a CSV as dicts with stripped keys/values; the file must have one of `required_any` columns."""
    if not os.path.isfile(path):
        raise UserError(f"split CSV {path} not found.\nFix: pass the path of an existing CSV with --split.")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    for group in required_any:
        if not any(c in columns for c in group):
            raise UserError(f"{path} has columns {columns}, but {what} needs a column named "
                            f"{' or '.join(group)}.\nFix: add or rename that column.")
    if not rows:
        raise UserError(f"{path} has no rows.\nFix: list one {what.split()[0]} per row.")
    return rows


# ----------------------------------------------------------------------------------------------------
# nifti: 3D volumes -> axial PNG slices
# ----------------------------------------------------------------------------------------------------

def strip_nifti_extension(name):
    for ext in NIFTI_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[:-len(ext)]
    return name


def resolve_volume(volumes, entry, csv_path, row_number):
    """Path of the volume a CSV row names (file name, relative path, or patient id without extension)."""
    candidates = [entry] if entry.lower().endswith(NIFTI_EXTENSIONS) else [entry + ext for ext in NIFTI_EXTENSIONS]
    for candidate in candidates:
        path = os.path.join(volumes, candidate)
        if os.path.isfile(path):
            return path
    raise UserError(f"volume {os.path.join(volumes, candidates[0])} named in {csv_path} (row {row_number}) "
                    f"does not exist.\nFix: put the .nii/.nii.gz file in {volumes}, or remove that row.")


def parse_nifti_split(split_csv, volumes):
    """[(patient id, volume path, folder)] from the split CSV, validated before anything is read."""
    rows = read_csv_rows(split_csv, [("file", "patient_id"), ("folder",)], "volume split")
    entries, seen = [], {}
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        entry = row.get("file") or row.get("patient_id") or ""
        if not entry:
            raise UserError(f"{split_csv} row {number} names no volume.\nFix: fill its file/patient_id cell.")
        raw_folder = row.get("folder", "")
        folder = FOLDER_ALIASES.get(raw_folder.lower().replace("\\", "/").strip("/"))
        if folder is None:
            raise UserError(f"{split_csv} row {number}: unknown folder '{raw_folder}'.\nFix: use one of pos, "
                            f"neg_mixed, neg, test_pos, test_neg (or train/pos, ..., test/neg).")
        path = resolve_volume(volumes, entry, split_csv, number)
        pid = strip_nifti_extension(os.path.basename(path))
        if "__" in pid:
            raise UserError(f"volume name {path} contains '__', which separates patient id and slice index.\n"
                            f"Fix: rename the file (and its CSV row) without a double underscore.")
        if pid in seen:
            raise UserError(f"patient {pid} appears twice in {split_csv} (rows {seen[pid]} and {number}).\n"
                            f"Fix: keep one row per volume.")
        seen[pid] = number
        entries.append((pid, path, folder))
    return entries


def parse_slices(text):
    """'40:80' -> (40, 80): half-open axial index range of the RAS-reoriented volume."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text or "")
    if not match or int(match.group(1)) >= int(match.group(2)):
        raise UserError(f"--slices '{text}' is not START:STOP with START < STOP (e.g. 40:80).\n"
                        f"Fix: give a half-open range of axial slice indices, 0 = most inferior.")
    return int(match.group(1)), int(match.group(2))


def load_volume(path):
    """(the NIfTI image as stored, its data float32 XxYxZ reoriented to RAS, voxel sizes (3,) in RAS order).

    Refused with a UserError naming the path: a file nibabel cannot read, a 2D image, a 4D series, and a
    volume without usable intensities (all NaN/inf, or constant).
    """
    import nibabel as nib
    fix = "Fix: replace it with a 3D T1 .nii/.nii.gz volume, or remove it from the input."
    try:
        image = nib.load(path)
        shape = tuple(int(n) for n in image.shape)
    except Exception as err:  # nibabel raises many types for broken files
        raise UserError(f"cannot read volume {path} as NIfTI ({err}).\n{fix}") from err
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise UserError(f"volume {path} is a {len(shape)}D series of shape {shape}; one 3D T1 volume is needed.\n"
                        f"Fix: extract one volume first (e.g. fslroi IN OUT 0 1), then score or prepare that.")
    if len(shape) < 3 or min(shape) < 2:
        raise UserError(f"volume {path} is a 2D image of shape {shape}; a 3D T1 volume is needed.\n{fix}")
    try:
        canonical = nib.as_closest_canonical(image)
        data = np.asarray(canonical.get_fdata(dtype=np.float32)).reshape(canonical.shape[:3])
    except Exception as err:
        raise UserError(f"cannot read volume {path} as NIfTI ({err}).\n{fix}") from err
    finite = np.isfinite(data)
    if not finite.any():
        raise UserError(f"volume {path} holds no finite intensity (every voxel is NaN or inf).\n{fix}")
    if data[finite].min() == data[finite].max():
        raise UserError(f"volume {path} has one constant intensity ({data[finite].min():g}) everywhere.\n{fix}")
    zooms = np.asarray(canonical.header.get_zooms()[:3], dtype=np.float64)
    return image, np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0), zooms


def load_canonical(path):
    """(data float32 XxYxZ in RAS order, voxel sizes (3,)) of a NIfTI file."""
    _, data, zooms = load_volume(path)
    return data, zooms


def brain_mask(data, mask_path=None):
    """Boolean brain mask: the given mask file (> 0), else a robust-range threshold.

    Threshold (as FSL's robust range): voxels brighter than p2 + 10% of (p98 - p2) of the whole volume.
    It keeps the brain of a skull-stripped scan and drops background noise of an unstripped one.
    """
    if mask_path is not None:
        mask, _ = load_canonical(mask_path)
        if mask.shape != data.shape:
            raise UserError(f"mask {mask_path} has shape {mask.shape} but its volume has {data.shape}.\n"
                            f"Fix: give the brain mask of exactly that volume (same grid).")
        return mask > 0
    low, high = np.percentile(data, (2, 98))
    return data > low + 0.1 * (high - low)


def normalise(data, mask, low_pct=1.0, high_pct=99.0):
    """Map the [low_pct, high_pct] percentiles of the brain voxels to [0, 1], clipping outside."""
    brain = data[mask]
    low, high = np.percentile(brain, (low_pct, high_pct))
    if high <= low:
        high = low + 1.0
    return np.clip((data - low) / (high - low), 0.0, 1.0)


def choose_slices(mask, min_brain_fraction=None, slice_range=None, path=""):
    """Axial indices to keep: those whose brain area >= fraction x the largest, or an explicit range."""
    depth = mask.shape[2]
    if slice_range is not None:
        start, stop = slice_range
        if stop > depth:
            raise UserError(f"--slices {start}:{stop} runs past the {depth} axial slices of {path}.\n"
                            f"Fix: use a range within 0:{depth}, or --min_brain_fraction.")
        return list(range(start, stop))
    area = mask.sum(axis=(0, 1))
    return [int(k) for k in np.flatnonzero(area >= min_brain_fraction * area.max())]


def axial_to_image(slice_xy):
    """RAS axial slice (x = left->right, y = posterior->anterior) -> display image, anterior up, radiological."""
    return slice_xy.T[::-1, ::-1]


def image_to_axial(image):
    """Inverse of axial_to_image: display image (rows, columns) -> RAS axial slice (x, y)."""
    return image[::-1, ::-1].T


def resize_float(image, rows, cols):
    """Bilinear resize of a float image to rows x cols (PIL, antialiased when shrinking)."""
    resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    return np.asarray(resized.resize((cols, rows), Image.BILINEAR), dtype=np.float32)


def square_layout(shape, pixel_size, image_size):
    """(top, left, rows, cols) of the block a shape-sized image fills inside square_resize's canvas."""
    height_mm, width_mm = shape[0] * pixel_size[0], shape[1] * pixel_size[1]
    scale = image_size / max(height_mm, width_mm)
    new_rows = min(image_size, max(1, int(round(height_mm * scale))))
    new_cols = min(image_size, max(1, int(round(width_mm * scale))))
    return (image_size - new_rows) // 2, (image_size - new_cols) // 2, new_rows, new_cols


def square_resize(image, pixel_size, image_size):
    """Resize to physical proportions (pixel_size = (row mm, column mm)), pad centred to a square image_size."""
    top, left, new_rows, new_cols = square_layout(image.shape, pixel_size, image_size)
    canvas = np.zeros((image_size, image_size), dtype=np.float32)
    canvas[top:top + new_rows, left:left + new_cols] = np.clip(resize_float(image, new_rows, new_cols), 0.0, 1.0)
    return canvas


def unsquare(canvas, shape, pixel_size):
    """Inverse of square_resize: the block of the canvas that holds the image, resized back to shape."""
    top, left, new_rows, new_cols = square_layout(shape, pixel_size, canvas.shape[0])
    return resize_float(canvas[top:top + new_rows, left:left + new_cols], shape[0], shape[1])


@dataclass
class PreparedVolume:
    """One volume as `prepare_data.py nifti` prepares it, with what is needed to map slices back onto it."""
    path: str
    image: object           # the nibabel image as stored (its grid and affine are the output's)
    normalised: np.ndarray  # XxYxZ in RAS order, [0, 1]
    zooms: np.ndarray       # voxel sizes (3,) in RAS order
    indices: list           # kept axial indices of the RAS volume
    slices: list            # image_size x image_size arrays in [0, 1], one per index

    @property
    def pixel_size(self):
        return (self.zooms[1], self.zooms[0])  # display rows run along y (A-P), columns along x (R-L)


def prepare_volume(path, mask_path=None, min_brain_fraction=0.3, slice_range=None, image_size=192):
    """Read, reorient, brain-mask, normalise, choose and resize the axial slices of one volume."""
    image, data, zooms = load_volume(path)
    mask = brain_mask(data, mask_path)
    if not mask.any():
        raise UserError(f"no brain voxels found in {path}" + (f" with mask {mask_path}" if mask_path else "")
                        + ".\nFix: check the volume (is it empty?) or give a brain mask with --masks.")
    normalised = normalise(data, mask)
    if mask_path is not None:
        normalised = np.where(mask, normalised, 0.0)  # a given brain mask also strips the skull
    indices = choose_slices(mask, min_brain_fraction, slice_range, path)
    prepared = PreparedVolume(path, image, normalised, zooms, indices, [])
    prepared.slices = [square_resize(axial_to_image(normalised[:, :, k]), prepared.pixel_size, image_size)
                       for k in indices]
    return prepared


def volume_to_slices(path, mask_path=None, min_brain_fraction=0.3, slice_range=None, image_size=192):
    """[(axial index, image_size x image_size array in [0, 1])] of one volume."""
    prepared = prepare_volume(path, mask_path, min_brain_fraction, slice_range, image_size)
    return list(zip(prepared.indices, prepared.slices))


def check_slicing(min_brain_fraction, slices, image_size):
    """The slice range of --slices (or None), after checking the slicing flags of nifti, bids and score mode."""
    if slices is None and not 0.0 < min_brain_fraction <= 1.0:
        raise UserError(f"--min_brain_fraction {min_brain_fraction} is outside (0, 1].\nFix: use e.g. 0.3.")
    if image_size < 8:
        raise UserError(f"--image_size {image_size} is too small.\nFix: use e.g. 192.")
    return parse_slices(slices) if isinstance(slices, str) else slices


def prepare_scan(path, pid, mask_path, preprocess, work_dir, min_brain_fraction, slice_range, image_size):
    """(PreparedVolume, PreprocessedScan or None) of one scan: preprocessed into work_dir first when asked, then
    sliced; the one preparation path of `nifti`, `bids` and score mode."""
    if preprocess is None:
        return prepare_volume(path, mask_path, min_brain_fraction, slice_range, image_size), None
    import preprocessing
    load_volume(path)  # the same checks and messages for a broken file as without preprocessing
    scan = preprocessing.preprocess_scan(path, work_dir, pid, preprocess)
    return prepare_volume(scan.template_space, scan.template_mask, min_brain_fraction, slice_range, image_size), scan


def write_volume_layout(entries, out, overwrite, sources, record, mask_paths=None, preprocess=None,
                        min_brain_fraction=0.3, slice_range=None, image_size=192, split_rows=None):
    """[(patient id, scan path, folder)] -> the layout in out, with prepare.json (record) and split.csv when given.
    One progress bar over the scans; a summary with the time per scan at the end."""
    started = time.monotonic()
    with Staging(out, overwrite, sources=sources) as stage:
        work_dir = stage.record_path(PREPROCESSED)
        bar = tqdm(entries, desc="preparing scans", unit="scan", file=sys.stderr, disable=None)
        for number, (pid, path, folder) in enumerate(bar, start=1):
            bar.set_postfix_str(pid)
            prepared, _ = prepare_scan(path, pid, (mask_paths or {}).get(pid), preprocess, work_dir,
                                       min_brain_fraction, slice_range, image_size)
            for index, image in zip(prepared.indices, prepared.slices):
                name = slice_filename(pid, index)
                save_slice_png(image, stage.target(folder, name))
                stage.record(folder, name, pid, os.path.abspath(path), index)
            tqdm.write(f"[{number}/{len(entries)}] {pid}: {len(prepared.indices)} slices -> {folder}", file=sys.stdout)
        preparation_record.write_record(record, stage.record_path(preparation_record.RECORD_NAME))
        if split_rows is not None:
            with open(stage.record_path("split.csv"), "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(split_rows[0]))
                writer.writeheader()
                writer.writerows(split_rows)
    counts = count_layout(out)
    print_counts(out, counts, "slices")
    seconds = time.monotonic() - started
    print(f"prepared {len(entries)} scans in {seconds:.1f} s ({seconds / max(1, len(entries)):.1f} s per scan"
          + (", N4 + registration + brain mask included" if preprocess is not None else "") + ")")
    return counts


def prepare_nifti(volumes, split, out, masks=None, min_brain_fraction=0.3, slices=None, image_size=192,
                  overwrite=False, preprocess=None):
    """NIfTI volumes + split CSV -> axial PNG slices in the layout. Returns {folder: (slices, patients)}.
    preprocess: a preprocessing.PreprocessSettings to run N4, registration and brain extraction first."""
    if not os.path.isdir(volumes):
        raise UserError(f"--volumes {volumes} is not a folder.\nFix: pass the folder holding the .nii/.nii.gz files.")
    if masks is not None and not os.path.isdir(masks):
        raise UserError(f"--masks {masks} is not a folder.\nFix: pass the folder of brain masks (same file names).")
    if masks is not None and preprocess is not None:
        raise UserError("--masks and --preprocess both give the brain mask.\nFix: drop --masks (preprocessing "
                        "takes the template's brain mask) or drop --preprocess (your scans are prepared already).")
    slice_range = check_slicing(min_brain_fraction, slices, image_size)
    entries = parse_nifti_split(split, volumes)
    mask_paths = {}
    if masks is not None:
        for pid, path, _ in entries:
            mask_paths[pid] = os.path.join(masks, os.path.basename(path))
            if not os.path.isfile(mask_paths[pid]):
                raise UserError(f"brain mask {mask_paths[pid]} for volume {path} does not exist.\n"
                                f"Fix: put a mask with the same file name in {masks}, or drop --masks.")
    record = preparation_record.make_record("nifti", min_brain_fraction, slice_text(slice_range), image_size,
                                            masks, preprocess)
    return write_volume_layout(entries, out, overwrite, [volumes] + ([masks] if masks else []), record, mask_paths,
                               preprocess, min_brain_fraction, slice_range, image_size)


def slice_text(slice_range):
    return f"{slice_range[0]}:{slice_range[1]}" if slice_range else None


def prepare_bids(root, out, rules, diseased, session=None, run=None, min_brain_fraction=0.3, slices=None,
                 image_size=192, overwrite=False, preprocess=None):
    """A BIDS dataset -> the layout, by rules over participants.tsv (bids_layout.py); writes split.csv too."""
    import bids_layout
    slice_range = check_slicing(min_brain_fraction, slices, image_size)
    selections = bids_layout.select_scans(root, rules, diseased, session, run)
    for selection in selections:
        if selection.note:
            print(f"note: {selection.note}")
    record = preparation_record.make_record("bids", min_brain_fraction, slice_text(slice_range), image_size, None,
                                            preprocess)
    entries = [(s.participant, s.scan, s.folder) for s in selections]
    return write_volume_layout(entries, out, overwrite, [root], record, None, preprocess, min_brain_fraction,
                               slice_range, image_size, bids_layout.split_rows(selections, root))


def preprocess_one(scan, out_dir, preprocess):
    """The single-scan command: N4, registration and brain mask of SCAN into out_dir; nothing is sliced."""
    import preprocessing
    if not os.path.isfile(scan):
        raise UserError(f"scan {scan} does not exist.\nFix: check the path of the .nii/.nii.gz file.")
    load_volume(scan)
    stem = strip_nifti_extension(os.path.basename(scan))
    started = time.monotonic()
    staging = tempfile.mkdtemp(prefix=".preprocess-", dir=os.path.dirname(os.path.abspath(out_dir)) or ".")
    try:
        result = preprocessing.preprocess_scan(scan, staging, stem, preprocess)
        os.makedirs(out_dir, exist_ok=True)
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"preprocessed {scan} in {time.monotonic() - started:.1f} s ({preprocess.registration} registration to "
          f"{preprocessing.TEMPLATE}; {result.coverage:.0%} of the template brain in the field of view):\n"
          f"  {os.path.join(out_dir, preprocessing.output_name(stem, 'template_space'))}\n"
          f"  {os.path.join(out_dir, preprocessing.output_name(stem, 'brain_mask'))}  (on the scan's own grid)")


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


def kaggle_plan(src, mixed_disease_share=0.4, neg_share=0.5, seed=0):
    """{folder: [(source path, class name)]} and notes; deterministic for a seed."""
    if not 0.0 < mixed_disease_share < 1.0:
        raise UserError(f"--mixed_disease_share {mixed_disease_share} is outside (0, 1).\nFix: use e.g. 0.4.")
    if not 0.0 < neg_share < 1.0:
        raise UserError(f"--neg_share {neg_share} is outside (0, 1).\nFix: use e.g. 0.5.")
    if not os.path.isdir(src):
        raise UserError(f"--src {src} is not a folder.\nFix: pass the Kaggle 'Combined Dataset' folder.")
    classes = (KAGGLE_HEALTHY,) + KAGGLE_IMPAIRED
    found = {(split, cls): kaggle_class_images(src, split, cls) for split in ("train", "test") for cls in classes}
    rng = np.random.default_rng(seed)
    plan = {folder: [] for folder in LAYOUT_FOLDERS}
    plan["test/neg"] = [(p, KAGGLE_HEALTHY) for p in found["test", KAGGLE_HEALTHY]]
    plan["test/pos"] = [(p, c) for c in KAGGLE_IMPAIRED for p in found["test", c]]
    healthy = found["train", KAGGLE_HEALTHY]
    order = rng.permutation(len(healthy))
    n_neg = min(len(healthy) - 1, max(1, int(round(neg_share * len(healthy))))) if len(healthy) > 1 else 0
    if n_neg == 0:
        raise UserError(f"only {len(healthy)} image(s) in {os.path.join(src, 'train', KAGGLE_HEALTHY)}; the "
                        f"known-healthy and mixed sets each need one.\nFix: check the extracted dataset.")
    plan["train/neg"] = [(healthy[i], KAGGLE_HEALTHY) for i in sorted(order[:n_neg])]
    plan["train/neg_mixed"] = [(healthy[i], KAGGLE_HEALTHY) for i in sorted(order[n_neg:])]
    impaired = [(p, c) for c in KAGGLE_IMPAIRED for p in found["train", c]]
    n_mixed_healthy = len(plan["train/neg_mixed"])
    wanted = int(round(mixed_disease_share * n_mixed_healthy / (1.0 - mixed_disease_share)))
    notes = []
    if wanted > len(impaired):
        notes.append(f"note: {mixed_disease_share:.0%} diseased in the mixed set needs {wanted} impaired training "
                     f"images but only {len(impaired)} exist; using all of them "
                     f"(diseased share {len(impaired) / (len(impaired) + n_mixed_healthy):.1%}).")
        wanted = len(impaired)
    wanted = max(1, wanted)
    chosen = sorted(rng.choice(len(impaired), size=wanted, replace=False))
    plan["train/pos"] = [impaired[i] for i in chosen]
    return plan, notes


def prepare_kaggle(src, out, mixed_disease_share=0.4, neg_share=0.5, seed=0, overwrite=False):
    """Kaggle 'Combined Dataset' -> layout of grayscale PNGs, one patient per image. Returns the counts."""
    plan, notes = kaggle_plan(src, mixed_disease_share, neg_share, seed)
    sizes, used, digests = {}, set(), {"train": {}, "test": {}}
    with Staging(out, overwrite, sources=[src]) as stage:
        for folder in LAYOUT_FOLDERS:
            for path, cls in plan[folder]:
                image = read_grayscale(path)
                sizes[image.shape[::-1]] = sizes.get(image.shape[::-1], 0) + 1
                base = f"{slug(cls).lower()}_{slug(os.path.splitext(os.path.basename(path))[0])}"
                name, k = f"{base}.png", 2
                while name in used:  # names are unique over the whole output, so ids never collide
                    name, k = f"{base}-{k}.png", k + 1
                used.add(name)
                save_slice_png(image, stage.target(folder, name))
                stage.record(folder, name, patient_id(name), os.path.abspath(path))
                pixels = np.rint(image * 255).astype(np.uint8)
                digests[folder.split("/")[0]].setdefault(hashlib.sha1(pixels).hexdigest(), name)
    counts = count_layout(out)
    print_counts(out, counts, "images")
    mixed = counts["train/pos"][0] + counts["train/neg_mixed"][0]
    print(f"  mixed set: {counts['train/pos'][0] / mixed:.1%} diseased; healthy share rho = "
          f"{counts['train/neg_mixed'][0] / mixed:.3f} (the rho for mapping AUCp to an AUC estimate)")
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


# ----------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        description="Build the Brainomaly layout (train/pos, train/neg_mixed, train/neg, test/pos, test/neg) "
                    "from NIfTI volumes, the Kaggle Alzheimer MRI dataset, or an ADNI-style split CSV.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{nifti,bids,preprocess,kaggle,csv}")

    nifti = sub.add_parser("nifti", help="3D NIfTI volumes + split CSV -> axial PNG slices",
                           description="3D NIfTI volumes + split CSV -> axial PNG slices <pid>__NNN.png "
                                       "(RAS-reoriented, anterior up, radiological left/right).")
    nifti.add_argument("--volumes", required=True, help="folder of .nii / .nii.gz volumes")
    nifti.add_argument("--split", required=True,
                       help="CSV with a 'file' or 'patient_id' column and a 'folder' column (pos, neg_mixed, neg, "
                            "test_pos, test_neg, or train/pos, ..., test/neg)")
    nifti.add_argument("--masks", default=None,
                       help="folder of brain masks with the same file names as the volumes; used for intensity "
                            "percentiles and slice choice, and voxels outside the mask are set to 0 "
                            "(default: threshold at 10%% of the robust intensity range, nothing zeroed)")

    bids = sub.add_parser("bids", help="BIDS dataset + rules over participants.tsv -> axial PNG slices",
                          description="A BIDS dataset (sub-*/[ses-*/]anat/*_T1w.nii[.gz], participants.tsv) -> the "
                                      "layout, one folder per patient, by rules over participants.tsv columns "
                                      "(pandas query expressions). Writes OUT/split.csv: who went where.")
    bids.add_argument("--root", required=True, help="the BIDS dataset's top folder")
    bids.add_argument("--healthy", required=True,
                      help="rule selecting the known-healthy set (train/neg), e.g. \"group == 'CN' and cohort == 'ref'\"")
    bids.add_argument("--mixed", required=True,
                      help="rule selecting the unannotated mixed set (train/pos + train/neg_mixed)")
    bids.add_argument("--test", default=None, help="rule selecting the labelled test set (test/pos + test/neg)")
    bids.add_argument("--diseased", required=True,
                      help="rule giving the label inside the mixed and test sets, e.g. \"group == 'AD'\" (used "
                           "to evaluate only; a known-healthy subject matching it is an error)")
    bids.add_argument("--session", default=None,
                      help="session label to use for every subject (default: the first session, reported)")
    bids.add_argument("--run", default=None, help="run number to use (default: the first run, reported)")

    preprocess = sub.add_parser("preprocess", help="one raw T1 scan: N4, registration to MNI152, brain mask",
                                description="N4 bias-field correction, registration to the MNI152 2009a template "
                                            "shipped with nilearn, and the template's brain mask carried back onto "
                                            "the scan (antspyx). Writes the prepared scan on the template grid, "
                                            "the brain mask on the scan's own grid and the transform into --out.")
    preprocess.add_argument("scan", help="a 3D T1 .nii/.nii.gz scan")
    preprocess.add_argument("--out", required=True, help="output folder")

    for command in (nifti, bids):
        choice = command.add_mutually_exclusive_group()
        choice.add_argument("--min_brain_fraction", type=float, default=0.3,
                            help="keep axial slices whose brain area is at least this fraction of the largest "
                                 "slice's brain area (default 0.3)")
        choice.add_argument("--slices", default=None,
                            help="keep this half-open range START:STOP of axial indices instead "
                                 "(0 = most inferior slice of the RAS-reoriented volume), e.g. 40:80")
        command.add_argument("--image_size", type=int, default=192,
                             help="side of the square PNG slices in pixels (default 192)")
        command.add_argument("--preprocess", action="store_true",
                             help="first N4, registration to the MNI152 template and brain extraction (antspyx); "
                                  "slices are then taken on the template grid, and OUT/preprocessed/ keeps each "
                                  "scan's brain mask (on its own grid) and transform")
    for command in (nifti, bids, preprocess):
        command.add_argument("--registration", choices=("affine", "syn"), default="affine",
                             help="with preprocessing: affine (default) or syn (affine + deformable, slower)")
        command.add_argument("--template_resolution", type=int, default=1, choices=(1, 2, 3),
                             help="with preprocessing: voxel size in mm of the template grid (default 1)")

    kaggle = sub.add_parser("kaggle", help="Kaggle 'Best Alzheimer MRI dataset' -> layout",
                            description="Kaggle 'Best Alzheimer MRI dataset' (Combined Dataset/{train,test}/"
                                        "<class>/*.jpg) -> layout of grayscale PNGs, one patient per image.")
    kaggle.add_argument("--src", required=True, help="the dataset's 'Combined Dataset' folder (holds train/ and test/)")
    kaggle.add_argument("--mixed_disease_share", type=float, default=0.4,
                        help="share of impaired images in the unannotated mixed set train/pos + train/neg_mixed "
                             "(default 0.4; capped at what exists)")
    kaggle.add_argument("--neg_share", type=float, default=0.5,
                        help="share of the training 'No Impairment' images that go to the known-healthy set "
                             "train/neg; the rest go to train/neg_mixed (default 0.5)")
    kaggle.add_argument("--seed", type=int, default=0, help="random seed of the splits (default 0)")

    from_csv = sub.add_parser("csv", help="ADNI-style split CSV over already-sliced PNGs -> layout",
                              description="Split CSV (patient_id, class, split) + <pid>__NNN.png slices found "
                                          "recursively under --src -> layout.")
    from_csv.add_argument("--split", required=True, help="CSV with columns patient_id, class and split "
                                                         "(like the reference's data/AD_DS1.csv)")
    from_csv.add_argument("--src", required=True, help="folder searched recursively for <patient_id>__NNN.png slices")
    from_csv.add_argument("--class_map", default=None,
                          help="comma-separated CLASS[:SPLIT]=FOLDER entries merged over the default "
                               "AD_Mixed=train/pos,NL_Mixed=train/neg_mixed,NL:train=train/neg,AD:test=test/pos,"
                               "NL:test=test/neg; FOLDER 'skip' leaves those rows out")
    from_csv.add_argument("--link", action="store_true",
                          help="hard-link the slices instead of copying them (same file system only)")

    for command in (nifti, bids, kaggle, from_csv):
        command.add_argument("--out", required=True, help="output dataset folder, e.g. data/NAME")
        command.add_argument("--overwrite", action="store_true",
                             help="allow a non-empty --out: its five layout folders and prepare.json, split.csv and "
                                  "preprocessed/ are replaced, other files kept")
    return parser


def run(argv=None):
    args = build_parser().parse_args(argv)
    if args.command in ("nifti", "bids", "preprocess"):
        import preprocessing
        settings = preprocessing.PreprocessSettings(args.registration, args.template_resolution)
        preprocess = settings if args.command == "preprocess" or args.preprocess else None
        if preprocess is not None:
            preprocessing.require_ants()
    if args.command == "nifti":
        prepare_nifti(args.volumes, args.split, args.out, args.masks, args.min_brain_fraction, args.slices,
                      args.image_size, args.overwrite, preprocess)
    elif args.command == "bids":
        rules = {"healthy": args.healthy, "mixed": args.mixed, **({"test": args.test} if args.test else {})}
        prepare_bids(args.root, args.out, rules, args.diseased, args.session, args.run, args.min_brain_fraction,
                     args.slices, args.image_size, args.overwrite, preprocess)
    elif args.command == "preprocess":
        preprocess_one(args.scan, args.out, preprocess)
    elif args.command == "kaggle":
        prepare_kaggle(args.src, args.out, args.mixed_disease_share, args.neg_share, args.seed, args.overwrite)
    else:
        prepare_csv(args.split, args.src, args.out, args.class_map, args.link, args.overwrite)
    return 0


def main(argv=None):
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
