"""The preparation command line (python prepare_data.py nifti | bids | preprocess | kaggle | csv): NIfTI volumes and
BIDS trees become the slice layout the trainer reads."""
import argparse
import csv
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from tqdm import tqdm

from brainomaly.data import preparation_record
from brainomaly.data.dataset_layout import slice_filename
from brainomaly.data.layout_staging import (
    FOLDER_ALIASES,
    PREPROCESSED,
    Staging,
    count_layout,
    print_counts,
    read_csv_rows,
)
from brainomaly.data.nifti_volumes import (
    NIFTI_EXTENSIONS,
    check_slicing,
    load_volume,
    prepare_volume,
    slice_text,
    strip_nifti_extension,
)
from brainomaly.data.slice_files import save_slice_png
from brainomaly.data.slice_importers import prepare_csv, prepare_kaggle
from brainomaly.errors import UserError, run_cli


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


def prepare_scan(path, pid, mask_path, preprocess, work_dir, min_brain_fraction, slice_range, image_size):
    """(PreparedVolume, PreprocessedScan or None) of one scan: preprocessed into work_dir first when asked, then
    sliced; the one preparation path of `nifti`, `bids` and score mode."""
    if preprocess is None:
        return prepare_volume(path, mask_path, min_brain_fraction, slice_range, image_size), None
    from brainomaly.data import preprocessing
    load_volume(path)  # the same checks and messages for a broken file as without preprocessing
    scan = preprocessing.preprocess_scan(path, work_dir, pid, preprocess)
    return prepare_volume(scan.template_space, scan.template_mask, min_brain_fraction, slice_range, image_size), scan


def write_volume_layout(entries, out, *, overwrite, sources, record, mask_paths=None, preprocess=None,
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


def prepare_nifti(volumes, split, out, *, masks=None, min_brain_fraction=0.3, slices=None, image_size=192,
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
    return write_volume_layout(entries, out, overwrite=overwrite, sources=[volumes] + ([masks] if masks else []),
                               record=record, mask_paths=mask_paths, preprocess=preprocess,
                               min_brain_fraction=min_brain_fraction, slice_range=slice_range, image_size=image_size)


def prepare_bids(root, out, rules, diseased, *, session=None, run=None, min_brain_fraction=0.3, slices=None,
                 image_size=192, overwrite=False, preprocess=None):
    """A BIDS dataset -> the layout, by rules over participants.tsv (bids_layout.py); writes split.csv too."""
    from brainomaly.data import bids_layout
    slice_range = check_slicing(min_brain_fraction, slices, image_size)
    selections = bids_layout.select_scans(root, rules, diseased, session, run)
    for selection in selections:
        if selection.note:
            print(f"note: {selection.note}")
    record = preparation_record.make_record("bids", min_brain_fraction, slice_text(slice_range), image_size, None,
                                            preprocess)
    entries = [(s.participant, s.scan, s.folder) for s in selections]
    return write_volume_layout(entries, out, overwrite=overwrite, sources=[root], record=record, preprocess=preprocess,
                               min_brain_fraction=min_brain_fraction, slice_range=slice_range, image_size=image_size,
                               split_rows=bids_layout.split_rows(selections, root))


def kept_templates(out_dir, stem, scan, preprocess):
    """The template files out_dir already holds on this --template_resolution's grid (kept as they are); refuses,
    before any work, outputs that would replace an earlier scan's (same file name) or another grid's template."""
    import nibabel as nib

    from brainomaly.data import preprocessing
    ours = [os.path.join(out_dir, preprocessing.output_name(stem, what))
            for what in ("template_space", "brain_mask", "affine", "warp", "inverse_warp")]
    existing = [path for path in ours if os.path.lexists(path)]
    if existing:
        raise UserError(f"{out_dir} already holds the outputs of a scan named {stem} (e.g. {existing[0]}); "
                        f"preprocessing {scan} there would replace them. Nothing was written.\nFix: pass another "
                        f"--out for this scan, or rename the file (its name without .nii/.nii.gz names the outputs).")
    template = preprocessing.template_images(preprocess.template_resolution)[0]
    kept = []
    for name in ("template_T1w.nii.gz", "template_brain_mask.nii.gz"):
        path = os.path.join(out_dir, name)
        if not os.path.lexists(path):
            continue
        try:
            there = nib.load(path)
            same = there.shape == template.shape and np.allclose(there.affine, template.affine, atol=1e-3)
        except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError):  # broken: no template
            same = False
        if not same:
            raise UserError(f"{path} is not the {preprocessing.TEMPLATE} template at --template_resolution "
                            f"{preprocess.template_resolution} (the scans in {out_dir} were preprocessed at another "
                            f"resolution, on that grid). Nothing was written.\nFix: pass another --out, or the "
                            f"--template_resolution the scans there were preprocessed with.")
        kept.append(name)
    return kept


def preprocess_one(scan, out_dir, preprocess):
    """The single-scan command: N4, registration and brain mask of SCAN into out_dir; nothing is sliced, and nothing
    already in out_dir is replaced."""
    from brainomaly.data import preprocessing
    if not os.path.isfile(scan):
        raise UserError(f"scan {scan} does not exist.\nFix: check the path of the .nii/.nii.gz file.")
    load_volume(scan)
    stem = strip_nifti_extension(os.path.basename(scan))
    kept = kept_templates(out_dir, stem, scan, preprocess)
    started = time.monotonic()
    staging = tempfile.mkdtemp(prefix=".preprocess-", dir=os.path.dirname(os.path.abspath(out_dir)) or ".")
    try:
        result = preprocessing.preprocess_scan(scan, staging, stem, preprocess)
        os.makedirs(out_dir, exist_ok=True)
        for name in sorted(set(os.listdir(staging)) - set(kept)):
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"preprocessed {scan} in {time.monotonic() - started:.1f} s ({preprocess.registration} registration to "
          f"{preprocessing.TEMPLATE}; {result.coverage:.0%} of the template brain in the field of view):\n"
          f"  {os.path.join(out_dir, preprocessing.output_name(stem, 'template_space'))}\n"
          f"  {os.path.join(out_dir, preprocessing.output_name(stem, 'brain_mask'))}  (on the scan's own grid)")


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
                                        "<class>/*.jpg) -> layout of grayscale PNGs, one patient per image unless "
                                        "--subjects says which images belong to one subject (the images carry no "
                                        "subject ids: without it one subject's slices can be in training, the "
                                        "held-out known-healthy set and test at once).")
    kaggle.add_argument("--src", required=True, help="the dataset's 'Combined Dataset' folder (holds train/ and test/)")
    kaggle.add_argument("--mixed_disease_share", type=float, default=0.4,
                        help="share of impaired images in the unannotated mixed set train/pos + train/neg_mixed "
                             "(default 0.4; capped at what exists)")
    kaggle.add_argument("--neg_share", type=float, default=0.5,
                        help="share of the training 'No Impairment' images that go to the known-healthy set "
                             "train/neg; the rest go to train/neg_mixed (default 0.5)")
    kaggle.add_argument("--seed", type=int, default=0, help="random seed of the splits (default 0)")
    kaggle.add_argument("--subjects", default=None,
                        help="CSV with columns image (its path under --src, e.g. 'train/Mild Impairment/x.jpg', or "
                             "its file name where unique) and subject, one row per image: each subject becomes one "
                             "patient <subject>__NNN.png in one folder (in the test set when any of its images is "
                             "a test image); the shares then count subjects")

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
        from brainomaly.data import preprocessing
        settings = preprocessing.PreprocessSettings(args.registration, args.template_resolution)
        preprocess = settings if args.command == "preprocess" or args.preprocess else None
        if preprocess is not None:
            preprocessing.require_ants()
    if args.command == "nifti":
        prepare_nifti(args.volumes, args.split, args.out, masks=args.masks, min_brain_fraction=args.min_brain_fraction,
                      slices=args.slices, image_size=args.image_size, overwrite=args.overwrite, preprocess=preprocess)
    elif args.command == "bids":
        rules = {"healthy": args.healthy, "mixed": args.mixed, **({"test": args.test} if args.test else {})}
        prepare_bids(args.root, args.out, rules, args.diseased, session=args.session, run=args.run,
                     min_brain_fraction=args.min_brain_fraction, slices=args.slices, image_size=args.image_size,
                     overwrite=args.overwrite, preprocess=preprocess)
    elif args.command == "preprocess":
        preprocess_one(args.scan, args.out, preprocess)
    elif args.command == "kaggle":
        prepare_kaggle(args.src, args.out, args.mixed_disease_share, args.neg_share, args.seed, args.overwrite,
                       subjects=args.subjects)
    else:
        prepare_csv(args.split, args.src, args.out, args.class_map, args.link, args.overwrite)
    return 0


def main(argv=None):
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
