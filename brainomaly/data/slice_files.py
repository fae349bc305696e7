"""Slice images on disk: the one image reader, the slice PNG writer, and the preprocessing every loader applies (pad,
central square crop, resize, [-1, 1])."""
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from brainomaly.data.dataset_layout import mask_path
from brainomaly.errors import UserError

BORDER_PAD = 5  # the reference pads 5 px before its central square crop


def to_8bit(image01):
    """A 2D array in [0, 1] as the uint8 pixels of a slice PNG (what every prepared slice goes through)."""
    return np.clip(np.rint(np.asarray(image01, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def save_slice_png(image01, path):
    """Write a 2D array in [0, 1] as an 8-bit grayscale PNG, atomically (temporary file, then rename)."""
    pixels = to_8bit(image01)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")  # hidden: never listed as a slice
    Image.fromarray(pixels, mode="L").save(tmp, format="PNG")
    os.replace(tmp, path)


def read_grayscale(path):
    """Read an 8/16-bit grayscale, RGB or palette PNG/JPG as a float32 HxW array in [0, 1]."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(image, dtype=np.float32)
                return np.clip(pixels / 65535.0, 0.0, 1.0)
            if image.mode == "F":
                pixels = np.asarray(image, dtype=np.float32)
                span = float(pixels.max() - pixels.min()) or 1.0
                return (pixels - pixels.min()) / span
            return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise UserError(
            f"cannot read image {path} ({err}).\n"
            f"Fix: replace or remove that file; `python main.py --mode check_data --image_dir DIR` lists every "
            f"unreadable file at once.") from err


def preprocess(image01, image_size):
    """[0,1] HxW array -> (1, S, S) tensor in [-1, 1]: pad 5 px, central square crop, bilinear resize."""
    image = torch.from_numpy(np.ascontiguousarray(image01, dtype=np.float32))[None, None]
    image = F.pad(image, (BORDER_PAD,) * 4)
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = image[..., top:top + side, left:left + side]
    if side != image_size:
        image = F.interpolate(image, size=(image_size, image_size), mode="bilinear",
                              align_corners=False, antialias=side > image_size)
    return (image[0].clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


def load_slice(path, image_size):
    return preprocess(read_grayscale(path), image_size)


def open_image(path, full):
    """(size, None) if the image opens (full: decodes) cleanly, else (None, the reason)."""
    try:
        with Image.open(path) as image:
            if full:
                image.load()
            return (image.size, None) if min(image.size) > 0 else (None, "empty image")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        return None, str(err)


def ground_truth_masks(root, path, image_size):
    """(anomaly mask, brain mask or None) of a slice from ROOT/masks and ROOT/brain_masks as boolean (S, S)
    arrays, or None when the slice has no anomaly mask. Without a brain mask the pixel metrics count the head
    (metrics.head_region of the input) instead."""
    anomaly = mask_path(root, path, "masks")
    if not os.path.isfile(anomaly):
        return None
    brain = mask_path(root, path, "brain_masks")
    return (load_slice(anomaly, image_size)[0].numpy() > 0,
            load_slice(brain, image_size)[0].numpy() > 0 if os.path.isfile(brain) else None)
