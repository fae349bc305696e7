"""A synthetic T1 head with a known brain: the MNI152 template's brain (shipped in nilearn) wrapped in a
skull-like shell (dark CSF gap, dark bone, bright scalp fat), moved by a known rigid+scale transform onto a scanner
grid stored in another axis order, with a smooth bias field and noise. Used by the preprocessing tests and by
bench/preprocess_dice.py."""
import nibabel as nib
import numpy as np
from scipy import ndimage

from brainomaly.data import preprocessing

SHELL_MM = ((0.0, 3.0, 0.15), (3.0, 7.0, 0.05), (7.0, 12.0, 0.95))  # (from, to mm outside the brain, intensity)


def rotation(degrees):
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def synthetic_head(resolution=3, voxel_mm=3.0, degrees=(8.0, -5.0, 6.0), scale=1.06, shift_mm=(6.0, -8.0, 5.0),
                   axcodes="LPS", seed=0):
    """(head image, its true brain mask on the same grid) as nibabel images."""
    t1, mask = preprocessing.template_images(resolution)
    template = t1.get_fdata().astype(np.float32)
    template /= np.percentile(template[mask.get_fdata() > 0], 99)
    brain = mask.get_fdata() > 0
    outside_mm = ndimage.distance_transform_edt(~brain, sampling=t1.header.get_zooms()[:3])
    head = np.where(brain, template, 0.0)
    for start, stop, level in SHELL_MM:
        head[(outside_mm > start) & (outside_mm <= stop)] = level
    # scanner world = A @ template world + b: rotation and isotropic scale about the brain centre, then a shift
    centre = t1.affine[:3, :3] @ np.argwhere(brain).mean(axis=0) + t1.affine[:3, 3]
    linear = scale * rotation(degrees)
    offset = centre + np.asarray(shift_mm) - linear @ centre
    extent = np.array(head.shape) * t1.header.get_zooms()[:3] * 1.1
    shape = tuple(int(n) for n in np.ceil(extent / voxel_mm))
    scanner = np.diag([voxel_mm] * 3 + [1.0])
    scanner[:3, 3] = centre + np.asarray(shift_mm) - voxel_mm * (np.array(shape) - 1) / 2
    # scanner voxel -> scanner world -> template world -> template voxel
    to_template = np.linalg.inv(t1.affine) @ np.block([[np.linalg.inv(linear), -np.linalg.inv(linear)[:, :] @ offset[:, None]],
                                                       [np.zeros((1, 3)), np.ones((1, 1))]]) @ scanner
    data = ndimage.affine_transform(head, to_template[:3, :3], to_template[:3, 3], output_shape=shape, order=1)
    truth = ndimage.affine_transform(brain.astype(np.float32), to_template[:3, :3], to_template[:3, 3],
                                     output_shape=shape, order=1) > 0.5
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    bias = np.exp(0.25 * np.tensordot(rng.normal(size=3), grid, axes=1))  # a smooth 25% intensity gradient
    data = np.abs(data * bias + rng.normal(0, 0.02, shape)).astype(np.float32) * 1000
    image, truth_image = nib.Nifti1Image(data, scanner), nib.Nifti1Image(truth.astype(np.uint8), scanner)
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                nib.orientations.axcodes2ornt(axcodes))
    return image.as_reoriented(transform), truth_image.as_reoriented(transform)


def dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())
