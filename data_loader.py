"""Dataset layout, patient ids, the one image loader, training streams and scoring loaders.

Layout under --image_dir (the reference's, see README):
    train/pos        diseased part of the unannotated mixed set M
    train/neg_mixed  healthy part of M (the split is used only to evaluate, never to train)
    train/neg        the known-healthy set H
    test/pos, test/neg  optional labelled test set
A 3D scan is stored slice by slice as `<patient id>__<slice index>.png`.
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import seeds
from errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MIXED_FOLDERS = ("train/pos", "train/neg_mixed")
HEALTHY_FOLDER = "train/neg"
BORDER_PAD = 5  # the reference pads 5 px before its central square crop

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


class SliceDataset(Dataset):
    """Slices read from disk on demand; item = (image (1,S,S) in [-1,1], index into paths)."""

    def __init__(self, paths, image_size):
        self.paths = list(paths)
        self.image_size = image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return load_slice(self.paths[index], self.image_size), index


def scoring_loader(paths, image_size, batch_size, num_workers=0, pin_memory=False):
    """Batches in file order, no augmentation; slices are read as they are needed, never all at once."""
    return DataLoader(SliceDataset(paths, image_size), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=False)


class EndlessBatches:
    """An endless stream of shuffled, randomly flipped training batches from one set of slices: this rank's shard.

    The mixed set M and the healthy set H each get their own stream and seed, so the (M, H) pairing is
    independent (the reference pairs them through one index). Every epoch has one order of all slices, the same
    on every rank (seeded by seed and epoch); a step takes the next world_size * batch_size slices of it and
    rank r keeps batch r of them, so N ranks x batch B read what one process with batch N*B reads. The position
    (epoch, slices taken) and the flip generator are the state a checkpoint saves: resume is exact, also with
    another number of ranks, and also while a DataLoader reads ahead from disk. With preload the decoded
    slices live in memory as float16 (2 bytes a pixel, within 2.4e-4 of the float32 values a DataLoader reads
    from disk without it), so a run resumed with the other --preload setting continues on the same slices in
    the same order, not on bit-identical pixels.
    """

    def __init__(self, paths, image_size, batch_size, seed, preload, num_workers=0, pin_memory=False,
                 batch_flag="--batch_size", rank=0, world_size=1, preload_device=None, max_shift=0):
        if len(paths) < batch_size * world_size:
            raise UserError(f"only {len(paths)} training slices in {os.path.dirname(paths[0])} for a batch of "
                            f"{batch_size}" + (f" on each of {world_size} ranks" if world_size > 1 else "") +
                            f".\nFix: add slices or lower {batch_flag}.")
        self.paths = list(paths)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)  # flips and shifts
        self.max_shift = max_shift
        self.epoch, self.position = 0, 0  # slices of this epoch's order taken by all ranks together
        self.images = None
        if preload:
            first = load_slice(self.paths[0], image_size)
            self.images = torch.empty((len(self.paths),) + tuple(first.shape), dtype=torch.float16)
            for i, path in enumerate(tqdm(self.paths, desc=f"loading {os.path.dirname(self.paths[0])}",
                                          leave=False, disable=len(self.paths) < 500)):
                self.images[i] = load_slice(path, image_size)
            if preload_device is not None:  # batches are then drawn and flipped there (same random numbers)
                self.images = self.images.to(preload_device)
        self.dataset = SliceDataset(self.paths, image_size)
        self.loader_options = {"num_workers": num_workers, "pin_memory": pin_memory}
        self._batches = None

    def epoch_order(self, epoch):
        return torch.randperm(len(self.paths), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def upcoming_indices(self):
        """This rank's slice indices for every step from the current position on."""
        epoch, position, order = self.epoch, self.position, None
        global_batch = self.batch_size * self.world_size
        while True:
            if position + global_batch > len(self.paths):
                epoch, position, order = epoch + 1, 0, None
            if order is None:
                order = self.epoch_order(epoch)
            start = position + self.rank * self.batch_size
            yield order[start:start + self.batch_size].tolist()
            position += global_batch

    def __iter__(self):
        return self

    def __next__(self):
        if self._batches is None:
            if self.images is not None:
                self._batches = (self.images[index].float() for index in self.upcoming_indices())
            else:  # the loader may read ahead; the position below advances only as batches are taken
                loader = DataLoader(self.dataset, batch_sampler=self.upcoming_indices(), **self.loader_options)
                self._batches = (batch for batch, _ in loader)
        batch = next(self._batches)
        global_batch = self.batch_size * self.world_size
        if self.position + global_batch > len(self.paths):
            self.epoch, self.position = self.epoch + 1, 0
        self.position += global_batch
        first = self.rank * self.batch_size
        flip = torch.rand(global_batch, generator=self.generator)[first:first + self.batch_size] < 0.5
        batch = torch.where(flip.to(batch.device)[:, None, None, None], batch.flip(-1), batch)
        if self.max_shift > 0:  # drawn after the flips, so a run without shifts keeps its random numbers
            shifts = torch.randint(-self.max_shift, self.max_shift + 1, (global_batch, 2), generator=self.generator)
            batch = shifted(batch, shifts[first:first + self.batch_size].tolist(), self.max_shift)
        return batch

    def state_dict(self):
        # the seed too: it fixes every epoch's order, so the state alone says which slice comes next
        return {"generator": self.generator.get_state(), "seed": self.seed, "epoch": self.epoch,
                "position": self.position}

    def load_state_dict(self, state):
        if "epoch" not in state:
            raise UserError("this checkpoint's data-stream state was written by an older version (no epoch "
                            "position).\nFix: start a new run, or resume it with the version that wrote it.")
        self.generator.set_state(state["generator"])
        self.seed = int(state.get("seed", self.seed))
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = None  # the next batch is read from the restored position


def shifted(batch, shifts, max_shift):
    """Each image of the batch moved by its (rows, columns) in shifts; what comes in at the border is background
    (-1), so a brain moved within its field of view stays a whole brain on an empty background."""
    padded = F.pad(batch, (max_shift,) * 4, value=-1.0)
    size_y, size_x = batch.shape[-2:]
    return torch.stack([padded[i, :, max_shift - dy:max_shift - dy + size_y, max_shift - dx:max_shift - dx + size_x]
                        for i, (dy, dx) in enumerate(shifts)])


def should_preload(n_slices, image_size, choice, budget_bytes=3 * 2**30):
    if choice == "on":
        return True
    if choice == "off":
        return False
    return n_slices * image_size * image_size * 2 <= budget_bytes


def mixed_set_paths(root):
    return [p for folder in MIXED_FOLDERS for p in require_images(root, folder)]


def hold_out_patients(paths, fraction, seed):
    """(kept, held_out) slice paths: a seeded `fraction` of the patients (at least one, never all) held out whole,
    so no slice of a held-out patient is trained on. One patient only: nothing is held out."""
    patients = sorted({patient_id(p) for p in paths})
    n_held = min(len(patients) - 1, max(1, round(fraction * len(patients)))) if fraction > 0 else 0
    held = {patients[i] for i in np.random.default_rng(seed).permutation(len(patients))[:n_held]}
    return [p for p in paths if patient_id(p) not in held], [p for p in paths if patient_id(p) in held]


def known_healthy_split(root, fraction, seed):
    """(trained_on, held_out) slices of the known-healthy set train/neg: the seeded --healthy_holdout share of
    its patients that neither stage trains on (AUCp's label-0 set and the refiner's check)."""
    return hold_out_patients(require_images(root, HEALTHY_FOLDER), fraction, seeds.seed(seed, "healthy_holdout"))


def training_stream(paths, image_size, batch_size, seed, preload="auto", num_workers=0, pin_memory=False,
                    batch_flag="--batch_size", rank=0, world_size=1, preload_device=None, max_shift=0):
    """An endless batch stream over `paths` (this rank's shard): the mixed set M and the healthy set H each get
    their own. batch_flag names the flag that set batch_size (stage 2: --refiner_batch_size).
    preload_device: hold the preloaded slices there (e.g. the GPU) instead of in host memory.
    max_shift: move each slice by up to this many pixels in each direction (augmentation; 0: flips only)."""
    use_memory = should_preload(len(paths), image_size, preload)
    return EndlessBatches(paths, image_size, batch_size, seed, use_memory, num_workers, pin_memory, batch_flag,
                          rank, world_size, preload_device, max_shift)


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


def open_image(path, full):
    """(size, None) if the image opens (full: decodes) cleanly, else (None, the reason)."""
    try:
        with Image.open(path) as image:
            if full:
                image.load()
            return (image.size, None) if min(image.size) > 0 else (None, "empty image")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        return None, str(err)


MASK_FOLDERS = ("masks", "brain_masks")  # anomaly masks and brain masks, at each slice's path under --image_dir


def mask_path(root, path, folder):
    return os.path.join(root, folder, os.path.relpath(path, root))


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


def has_masks(root):
    return os.path.isdir(os.path.join(root, "masks"))


def mask_coverage(root, images_by_folder):
    """Report of masks/ and brain_masks/ for check_data: (summary lines, warnings). A folder where some slices
    have a mask and others not names the ones without: a warning, not an error (pixel metrics skip a slice
    without an anomaly mask and count the head of one without a brain mask), but most often a file gone missing."""
    lines, warnings = [], []
    n_total = sum(len(images) for images in images_by_folder.values())
    for mask_folder in MASK_FOLDERS:
        if not os.path.isdir(os.path.join(root, mask_folder)):
            lines.append(f"{mask_folder + '/':<13} absent" + (
                ": pixel metrics are not computed" if mask_folder == "masks" else
                ": pixel metrics count the head (input above the background level) as the region"))
            continue
        covered = 0
        for folder, images in images_by_folder.items():
            missing = [p for p in images if not os.path.isfile(mask_path(root, p, mask_folder))]
            covered += len(images) - len(missing)
            if missing and len(missing) < len(images):
                shown = ", ".join(mask_path(root, p, mask_folder) for p in missing[:3])
                warnings.append(f"{len(missing)} of the {len(images)} slices in {os.path.join(root, folder)} have "
                                f"no {mask_folder[:-1].replace('_', ' ')} while the others have one; missing: "
                                f"{shown}" + (", ..." if len(missing) > 3 else "") +
                                ". Add them at the same relative path, or pixel metrics " +
                                ("leave those slices out." if mask_folder == "masks" else
                                 "count the head of those slices instead."))
        lines.append(f"{mask_folder + '/':<13} {covered} of {n_total} slices")
    return lines, warnings


def trained_healthy_count(root, healthy_holdout, seed):
    """(slices of train/neg stage 1 trains on, patients it holds out) with --healthy_holdout and --seed."""
    trained_on, held_out = known_healthy_split(root, healthy_holdout, seed)
    return len(trained_on), len({patient_id(p) for p in held_out})


def check_dataset(root, batch_size, full=False, batch_flag="--batch_size", mixed_in_batches=True,
                  healthy_holdout=0.0, seed=0):
    """Validate the layout before any work starts; every problem found is reported in one UserError.

    Required: train/pos, train/neg_mixed, train/neg with images (the test folders are optional).
    Errors: missing or empty required folders, unreadable images, too few slices for a batch, a patient id
    in two folders. Reported only: non-image files (skipped), mixed image sizes (all are resized anyway).
    full=True decodes every image (check_data mode); otherwise only the headers are read.
    batch_flag names the flag that set batch_size (stage 2 batches with --refiner_batch_size).
    mixed_in_batches=False: only train/neg is drawn in batches (stage 2), so only its size is checked.
    healthy_holdout, seed: stage 1's --healthy_holdout and --seed; the known-healthy slices left to train on after
    the held-out patients are what must fill a batch. full=True also reports masks/ and brain_masks/.
    """
    if not os.path.isdir(root):
        raise UserError(f"missing data folder {root}.\nFix: pass --image_dir (train.sh NAME reads data/NAME); "
                        f"the layout is in README, 'Data layout'.")
    problems, folders_of_patient, sizes, summary, images_by_folder = [], {}, {}, [], {}
    for folder in ("train/pos", "train/neg_mixed", "train/neg", "test/pos", "test/neg"):
        path = os.path.join(root, folder)
        required = folder.startswith("train/")
        if not os.path.isdir(path):
            if required:
                problems.append(f"missing folder {path}: put the {describe_folder(folder)} there.")
            continue
        images = list_images(path)
        if not images and required:
            problems.append(f"no images in {path}: put the {describe_folder(folder)} there (PNG/JPG).")
        for image_path in tqdm(images, desc=f"checking {folder}", leave=False, disable=len(images) < 2000):
            size, reason = open_image(image_path, full)
            if reason:
                problems.append(f"unreadable image {image_path} ({reason}): replace or remove it.")
            else:
                sizes.setdefault(size, image_path)
            folders_of_patient.setdefault(patient_id(image_path), set()).add(folder)
        summary.append((folder, len(images), len({patient_id(p) for p in images})))
        images_by_folder[folder] = images
    for folder, count, _ in summary:
        if folder == "train/neg" and 0 < count < batch_size:
            problems.append(f"only {count} slices in {os.path.join(root, folder)} for a batch of {batch_size}: "
                            f"add slices or lower {batch_flag}.")
        elif folder == "train/neg" and count and healthy_holdout > 0:
            trained, held = trained_healthy_count(root, healthy_holdout, seed)
            if trained < batch_size:
                problems.append(f"only {trained} of the {count} slices in {os.path.join(root, folder)} are trained "
                                f"on ({held} patient(s) held out by --healthy_holdout {healthy_holdout:g}) for a "
                                f"batch of {batch_size}: add slices or patients, lower {batch_flag} or "
                                f"--healthy_holdout.")
    mask_lines = []
    if full:
        mask_lines, mask_warnings = mask_coverage(root, images_by_folder)
        for warning in mask_warnings:
            print(f"warning: {warning}", file=sys.stderr)
    mixed_count = sum(count for folder, count, _ in summary if folder in MIXED_FOLDERS)
    if mixed_in_batches and 0 < mixed_count < batch_size:
        problems.append(f"only {mixed_count} slices in the mixed set ({root}/train/pos + train/neg_mixed) for a "
                        f"batch of {batch_size}: add slices or lower {batch_flag}.")
    shared = {pid: sorted(f) for pid, f in folders_of_patient.items() if len(f) > 1}
    for pid, folders in list(shared.items())[:10]:
        problems.append(f"patient id {pid!r} has slices in {' and '.join(os.path.join(root, f) for f in folders)}: "
                        f"a patient belongs to one folder; move or rename its slices.")
    if len(shared) > 10:
        problems.append(f"... and {len(shared) - 10} more patient ids found in two folders.")
    if len(sizes) > 1:
        examples = ", ".join(f"{w}x{h} (e.g. {p})" for (w, h), p in list(sizes.items())[:3])
        print(f"note: {len(sizes)} different image sizes in {root}: {examples}; all are padded, cropped to a "
              f"square and resized to --image_size.", file=sys.stderr)
    if full:
        print(f"{'folder':<16} {'slices':>8} {'patients':>9}")
        for folder, count, patients in summary:
            print(f"{folder:<16} {count:>8} {patients:>9}")
        for line in mask_lines:
            print(line)
    if problems:
        raise UserError(f"{len(problems)} problem(s) in {root}:\n  " + "\n  ".join(problems))
    if full:
        print(f"{root}: no problems found.")
