"""Synthetic Alzheimer-like cohort built from the MNI152 T1 template that ships inside the nilearn wheel.

Every subject is the template seen through its own anatomy (rotation, scale, shift, smooth elastic warp,
ventricle size, sulcal width, medial-temporal CSF) and its own scanner (contrast, gamma, bias field, Rician
noise, slice positions). A diseased subject is the same subject with Alzheimer-like atrophy added before
slicing: tissue becomes CSF around the ventricles, in the medial temporal lobes and along the cortex, with a
temporo-parietal emphasis. Its ground-truth mask marks exactly the pixels whose tissue changed because of the
disease, so it differs from its healthy counterpart (same seed, severity 0) only inside that mask.

Usage: python make_cohort.py data/Demo [--overwrite] [flags, see --help]
"""
import argparse
import csv
import functools
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from brainomaly.data.dataset_layout import slice_filename
from brainomaly.data.slice_files import save_slice_png
from brainomaly.errors import UserError, run_cli

FOLDERS = ("train/pos", "train/neg_mixed", "train/neg", "test/pos", "test/neg")
WRITTEN = ("train", "test", "masks", "brain_masks", "nifti", "manifest.csv", "baseline.json")  # what --overwrite replaces
MANIFEST_COLUMNS = ("path", "pid", "split", "folder", "label", "severity")

SLICE_BAND_MM = (-20.0, 22.0)  # axial MNI z band: hippocampi and temporal horns up to the ventricle bodies
FOV_MM = 215.0                 # square field of view around the brain centre
BRAIN_CENTRE_MM = (0.0, -18.0)  # MNI (x, y) of the brain's centre in an axial slice
RAMP_MM = 1.5                  # width of the partial-volume edge of every tissue change
MASK_CHANGE = 0.1              # tissue fraction that must change for a pixel to count as diseased

# Template intensities (max-normalised MNI152 T1) of the tissue a converted voxel becomes.
CSF_LEVEL, WM_LEVEL, LESION_LEVEL = 0.2, 0.82, 0.40

# Healthy anatomical variation (mm a CSF front advances beyond the template) and Alzheimer atrophy at severity 1.
HEALTHY_VENTRICLE_MM = (1.0, 1.6, -0.8, 4.5)  # normal mean, sd, clipped to low, high; < 0: smaller than template
HEALTHY_SULCAL_MM = (0.0, 3.0)     # uniform range
HEALTHY_TEMPORAL_MM = (0.0, 1.5)
ATROPHY_MM = {"ventricle": 2.5, "temporal": 6.5, "sulcal": 1.2}


@dataclass(frozen=True)
class ScannerModel:
    """The spread of scanner settings every subject draws its own from (the intensity model). The defaults make
    the demo cohort; others give a cohort whose intensities a method tuned on the demo has not seen."""
    csf_signal: float = 0.10          # mean CSF intensity of the T1 contrast curve (white matter is about 0.86)
    gamma_sd: float = 0.12            # sd of log gamma
    noise: tuple = (0.01, 0.035)      # Rician noise sigma range
    bias: float = 0.12                # amplitude of the smooth log bias field


# Template fields the anatomy and disease models read, sampled together at every output pixel.
FIELDS = (
    "t1",        # T1 intensity, max 1
    "brain",     # brain mask with the ventricles filled in
    "ventricle", # signed mm from the ventricle wall, negative inside
    "sulcal",    # mm from extra-ventricular CSF or the brain surface
    "any_csf",   # mm from any CSF or the brain surface
    "cortex",    # soft mask of cortical grey matter (deep grey nuclei excluded)
)


@dataclass(frozen=True)
class Template:
    """The 2 mm MNI152 template: voxel-to-mm affine, FIELDS stacked as (X, Y, Z, len(FIELDS)), lesion sites."""
    affine: np.ndarray
    stack: np.ndarray
    lesion_sites: np.ndarray  # (n, 3) mm coordinates of deep white-matter voxels in the slice band


def voxel_mm(affine, shape):
    """MNI mm coordinates of every voxel, shape (3, X, Y, Z)."""
    index = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ index + affine[:3, 3:]).reshape((3,) + tuple(shape))


@functools.lru_cache(maxsize=1)
def load_template():
    """Read the template from the nilearn wheel (no download) and derive the anatomy fields once."""
    from nilearn import datasets  # imported here: it takes seconds and only the generator needs it
    t1_img = datasets.load_mni152_template(resolution=2)
    t1 = t1_img.get_fdata().astype(np.float32)
    gm = datasets.load_mni152_gm_template(resolution=2).get_fdata().astype(np.float32)
    wm = datasets.load_mni152_wm_template(resolution=2).get_fdata().astype(np.float32)
    affine = t1_img.affine
    voxel = float(abs(affine[0, 0]))
    brain = ndi.binary_fill_holes(t1 > 0.2)  # load_mni152_brain_mask's threshold, ventricles filled
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    x, y, z = voxel_mm(affine, t1.shape)
    central = (np.abs(x) < 36) & (y > -55) & (y < 35) & (z > -30) & (z < 40)
    labels, n = ndi.label((csf > 0.45) & central)
    sizes = ndi.sum_labels(np.ones_like(labels), labels, np.arange(1, n + 1))
    ventricles = np.isin(labels, 1 + np.flatnonzero(sizes >= 25))  # drops small sulcal fragments
    outside_csf = ((csf > 0.4) & ~ventricles) | ~brain
    deep = ((x / 34) ** 2 + ((y + 8) / 34) ** 2 + ((z - 4) / 22) ** 2) < 1  # basal ganglia, thalami
    cortex = ndi.gaussian_filter(((gm > 0.25) & brain & ~deep).astype(np.float32), 1.0)
    band = (z >= SLICE_BAND_MM[0]) & (z <= SLICE_BAND_MM[1])
    from_ventricles = ndi.distance_transform_edt(~ventricles, sampling=voxel)
    sites = (wm > 0.95) & band & (from_ventricles > 6)
    fields = {
        "t1": t1, "brain": brain,
        "ventricle": from_ventricles - ndi.distance_transform_edt(ventricles, sampling=voxel),
        "sulcal": ndi.distance_transform_edt(~outside_csf, sampling=voxel),
        "any_csf": ndi.distance_transform_edt(~(outside_csf | ventricles), sampling=voxel),
        "cortex": cortex,
    }
    stack = np.stack([fields[name] for name in FIELDS], axis=-1).astype(np.float32)
    return Template(affine, stack, np.stack([x[sites], y[sites], z[sites]], axis=1))


def smooth_field(rng, grid, n_waves, wavelength_mm, amplitude):
    """A random smooth field on the subject grid (x (S,), y (S,), z (K,) in mm): a sum of random plane waves."""
    x, y, z = grid
    directions = rng.normal(size=(n_waves, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wave = directions * (2 * np.pi / rng.uniform(*wavelength_mm, size=(n_waves, 1)))
    phase = rng.uniform(0, 2 * np.pi, size=n_waves)
    weight = rng.normal(size=n_waves) * amplitude / np.sqrt(n_waves)
    field = np.zeros((len(z), len(y), len(x)), dtype=complex)
    for (kx, ky, kz), p, w in zip(wave, phase, weight):  # a plane wave on a grid is an outer product of 1D waves
        field += (w * np.exp(1j * (kz * z + p)))[:, None, None] * np.exp(1j * ky * y)[None, :, None] \
            * np.exp(1j * kx * x)[None, None, :]
    return field.real.ravel()


def sample(stack, voxels):
    """Trilinear samples of every field of stack (X, Y, Z, C) at voxel coordinates (3, N): (N, C).

    One gather pass serves all fields; beyond the edges it reads the border, where the template is zero.
    """
    shape = np.array(stack.shape[:3])
    voxels = np.clip(voxels, 0, (shape - 1.0001)[:, None])
    base = np.floor(voxels).astype(np.intp)
    frac = (voxels - base).astype(np.float32)
    flat = stack.reshape(-1, stack.shape[3])
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    origin = strides @ base
    out = np.zeros((voxels.shape[1], stack.shape[3]), dtype=np.float32)
    for corner in np.ndindex(2, 2, 2):
        weight = np.prod([f if c else 1 - f for f, c in zip(frac, corner)], axis=0)
        out += weight[:, None] * flat.take(origin + strides @ np.array(corner), axis=0)
    return out.astype(np.float64)


def rotation(angles_rad):
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def gaussian_blob(points, centre, sigma):
    offset = (points - np.asarray(centre, dtype=np.float64)[:, None]) / np.asarray(sigma)[:, None]
    return np.exp(-0.5 * (offset ** 2).sum(axis=0))


def grow(amount, distance):
    """Fraction of a point that is CSF (or lesion) when a front advances `amount` mm: 1 behind it, then a ramp."""
    return np.clip((amount - distance) / RAMP_MM + 0.5, 0.0, 1.0)


def tissue_changes(fields, anatomy, amounts, lesion_distances):
    """(fraction that is CSF, fraction of template ventricle filled with white matter, fraction that is lesion).

    amounts: mm the ventricle, medial-temporal and cortical CSF fronts advance (healthy variation + atrophy).
    """
    to_csf = np.maximum.reduce([
        grow(amounts["ventricle"], fields["ventricle"]),
        grow(amounts["sulcal"] * anatomy["sulcal_field"], fields["sulcal"]) * fields["cortex"],
        grow(amounts["temporal"] * anatomy["mtl"], fields["any_csf"]),
    ])
    to_wm = (1 - to_csf) * (fields["ventricle"] < 0)  # template ventricle not reached by the front: white matter
    to_lesion = np.zeros_like(to_csf)
    for distance, radius in lesion_distances:
        to_lesion = np.maximum(to_lesion, grow(radius, distance))
    return to_csf, to_wm, to_lesion


def subject_grid(geometry, image_size, n_slices):
    """Output pixel centres in subject space (mm): x across columns, y down rows (anterior at the top), z slices."""
    half = FOV_MM / 2 * (1 - 1 / image_size)
    across = np.linspace(-half, half, image_size)
    z = np.linspace(*SLICE_BAND_MM, n_slices) + geometry.normal(0, 2.5) + geometry.normal(0, 0.6, size=n_slices)
    return BRAIN_CENTRE_MM[0] + across, BRAIN_CENTRE_MM[1] - across, z


def template_points(geometry, grid):
    """One combined map subject -> template mm (rigid, scale, elastic) for every output pixel, (3, K*S*S)."""
    x, y, z = grid
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    subject = np.stack([xx.ravel(), yy.ravel(), zz.ravel()])
    centre = np.array([BRAIN_CENTRE_MM[0], BRAIN_CENTRE_MM[1], 0.0])[:, None]
    angles = np.deg2rad(geometry.normal(0, 3.0, size=3))
    scale = np.exp(geometry.normal(0, 0.05) + geometry.normal(0, 0.025, size=3))[:, None]
    shift = geometry.normal(0, [3.0, 3.0, 0.0])[:, None]
    points = rotation(angles).T @ (subject - centre - shift) / scale + centre
    return points + np.stack([smooth_field(geometry, grid, 4, (60, 140), 2.5) for _ in range(3)])


def render_subject(template, seed, severity, image_size=128, n_slices=8, lesions=False,
                   scanner_model=ScannerModel()):
    """K axial slices of one subject: dict of image (K,S,S) in [0,1], mask and brain (K,S,S) bool.

    severity 0 renders the healthy subject; severity > 0 the same subject with atrophy, changed only inside mask.
    Every random draw is made whatever the severity, so both share anatomy, scanner and noise exactly.
    """
    geometry, anatomy_rng, scanner, noise_rng, lesion_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5))
    grid = subject_grid(geometry, image_size, n_slices)
    points = template_points(geometry, grid)
    inverse = np.linalg.inv(template.affine)
    values = sample(template.stack, inverse[:3, :3] @ points + inverse[:3, 3:])
    fields = dict(zip(FIELDS, values.T))

    hippocampi = [gaussian_blob(points, (side * 28, -20, -14), (5, 12, 6)) for side in (-1, 1)]
    anatomy = {"mtl": np.maximum(*hippocampi),
               "sulcal_field": np.exp(smooth_field(anatomy_rng, grid, 6, (25, 60), 0.25))}
    healthy_mm = {"ventricle": np.clip(anatomy_rng.normal(*HEALTHY_VENTRICLE_MM[:2]), *HEALTHY_VENTRICLE_MM[2:]),
                  "sulcal": anatomy_rng.uniform(*HEALTHY_SULCAL_MM),
                  "temporal": anatomy_rng.uniform(*HEALTHY_TEMPORAL_MM)}
    # Alzheimer cortical atrophy is temporo-parietal first, frontal later, occipital spared.
    ad_pattern = 0.15 + 0.85 * np.maximum.reduce([
        gaussian_blob(points, (side * 50, -25, -5), (18, 30, 18)) for side in (-1, 1)]
        + [gaussian_blob(points, (0, -60, 35), (45, 22, 25))])
    atrophy_mm = {name: severity * mm * anatomy_rng.uniform(0.8, 1.2) for name, mm in ATROPHY_MM.items()}
    diseased_mm = {"ventricle": healthy_mm["ventricle"] + atrophy_mm["ventricle"],
                   "temporal": healthy_mm["temporal"] + atrophy_mm["temporal"],
                   "sulcal": healthy_mm["sulcal"] + atrophy_mm["sulcal"] * ad_pattern}
    sites = template.lesion_sites[lesion_rng.integers(len(template.lesion_sites), size=lesion_rng.integers(2, 7))]
    radii = lesion_rng.uniform(2.5, 5.0, size=len(sites))
    lesion_distances = [(np.linalg.norm(points - site[:, None], axis=0), radius)
                        for site, radius in zip(sites, radii)] if lesions and severity > 0 else []
    healthy = tissue_changes(fields, anatomy, healthy_mm, [])
    diseased = tissue_changes(fields, anatomy, diseased_mm, lesion_distances)
    # Changes below MASK_CHANGE are dropped, so the diseased image equals the healthy one outside the mask.
    changed = np.logical_or.reduce([np.abs(d - h) > MASK_CHANGE for d, h in zip(diseased, healthy)])
    diseased = [np.where(changed, d, h) for d, h in zip(diseased, healthy)]

    def tissue_t1(to_csf, to_wm, to_lesion):
        t1 = fields["t1"] + to_csf * (CSF_LEVEL - fields["t1"]) + to_wm * (WM_LEVEL - fields["t1"])
        return t1 + to_lesion * (LESION_LEVEL - t1)

    # Scanner: subject-specific T1 contrast curve, smooth bias field, gamma, Rician noise.
    contrast = (0.0, scanner.normal(scanner_model.csf_signal, 0.025), scanner.normal(0.52, 0.04),
                scanner.normal(0.86, 0.03))
    contrast += (contrast[-1] * 1.06,)
    gamma = np.exp(scanner.normal(0, scanner_model.gamma_sd))
    noise_sigma = scanner.uniform(*scanner_model.noise)
    bias = np.exp(smooth_field(scanner, grid, 3, (150, 300), scanner_model.bias))
    noise = noise_rng.standard_normal((2, values.shape[0])) * noise_sigma

    def scan(t1):
        return (np.clip(np.interp(t1, (0.0, 0.22, 0.65, 0.87, 1.0), contrast), 0, None) * bias) ** gamma

    in_brain = fields["brain"] >= 0.5
    reference = scan(tissue_t1(*healthy))
    scale = np.percentile(reference[in_brain], 99.5)  # from the healthy counterpart, so disease leaves it as is
    image = scan(tissue_t1(*diseased)) / scale
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude noise
    image = np.clip(image, 0, 1) * in_brain  # skull-stripped: black outside the brain mask
    shape = (n_slices, image_size, image_size)
    return {"image": image.reshape(shape), "mask": (changed & in_brain).reshape(shape),
            "brain": in_brain.reshape(shape)}


def subject_nifti(image, image_size):
    """A subject's slices (K, S, S), anterior up and MNI x across the columns, as a RAS NIfTI volume on the
    nominal grid of subject_grid (FOV_MM / S in-plane, the band's nominal slice spacing)."""
    import nibabel as nib
    n_slices = image.shape[0]
    pixel = FOV_MM / image_size
    spacing = (SLICE_BAND_MM[1] - SLICE_BAND_MM[0]) / max(1, n_slices - 1)
    volume = np.ascontiguousarray(image[:, ::-1, :].transpose(2, 1, 0), dtype=np.float32)  # (x, y, z), y up
    half = FOV_MM / 2 * (1 - 1 / image_size)
    affine = np.diag([pixel, pixel, spacing, 1.0])
    affine[:3, 3] = (BRAIN_CENTRE_MM[0] - half, BRAIN_CENTRE_MM[1] - half, SLICE_BAND_MM[0])
    nifti = nib.Nifti1Image(volume, affine)
    nifti.set_qform(affine, code=1)  # scanner coordinates, as a converter writes them
    nifti.set_sform(affine, code=4)  # MNI-aligned
    return nifti


def cohort_plan(mixed, disease_share, healthy, test_pos, test_neg, seed):
    """[(folder, label, subject number)] with subject numbers shuffled, so a pid does not give its folder away."""
    n_pos = int(round(mixed * disease_share))
    counts = {"train/pos": n_pos, "train/neg_mixed": mixed - n_pos, "train/neg": healthy,
              "test/pos": test_pos, "test/neg": test_neg}
    total = sum(counts.values())
    numbers = np.random.default_rng([seed, 0]).permutation(total) + 1
    plan, start = [], 0
    for folder in FOLDERS:
        label = int(folder.endswith("pos"))
        plan += [(folder, label, int(n)) for n in sorted(numbers[start:start + counts[folder]])]
        start += counts[folder]
    return plan


def check_output(out_dir, overwrite):
    """Refuse a non-empty output folder unless overwrite; with it, remove only what a cohort run writes."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise UserError(f"output folder {out_dir} is not empty.\nFix: pass --overwrite to replace the cohort "
                            f"there ({', '.join(WRITTEN)}), or choose an empty or new folder.")
        for name in WRITTEN:
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    elif os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"output path {out_dir} is a file.\nFix: choose a folder path.")


def make_cohort(out_dir, *, mixed=80, disease_share=0.4, healthy=80, test_pos=40, test_neg=40, image_size=128,
                n_slices=8, severity=(0.4, 1.0), seed=0, lesions=False, overwrite=False, progress=True, nifti=False,
                scanner_model=ScannerModel()):
    """Write the cohort under out_dir and return the manifest rows (dicts with MANIFEST_COLUMNS)."""
    if min(mixed, healthy, test_pos, test_neg) < 0 or not 0 <= disease_share <= 1:
        raise UserError("subject counts must be >= 0 and --disease_share in [0, 1].\nFix: correct the flags.")
    if image_size < 16 or n_slices < 1 or not 0 < severity[0] <= severity[1]:
        raise UserError("need --image_size >= 16, --slices >= 1 and 0 < severity low <= high.\n"
                        "Fix: correct the flags.")
    check_output(out_dir, overwrite)
    template = load_template()
    rows = []
    for folder, label, number in tqdm(cohort_plan(mixed, disease_share, healthy, test_pos, test_neg, seed),
                                      desc="subjects", disable=not progress):
        pid = f"sub-{number:04d}"
        subject_severity = float(np.random.default_rng([seed, number, 1]).uniform(*severity)) if label else 0.0
        slices = render_subject(template, [seed, number], subject_severity, image_size, n_slices, lesions,
                                scanner_model)
        for k in range(n_slices):
            relative = f"{folder}/{slice_filename(pid, k)}"
            save_slice_png(slices["image"][k], os.path.join(out_dir, relative))
            save_slice_png(slices["mask"][k], os.path.join(out_dir, "masks", relative))
            save_slice_png(slices["brain"][k], os.path.join(out_dir, "brain_masks", relative))
            rows.append({"path": relative, "pid": pid, "split": folder.split("/")[0], "folder": folder,
                         "label": label, "severity": f"{subject_severity:.3f}"})
        if nifti:
            os.makedirs(os.path.join(out_dir, "nifti", folder), exist_ok=True)
            subject_nifti(slices["image"], image_size).to_filename(os.path.join(out_dir, "nifti", folder,
                                                                                f"{pid}.nii.gz"))
    with open(os.path.join(out_dir, "manifest.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def contact_sheet(path, seeds=(1, 2, 3, 4), severity=0.9, image_size=128, slice_indices=(1, 4, 6), n_slices=8):
    """Grid: per subject and slice, healthy counterpart | diseased | diseased with the mask outlined in red."""
    from PIL import Image
    template = load_template()
    grey = lambda image: np.repeat(np.rint(image[..., None] * 255).astype(np.uint8), 3, axis=2)
    tiles = []
    for seed in seeds:
        healthy = render_subject(template, seed, 0.0, image_size, n_slices)
        diseased = render_subject(template, seed, severity, image_size, n_slices)
        row = []
        for k in slice_indices:
            overlay = grey(diseased["image"][k])
            edge = diseased["mask"][k] & ~ndi.binary_erosion(diseased["mask"][k])
            overlay[edge] = (255, 40, 40)
            row += [grey(healthy["image"][k]), grey(diseased["image"][k]), overlay]
        tiles.append(np.concatenate(row, axis=1))
    sheet = Image.fromarray(np.concatenate(tiles, axis=0)).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    sheet.save(path, optimize=True)  # a palette PNG: grey levels plus the red outline, a third of the RGB size


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Write a synthetic Alzheimer-like cohort (PNG slices in the Brainomaly layout, ground-truth "
                    "masks, brain masks, manifest.csv) built from the MNI152 T1 template bundled with nilearn. "
                    "Defaults make a CPU demo: 80 mixed subjects (40% diseased), 80 known-healthy, 40+40 test, "
                    "8 axial slices each at 128 px.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out_dir", help="output folder, e.g. data/Demo (must be empty or new)")
    parser.add_argument("--mixed", type=int, default=80, help="subjects in the mixed set M (train/pos + neg_mixed)")
    parser.add_argument("--disease_share", type=float, default=0.4, help="share of M that is diseased (train/pos)")
    parser.add_argument("--healthy", type=int, default=80, help="known-healthy subjects (train/neg)")
    parser.add_argument("--test_pos", type=int, default=40, help="diseased test subjects")
    parser.add_argument("--test_neg", type=int, default=40, help="healthy test subjects")
    parser.add_argument("--image_size", type=int, default=128, help="square slice size in pixels")
    parser.add_argument("--slices", type=int, default=8, help="axial slices per subject, MNI z -20..22 mm")
    parser.add_argument("--severity", type=float, nargs=2, default=(0.4, 1.0), metavar=("LOW", "HIGH"),
                        help="per-subject disease severity range (1 = about 2.5 mm ventricle growth, 6.5 mm "
                             "medial-temporal and 1.2 mm temporo-parietal cortical loss)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--lesions", action="store_true", help="add focal T1-hypointense white-matter lesions")
    defaults = ScannerModel()
    parser.add_argument("--csf_signal", type=float, default=defaults.csf_signal,
                        help="mean CSF intensity of the subjects' T1 contrast curves (white matter about 0.86): "
                             "higher = less CSF contrast")
    parser.add_argument("--gamma_sd", type=float, default=defaults.gamma_sd,
                        help="spread (sd of log gamma) of the subjects' intensity gamma")
    parser.add_argument("--noise", type=float, nargs=2, default=defaults.noise, metavar=("LOW", "HIGH"),
                        help="range of the subjects' Rician noise sigma")
    parser.add_argument("--bias", type=float, default=defaults.bias,
                        help="amplitude of the subjects' smooth log bias field")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace a cohort already in out_dir ({', '.join(WRITTEN)}); other files are kept")
    parser.add_argument("--nifti", action="store_true",
                        help="also write each subject as a RAS NIfTI volume, nifti/<folder>/<pid>.nii.gz "
                             "(e.g. to try score.sh on whole scans)")
    parser.add_argument("--contact_sheet", default=None, help="also save a healthy-vs-diseased example grid here")
    return parser.parse_args(argv)


def run(argv=None):
    args = parse_args(argv)
    started = time.time()
    rows = make_cohort(args.out_dir, mixed=args.mixed, disease_share=args.disease_share, healthy=args.healthy,
                       test_pos=args.test_pos, test_neg=args.test_neg, image_size=args.image_size,
                       n_slices=args.slices, severity=tuple(args.severity), seed=args.seed, lesions=args.lesions,
                       overwrite=args.overwrite, nifti=args.nifti,
                       scanner_model=ScannerModel(args.csf_signal, args.gamma_sd, tuple(args.noise), args.bias))
    if args.contact_sheet:
        contact_sheet(args.contact_sheet, image_size=args.image_size)
    subjects = len({row["pid"] for row in rows})
    print(f"wrote {len(rows)} slices of {subjects} subjects to {args.out_dir} in {time.time() - started:.1f} s "
          f"(manifest: {os.path.join(args.out_dir, 'manifest.csv')})")
    return 0


def main(argv=None):
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
