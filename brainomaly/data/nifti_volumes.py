"""The NIfTI library: volumes in canonical orientation, brain masks, intensity normalisation, slice choice, and the
square slice geometry that score mode repeats on a scan."""
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from brainomaly.errors import UserError

NIFTI_EXTENSIONS = (".nii.gz", ".nii")


# ----------------------------------------------------------------------------------------------------
# nifti: 3D volumes -> axial PNG slices
# ----------------------------------------------------------------------------------------------------

def strip_nifti_extension(name):
    for ext in NIFTI_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[:-len(ext)]
    return name


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


def slice_text(slice_range):
    return f"{slice_range[0]}:{slice_range[1]}" if slice_range else None
