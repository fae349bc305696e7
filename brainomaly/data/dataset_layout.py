"""The dataset layout under --image_dir, once: the five folders, patient ids, image listing and the slices each
protocol scores.

    train/pos        diseased part of the unannotated mixed set M
    train/neg_mixed  healthy part of M (the split is used only to evaluate, never to train)
    train/neg        the known-healthy set H
    test/pos, test/neg  optional labelled test set
A 3D scan is stored slice by slice as `<patient id>__<slice index>.png`."""
import os
import sys

from brainomaly.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MIXED_FOLDERS = ("train/pos", "train/neg_mixed")
HEALTHY_FOLDER = "train/neg"

# (folder, label) pairs each protocol scores; label 1 = "diseased" (AUCp: pseudo-label "from M").
PROTOCOL_SETS = {
    "inductive": (("test/neg", 0), ("test/pos", 1)),
    "transductive": (("train/neg_mixed", 0), ("train/pos", 1)),
    "aucp": (("train/neg", 0), ("train/pos", 1), ("train/neg_mixed", 1)),
}


def patient_id(path):
    """Patient id = file name before the first `__`; a name without `__` is its own patient."""
    name = os.path.basename(path)
    return name.split("__", 1)[0] if "__" in name else name


def slice_filename(pid, index):
    return f"{pid}__{index:03d}.png"


def is_image_file(name):
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(folder, warn=True):
    """Sorted image paths in a folder (sorted, so runs are repeatable); other files are skipped with one warning."""
    names = sorted(os.listdir(folder))
    images = [os.path.join(folder, n) for n in names if is_image_file(n)]
    skipped = [n for n in names if not is_image_file(n) and os.path.isfile(os.path.join(folder, n))]
    if skipped and warn:
        print(f"warning: skipped {len(skipped)} non-image file(s) in {folder} (e.g. {skipped[0]}); "
              f"only {', '.join(IMAGE_EXTENSIONS)} are read.", file=sys.stderr)
    return images


def require_images(root, folder):
    """Image paths of root/folder, or a UserError naming the path and the fix."""
    path = os.path.join(root, folder)
    if not os.path.isdir(path):
        raise UserError(f"missing folder {path}.\nFix: create it and put the {describe_folder(folder)} there "
                        f"as PNG slices named <patient>__<slice>.png (see README, 'Data layout').")
    images = list_images(path)
    if not images:
        raise UserError(f"no images in {path}.\nFix: put the {describe_folder(folder)} there as PNG/JPG slices "
                        f"named <patient>__<slice>.png (see README, 'Data layout').")
    return images


def describe_folder(folder):
    return {
        "train/pos": "diseased slices of the unannotated mixed set",
        "train/neg_mixed": "healthy slices of the unannotated mixed set",
        "train/neg": "known-healthy slices",
        "test/pos": "diseased test slices",
        "test/neg": "healthy test slices",
    }.get(folder, "slices to score")


def mixed_set_paths(root):
    return [p for folder in MIXED_FOLDERS for p in require_images(root, folder)]


def protocol_slices(root, protocol, known_healthy=None):
    """(paths, labels) of every slice a protocol scores, in folder then file order; known_healthy (slice paths)
    replaces the train/neg folder's slices (AUCp over the held-out known-healthy patients)."""
    paths, labels = [], []
    for folder, label in PROTOCOL_SETS[protocol]:
        images = known_healthy if folder == HEALTHY_FOLDER and known_healthy is not None \
            else require_images(root, folder)
        paths += images
        labels += [label] * len(images)
    return paths, labels


def list_images_recursive(folder):
    """Every image below a folder (score mode), sorted."""
    if not os.path.isdir(folder):
        raise UserError(f"missing folder {folder}.\nFix: pass the folder of PNG/JPG slices to score as --image_dir.")
    paths = sorted(os.path.join(d, n) for d, _, names in os.walk(folder) for n in names if is_image_file(n))
    if not paths:
        raise UserError(f"no images in {folder} or below it.\nFix: put the slices to score there as PNG/JPG files "
                        f"named <patient>__<slice>.png.")
    return paths


MASK_FOLDERS = ("masks", "brain_masks")  # anomaly masks and brain masks, at each slice's path under --image_dir


def mask_path(root, path, folder):
    return os.path.join(root, folder, os.path.relpath(path, root))


def has_masks(root):
    return os.path.isdir(os.path.join(root, "masks"))


LAYOUT_FOLDERS = ("train/pos", "train/neg_mixed", "train/neg", "test/pos", "test/neg")
