"""Raw T1 scan -> the volume `prepare_data.py` slices, with ANTs (antspyx, an optional extra):

1. N4 bias-field correction of the scan (Tustison et al. 2010);
2. registration of the corrected scan to the MNI152 2009a symmetric template that nilearn ships (nothing is
   downloaded): affine by default, SyN (affine + deformable) with registration="syn";
3. brain extraction by the template's brain mask: the registered scan is masked in template space, and the mask is
   carried back onto the scan's own grid through the inverse transform.

What is written for a scan STEM into its output folder (names after fMRIPrep's, without the BIDS entities):
    STEM_space-MNI152NLin2009aSym_T1w.nii.gz   bias-corrected, brain-extracted scan on the template grid (sliced)
    STEM_brain_mask.nii.gz                     the brain mask on the scan's own grid and affine (uint8, 0/1)
    STEM_to-MNI152NLin2009aSym_affine.mat      the ANTs affine, scan -> template
    STEM_to-MNI152NLin2009aSym_warp.nii.gz     with syn: the deformable part and its inverse (..._inverse_warp)
The template and its brain mask on the same grid go beside them (template_T1w.nii.gz, template_brain_mask.nii.gz),
so an anomaly map made in template space can be carried back onto the scan (to_scan_grid).
"""
import functools
import os
import shutil
from dataclasses import asdict, dataclass

import numpy as np

from brainomaly.errors import UserError

TEMPLATE = "MNI152NLin2009aSym"
REGISTRATIONS = {"affine": "Affine", "syn": "SyN"}  # our flag value -> antspyx type_of_transform
OWN_PREPARATION = ("a scan you prepare with your own pipeline goes to prepare_data.py nifti without --preprocess "
                   "(and to score mode with --prepared)")
INSTALL_HINT = "Fix: pip install -r requirements-preprocess.txt (antspyx and pybids), then rerun."
MIN_COVERAGE = 0.8      # a scan whose field of view holds less of the registered template brain is refused
RANDOM_SEED = 123
N4_GRID_MM = 8.0        # N4 fits its smooth field on about this grid (ANTs' shrink factor); finer costs minutes
VOLUME_SCALE = (0.4, 2.5)  # brain volume of the scan / the template's, outside which a registration has failed


def require_ants():
    """The antspyx module, or a UserError saying how to install it."""
    try:
        import ants
    except ImportError as err:
        raise UserError(f"preprocessing needs antspyx, which is not installed ({err}).\n{INSTALL_HINT}") from err
    if ants.config._random_seed is None:
        # A fixed seed for the metric's random sampling, so scoring repeats the training data's registration;
        # ants.set_ants_deterministic would also force one thread, twice the time on 2 cores.
        ants.config._random_seed = RANDOM_SEED
    return ants


@dataclass(frozen=True)
class PreprocessSettings:
    """How scans are prepared; recorded in prepare.json so that scoring repeats it exactly."""
    registration: str = "affine"
    template_resolution: int = 1  # mm; nilearn resamples its 1 mm template to coarser grids
    # The affine is fitted (and N4's bias field estimated) on grids of at least this voxel size in mm, then applied
    # at full resolution: 6 s instead of 28 s for an affine of a 1 mm head on 2 cores, Dice 0.998 against 0.999.
    fit_resolution: int = 2
    # Multi-resolution affine iterations (coarse to fine); ANTs' own default is (2100, 1200, 1200, 10).
    affine_iterations: tuple = (2100, 1200, 1200, 10)
    syn_iterations: tuple = (40, 20, 0)

    def record(self):
        ants = require_ants()
        return {**asdict(self), "pipeline": "N4, registration to the template, template brain mask",
                "template": TEMPLATE, "antspyx": ants.__version__}

    @classmethod
    def from_record(cls, record):
        names = cls.__dataclass_fields__
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in record.items() if k in names}
        return cls(**values)


@dataclass
class PreprocessedScan:
    """Where one scan's preprocessing outputs are (see the module docstring)."""
    scan: str
    template_space: str
    brain_mask: str
    template: str
    template_mask: str
    forward: list         # ANTs transform files, scan -> template (apply_transforms order)
    inverse: list         # template -> scan
    inverse_flags: list   # whichtoinvert for `inverse`
    coverage: float       # share of the template brain inside the scan's field of view


def output_name(stem, what):
    return {"template_space": f"{stem}_space-{TEMPLATE}_T1w.nii.gz", "brain_mask": f"{stem}_brain_mask.nii.gz",
            "affine": f"{stem}_to-{TEMPLATE}_affine.mat", "warp": f"{stem}_to-{TEMPLATE}_warp.nii.gz",
            "inverse_warp": f"{stem}_to-{TEMPLATE}_inverse_warp.nii.gz"}[what]


@functools.lru_cache(maxsize=4)
def template_images(resolution):
    """(template T1, its brain mask with the ventricles filled) as nibabel images, from the nilearn wheel."""
    import nibabel as nib
    from nilearn import datasets
    from scipy import ndimage
    t1 = datasets.load_mni152_template(resolution=resolution)
    mask = ndimage.binary_fill_holes(datasets.load_mni152_brain_mask(resolution=resolution).get_fdata() > 0)
    return t1, nib.Nifti1Image(mask.astype(np.uint8), t1.affine)


def write_template(folder, resolution):
    """The template and its brain mask as files in folder (ANTs reads files); returns their paths."""
    paths = os.path.join(folder, "template_T1w.nii.gz"), os.path.join(folder, "template_brain_mask.nii.gz")
    if not all(os.path.isfile(p) for p in paths):
        os.makedirs(folder, exist_ok=True)
        for image, path in zip(template_images(resolution), paths):
            image.to_filename(path)
    return paths


def preprocess_scan(path, out_dir, stem, settings=PreprocessSettings()):
    """N4, registration and brain extraction of the scan at path; outputs into out_dir. Returns a PreprocessedScan.
    A scan that cannot be prepared (unreadable, or a registration that fails its checks) is a UserError naming it."""
    ants = require_ants()
    if settings.registration not in REGISTRATIONS:
        raise UserError(f"--registration {settings.registration} is not one of {', '.join(REGISTRATIONS)}.\n"
                        f"Fix: use --registration affine (default) or syn.")
    template_path, template_mask_path = write_template(out_dir, settings.template_resolution)
    try:
        scan = ants.image_read(path, reorient=False)
    except Exception as err:  # ITK raises RuntimeError and others for broken files
        raise UserError(f"cannot read scan {path} with ANTs ({err}).\n"
                        f"Fix: replace it with a 3D T1 .nii/.nii.gz volume.") from err
    if scan.dimension != 3:
        raise UserError(f"scan {path} has {scan.dimension} dimensions; one 3D T1 volume is needed.\n"
                        f"Fix: extract one 3D volume first.")
    template = ants.image_read(template_path)
    template_mask = ants.image_read(template_mask_path)
    try:
        corrected = bias_corrected(ants, scan, settings.fit_resolution)
        # The template is skull-stripped: its brain mask, grown by a margin, restricts the metric to the brain.
        fixed, metric_mask = (coarser(ants, image, settings.fit_resolution, interpolation)
                              for image, interpolation in ((template, 0), (ants.iMath(template_mask, "MD", 3), 1)))
        fit = ants.registration(fixed=fixed, moving=coarser(ants, corrected, settings.fit_resolution, 0),
                                type_of_transform=REGISTRATIONS[settings.registration], mask=metric_mask,
                                aff_iterations=settings.affine_iterations, reg_iterations=settings.syn_iterations)
    except Exception as err:  # ITK reports a failed fit as RuntimeError (or worse); the user needs the scan's name
        raise UserError(f"N4 or registration of scan {path} to the {TEMPLATE} template failed ({err}).\n"
                        f"Fix: check that it is a 3D T1 head or brain scan; {OWN_PREPARATION}.") from err
    forward, inverse, flags = keep_transforms(fit, out_dir, stem, settings.registration)
    registered = ants.apply_transforms(fixed=template, moving=corrected, transformlist=forward)
    brain = registered * template_mask
    in_view = ants.apply_transforms(fixed=template, moving=scan.new_image_like(np.ones(scan.shape, np.float32)),
                                    transformlist=forward, interpolator="nearestNeighbor")
    template_brain = template_mask.numpy() > 0
    coverage = float((in_view.numpy()[template_brain] > 0.5).mean())
    scan_mask = ants.apply_transforms(fixed=scan, moving=template_mask, transformlist=inverse,
                                      whichtoinvert=flags, interpolator="linear").numpy() > 0.5
    check_registration(path, coverage, scan_mask, scan, template_brain, template)
    outputs = {what: os.path.join(out_dir, output_name(stem, what)) for what in ("template_space", "brain_mask")}
    ants.image_write(brain, outputs["template_space"])
    write_on_grid_of(path, scan_mask.astype(np.uint8), outputs["brain_mask"])
    return PreprocessedScan(path, outputs["template_space"], outputs["brain_mask"], template_path, template_mask_path,
                            forward, inverse, flags, coverage)


def coarser(ants, image, resolution, interpolation):
    """The image on a grid of at least `resolution` mm voxels (itself when already that coarse); interpolation 0
    linear, 1 nearest neighbour (ANTs' codes)."""
    spacing = tuple(max(float(s), float(resolution)) for s in image.spacing)
    if spacing == tuple(float(s) for s in image.spacing):
        return image
    return ants.resample_image(image, spacing, use_voxels=False, interp_type=interpolation)


def bias_corrected(ants, scan, resolution):
    """N4 bias-field correction: the smooth field is estimated on a coarser grid and divided out at full
    resolution (N4 on a 1 mm head takes over a minute on 2 cores, its field is smooth on a 2 mm grid anyway)."""
    scan = ants.threshold_image(scan, 0, None, 1, 0) * scan  # N4 needs intensities >= 0 (drop negative noise)
    small = coarser(ants, scan, resolution, 0)
    shrink = max(1, int(round(N4_GRID_MM / max(small.spacing))))
    field = ants.n4_bias_field_correction(small, shrink_factor=shrink, return_bias_field=True)
    if small is not scan:
        field = ants.resample_image_to_target(field, scan, interp_type="linear")
    return scan / field


def keep_transforms(fit, out_dir, stem, registration):
    """Copy the transforms ANTs wrote to a temporary place into out_dir under our names;
    returns (forward list, inverse list, whichtoinvert of the inverse list)."""
    affine = os.path.join(out_dir, output_name(stem, "affine"))
    moved = [affine]
    shutil.copyfile([t for t in fit["fwdtransforms"] if t.endswith(".mat")][0], affine)
    if registration == "syn":
        warp, inverse_warp = (os.path.join(out_dir, output_name(stem, w)) for w in ("warp", "inverse_warp"))
        shutil.copyfile([t for t in fit["fwdtransforms"] if t.endswith("Warp.nii.gz")][0], warp)
        shutil.copyfile([t for t in fit["invtransforms"] if t.endswith("InverseWarp.nii.gz")][0], inverse_warp)
        moved += [warp, inverse_warp]
    for produced in set(fit["fwdtransforms"]) | set(fit["invtransforms"]):
        if os.path.exists(produced):
            os.remove(produced)
    if registration == "syn":
        return [warp, affine], [affine, inverse_warp], [True, False]
    return [affine], [affine], [True]


def check_registration(path, coverage, scan_mask, scan, template_brain, template):
    """Refuse a registration that cannot be right: the brain mostly outside the scan, or a brain far too large or
    small for a head (what a registration that converged on the wrong thing produces)."""
    fix = f"Fix: use a whole-head (or whole-brain) T1 scan; {OWN_PREPARATION}."
    if coverage < MIN_COVERAGE:
        raise UserError(f"scan {path}: only {coverage:.0%} of the template brain lies inside its field of view after "
                        f"registration (at least {MIN_COVERAGE:.0%} needed).\n{fix}")
    scale = scan_mask.sum() * np.prod(scan.spacing) / (template_brain.sum() * np.prod(template.spacing))
    if not VOLUME_SCALE[0] <= scale <= VOLUME_SCALE[1]:
        raise UserError(f"scan {path}: the registered brain mask is {scale:.2f} times the template brain's volume, "
                        f"outside {VOLUME_SCALE[0]}-{VOLUME_SCALE[1]}: the registration failed.\n{fix}")


def write_on_grid_of(like_path, volume, path):
    """Save an array in the stored voxel order of the NIfTI at like_path with that file's affine, qform and sform."""
    import nibabel as nib
    like = nib.load(like_path)
    if volume.shape != like.shape[:3]:
        raise ValueError(f"array of shape {volume.shape} does not match {like_path} of shape {like.shape}")
    image = nib.Nifti1Image(volume, like.affine)
    image.set_qform(like.get_qform(), code=int(like.header["qform_code"]))
    image.set_sform(like.get_sform(), code=int(like.header["sform_code"]))
    image.to_filename(path)


def to_scan_grid(volume, prepared_scan, like_path):
    """An array on the template grid (the stored order of template_space) -> an array on the scan's stored grid."""
    ants = require_ants()
    template = ants.image_read(prepared_scan.template)
    scan = ants.image_read(like_path, reorient=False)
    moved = ants.apply_transforms(fixed=scan, moving=template.new_image_like(np.asarray(volume, np.float32)),
                                  transformlist=prepared_scan.inverse, whichtoinvert=prepared_scan.inverse_flags,
                                  interpolator="linear")
    return moved.numpy().astype(np.float32)
