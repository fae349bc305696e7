"""Score whole NIfTI scans: each volume is prepared exactly as the run's training data were (prepare.json, see
preparation_record.py: slicing as `prepare_data.py nifti`, after N4, registration and brain extraction when the
training data had them), scored slice by slice, and its anomaly map is written back onto the scan's own voxel grid
(`<pid>_anomaly.nii.gz`, through the inverse registration when there was one) with an overlay montage
(`<pid>_anomaly.png`) and, when preprocessed, the brain mask on the scan's grid (`<pid>_brain_mask.nii.gz`).

The model is a callable, so nothing here knows about networks:
    anomaly_maps(batch, names) -> (N, S, S) maps, batch (N, 1, S, S) in [-1, 1] on the CPU, names the slice file
    names `<pid>__NNN.png` prepare_data would write (scoring.anomaly_maps seeds its refiner noise per slice from
    them, so a slice scores the same from a volume as from its prepared PNG).

Rule for bad volumes: a single file that cannot be scored stops with a UserError (exit 2). In a folder, such
volumes are skipped with one warning each and the others are scored; exit 0 when at least one was scored.
"""
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from brainomaly import metrics, visualize
from brainomaly.data import nifti_volumes, prepare_command
from brainomaly.data.dataset_layout import is_image_file, slice_filename
from brainomaly.data.preparation_record import ScoringPreparation, for_scoring
from brainomaly.data.slice_files import BORDER_PAD, preprocess, to_8bit
from brainomaly.errors import UserError
from brainomaly.run.run_layout import refuse_existing_outputs, write_csv

MONTAGE_LEVELS = 6       # axial levels in the overlay picture
OVERLAY_PERCENTILE = 95  # the overlay shows map values above this percentile of the scored brain voxels


def is_volume_file(name):
    return name.lower().endswith(nifti_volumes.NIFTI_EXTENSIONS) and not os.path.basename(name).startswith(".")


def find_volumes(path):
    """The NIfTI volumes PATH names (a .nii/.nii.gz file, or a folder holding them at any depth), or [] when
    PATH is a folder of PNG/JPG slices (today's score mode)."""
    if os.path.isfile(path):
        return [path] if is_volume_file(path) else []
    if not os.path.isdir(path):
        if is_volume_file(path):
            raise UserError(f"volume {path} does not exist.\nFix: check the path of the .nii/.nii.gz file to score.")
        return []
    volumes, slices = [], []
    for folder, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        volumes += [os.path.join(folder, n) for n in sorted(names) if is_volume_file(n)]
        slices += [os.path.join(folder, n) for n in sorted(names) if is_image_file(n)]
    if volumes and slices:
        raise UserError(f"{path} holds both NIfTI volumes (e.g. {volumes[0]}) and PNG/JPG slices (e.g. {slices[0]}).\n"
                        f"Fix: put the volumes and the slices in separate folders and score each folder.")
    return volumes


def input_tag(path):
    """Name of an input in output names: the folder name, or a file's name without .nii/.nii.gz."""
    return nifti_volumes.strip_nifti_extension(os.path.basename(os.path.normpath(path)))


def volume_pid(path):
    return nifti_volumes.strip_nifti_extension(os.path.basename(path))


def require_csv_name(output):
    """--output must end in .csv: NIfTI input writes its maps into the folder named like it without .csv, which
    would otherwise be the CSV's own path."""
    if output is not None and not output.lower().endswith(".csv"):
        stem = nifti_volumes.strip_nifti_extension(output.rstrip("/" + os.sep)) or "scores"
        raise UserError(f"--output {output} does not end in .csv; score mode writes its CSV there and, for NIfTI "
                        f"scans, the anomaly maps into the folder named like it without .csv.\nFix: name a .csv "
                        f"file, e.g. --output {os.path.splitext(stem)[0]}.csv.")


def output_paths(folder, pid, preprocessed=False):
    """The anomaly NIfTI, its overlay PNG and, for a preprocessed scan, its brain mask on the scan's grid."""
    paths = (os.path.join(folder, f"{pid}_anomaly.nii.gz"), os.path.join(folder, f"{pid}_anomaly.png"))
    return paths + ((os.path.join(folder, f"{pid}_brain_mask.nii.gz"),) if preprocessed else ())


def slice_batch(prepared, image_size):
    """(N, 1, S, S) tensor in [-1, 1] of a prepared volume: its PNG pixels (at the size prepare_data wrote them)
    through the one slice loader, which pads, crops and resizes them to image_size as it did the training slices."""
    return torch.stack([preprocess(to_8bit(image).astype(np.float32) / 255.0, image_size)
                        for image in prepared.slices])


def uncrop_map(anomaly_map, side):
    """Undo slice_files.preprocess on an (S, S) map of a square side x side slice: S -> side + 2 pad, drop the pad."""
    grown = F.interpolate(torch.as_tensor(anomaly_map, dtype=torch.float32)[None, None],
                          size=(side + 2 * BORDER_PAD,) * 2, mode="bilinear", align_corners=False)
    return grown[0, 0, BORDER_PAD:-BORDER_PAD, BORDER_PAD:-BORDER_PAD].numpy()


def canonical_map(prepared, maps):
    """The (N, S, S) slice maps put back into the RAS volume: zero outside the scored slices."""
    volume = np.zeros(prepared.normalised.shape, dtype=np.float32)
    display_shape = prepared.normalised.shape[:2][::-1]  # axial_to_image: rows along y, columns along x
    side = prepared.slices[0].shape[0]
    for k, anomaly_map in zip(prepared.indices, maps):
        image = nifti_volumes.unsquare(uncrop_map(anomaly_map, side), display_shape, prepared.pixel_size)
        volume[:, :, k] = nifti_volumes.image_to_axial(np.clip(image, 0.0, None))
    return volume


def to_input_grid(prepared, canonical):
    """A RAS-ordered array (what as_closest_canonical made) back in the stored volume's axis order."""
    import nibabel as nib
    stored = nib.orientations.io_orientation(prepared.image.affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), stored)
    return np.ascontiguousarray(nib.orientations.apply_orientation(canonical, back), dtype=np.float32)


def anomaly_image(source, volume):
    """A float32 NIfTI of `volume` (the grid of the nibabel image source) with source's header, affine, qform and
    sform."""
    import nibabel as nib
    image_class = type(source) if isinstance(source, nib.Nifti1Image) else nib.Nifti1Image
    header = source.header.copy() if isinstance(source, nib.Nifti1Image) else None
    image = image_class(volume, source.affine, header=header)
    image.set_data_dtype(np.float32)
    image.header.set_slope_inter(1.0, 0.0)
    if header is not None:
        image.set_qform(source.get_qform(), code=int(source.header["qform_code"]))
        image.set_sform(source.get_sform(), code=int(source.header["sform_code"]))
    image.header["cal_min"], image.header["cal_max"] = 0.0, float(volume.max())
    image.header["descrip"] = b"Brainomaly-Diff anomaly map |x - x_r| / 2"
    return image


def score_volume(prepared, anomaly_maps, image_size, batch_size, score_region="head"):
    """(slice scores (N,), slice maps (N, S, S), S = image_size) of a prepared volume; slice score = its map's mean
    over score_region (metrics.slice_scores), as a slice PNG scores."""
    batch = slice_batch(prepared, image_size)
    pid = volume_pid(prepared.path)
    names = [slice_filename(pid, k) for k in prepared.indices]
    maps = []
    with torch.inference_mode():
        for start in range(0, len(batch), batch_size):
            chunk = anomaly_maps(batch[start:start + batch_size], names[start:start + batch_size])
            maps.append(torch.as_tensor(chunk).detach().float().cpu().numpy())
    maps = np.concatenate(maps)
    if maps.shape != (len(batch),) + tuple(batch.shape[-2:]):
        raise ValueError(f"anomaly_maps returned shape {maps.shape} for a batch of shape {tuple(batch.shape)}")
    return metrics.slice_scores(batch.mean(dim=1).numpy(), maps, score_region), maps


def save_overlay(prepared, canonical, path, title):
    """Montage of the map over the scan at MONTAGE_LEVELS axial levels of the scored slices."""
    scored = canonical[:, :, prepared.indices]
    positive = scored[scored > 0]
    threshold = float(np.percentile(positive, OVERLAY_PERCENTILE)) if positive.size else 0.0
    picks = np.unique(np.linspace(0, len(prepared.indices) - 1, min(MONTAGE_LEVELS, len(prepared.indices)))
                      .round().astype(int))
    levels = [prepared.indices[i] for i in picks]
    panels = [(f"axial {k}", nifti_volumes.axial_to_image(prepared.normalised[:, :, k]),
               nifti_volumes.axial_to_image(canonical[:, :, k])) for k in levels]
    aspect = prepared.pixel_size[0] / prepared.pixel_size[1]
    visualize.save_overlay_montage(panels, path, f"{title}\naxial slices of the RAS volume, anterior up, patient's "
                                   f"right on the left", threshold, aspect, label="anomaly |x - x_r| / 2")


def prepare_for_scoring(path, pid, preparation, work_dir, image_size):
    """(PreparedVolume, PreprocessedScan or None) of one scan, as preparation says: its slices at the size the
    training slices were written at (preparation.slice_size; image_size when that is None)."""
    fraction, slice_range = preparation.min_brain_fraction, preparation.slice_range
    image_size = preparation.slice_size or image_size
    if preparation.preprocess is None or preparation.repeat_preprocessing:
        return prepare_command.prepare_scan(path, pid, None, preparation.preprocess, work_dir, fraction, slice_range,
                                         image_size)
    import nibabel as nib

    from brainomaly.data import preprocessing
    template_path, template_mask = preprocessing.write_template(work_dir, preparation.preprocess.template_resolution)
    nifti_volumes.load_volume(path)
    scan, template = nib.load(path), nib.load(template_path)
    if scan.shape[:3] != template.shape or not np.allclose(scan.affine, template.affine, atol=1e-3):
        raise UserError(f"scan {path} is not on the {preprocessing.TEMPLATE} template grid the training data were "
                        f"sliced on (shape {scan.shape[:3]}, template {template.shape}); --prepared expects the "
                        f"*_space-{preprocessing.TEMPLATE}_T1w.nii.gz that prepare_data.py preprocess writes.\n"
                        f"Fix: drop --prepared so the scan is prepared as the training data were.")
    return nifti_volumes.prepare_volume(path, template_mask, fraction, slice_range, image_size), None


def score_volumes(volumes, anomaly_maps, image_size, csv_path, threshold, batch_size=16,
                  preparation=ScoringPreparation(), score_region="head"):
    """Score NIfTI volumes; write each scan's anomaly NIfTI and overlay PNG into the folder named like csv_path
    without .csv. Returns (CSV rows pid, n_slices, score, flagged; [(skipped path, reason)]); the caller writes
    the rows to csv_path (refused up front, like the maps, when it exists)."""
    require_csv_name(csv_path)
    volume_dir = os.path.splitext(csv_path)[0]
    pids = [volume_pid(p) for p in volumes]
    seen = {}
    for path, pid in zip(volumes, pids):
        if pid in seen:
            raise UserError(f"two volumes would share the patient id {pid}: {seen[pid]} and {path}.\n"
                            f"Fix: rename one of them, or score their folders separately.")
        seen[pid] = path
    preprocessed = preparation.repeat_preprocessing
    refuse_existing_outputs([csv_path] + [p for pid in pids for p in output_paths(volume_dir, pid, preprocessed)])
    rows, skipped = [], []
    bar = tqdm(list(zip(volumes, pids)), desc="scoring scans", unit="scan", file=sys.stderr, disable=None)
    for number, (path, pid) in enumerate(bar, start=1):
        bar.set_postfix_str(pid)
        with tempfile.TemporaryDirectory(prefix=".brainomaly-prepare-") as work_dir:
            try:
                prepared, scan = prepare_for_scoring(path, pid, preparation, work_dir, image_size)
            except UserError as err:
                if len(volumes) == 1:
                    raise
                skipped.append((path, str(err).splitlines()[0]))
                tqdm.write(f"warning: skipped {path}: {skipped[-1][1]}", file=sys.stderr)
                continue
            slice_scores, maps = score_volume(prepared, anomaly_maps, image_size, batch_size, score_region)
            patient = metrics.aggregate_patients([pid] * len(slice_scores), slice_scores)
            score = float(patient["score"][0])
            canonical = canonical_map(prepared, maps)
            outputs = output_paths(volume_dir, pid, preprocessed)
            os.makedirs(volume_dir, exist_ok=True)
            on_grid, source = to_input_grid(prepared, canonical), prepared.image
            if scan is not None:  # the map was made on the template grid: back through the inverse registration
                import nibabel as nib

                from brainomaly.data import preprocessing
                on_grid, source = preprocessing.to_scan_grid(on_grid, scan, path), nib.load(path)
                shutil.copyfile(scan.brain_mask, outputs[2])
            anomaly_image(source, on_grid).to_filename(outputs[0])
            flagged = int(score > threshold)
            save_overlay(prepared, canonical, outputs[1], f"{pid}: score {score:.4f} "
                         f"({'flagged' if flagged else 'not flagged'}, threshold {threshold:.4f})")
        rows.append({"pid": pid, "n_slices": len(slice_scores), "score": f"{score:.9g}", "flagged": flagged})
        tqdm.write(f"[{number}/{len(volumes)}] {pid}: {len(slice_scores)} slices, score {score:.6f} -> {outputs[0]}",
                   file=sys.stdout)
    if not rows:
        raise UserError(f"none of the {len(volumes)} volumes could be scored:\n  "
                        + "\n  ".join(f"{p}: {why}" for p, why in skipped)
                        + "\nFix: replace them with 3D T1 .nii/.nii.gz volumes.")
    return rows, skipped


def scoring_preparation(config):
    """The ScoringPreparation score mode uses: the run's prepare.json, --prepared, --prepared_size,
    --min_brain_fraction, --slices."""
    return for_scoring(config.model_save_dir, config.prepared, config.min_brain_fraction, config.slices,
                       config.prepared_size)


def score_volumes_command(volumes, anomaly_maps, config, threshold, csv_path, model_name, preparation):
    """Score mode on NIfTI input: prepare as preparation says, score, write the CSV (run_layout.write_csv), print a
    summary (scans scored, refused with their reasons, time)."""
    started = time.monotonic()
    side = preparation.slice_size or config.image_size
    print(f"Preparing each scan {preparation.description}; slices made at {side} px and read at "
          f"{config.image_size} px, as the training slices were.")
    rows, skipped = score_volumes(volumes, anomaly_maps, config.image_size, csv_path, threshold,
                                  config.score_batch_size, preparation, config.score_region)
    write_csv(rows, csv_path)
    flagged = sum(row["flagged"] for row in rows)
    seconds = time.monotonic() - started
    print(f"Scored {len(rows)} of {len(volumes)} volumes from {config.image_dir} with {model_name} in {seconds:.1f} s "
          f"({seconds / len(volumes):.1f} s per scan).\n"
          f"Flagged {flagged} above the {config.flag_percentile:g}th percentile of known-healthy patient scores "
          f"({threshold:.6f}).\nWrote {csv_path} and the anomaly maps (.nii.gz on each input's grid, overlay .png) "
          f"in {os.path.splitext(csv_path)[0]}")
    if skipped:
        print(f"Refused {len(skipped)} volume(s) that could not be prepared:\n  "
              + "\n  ".join(f"{path}: {why}" for path, why in skipped), file=sys.stderr)
    return rows
