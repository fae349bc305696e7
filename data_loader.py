"""Dataset layout, patient ids, the one image loader, training streams and scoring loaders.

Layout under --image_dir (the reference's, see README):
    train/pos        diseased part of the unannotated mixed set M
    train/neg_mixed  healthy part of M (the split is used only to evaluate, never to train)
    train/neg        the known-healthy set H
    test/pos, test/neg  optional labelled test set
A 3D scan is stored slice by slice as `<patient id>__<slice index>.png`.
"""
import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from brainomaly.data.slice_files import load_slice
from brainomaly.errors import UserError


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

    def __init__(self, paths, image_size, batch_size, seed, preload, *, num_workers=0, pin_memory=False,
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


def training_stream(paths, image_size, batch_size, seed, preload="auto", *, num_workers=0, pin_memory=False,
                    batch_flag="--batch_size", rank=0, world_size=1, preload_device=None, max_shift=0):
    """An endless batch stream over `paths` (this rank's shard): the mixed set M and the healthy set H each get
    their own. batch_flag names the flag that set batch_size (stage 2: --refiner_batch_size).
    preload_device: hold the preloaded slices there (e.g. the GPU) instead of in host memory.
    max_shift: move each slice by up to this many pixels in each direction (augmentation; 0: flips only)."""
    use_memory = should_preload(len(paths), image_size, preload)
    return EndlessBatches(paths, image_size, batch_size, seed, use_memory, num_workers=num_workers,
                          pin_memory=pin_memory, batch_flag=batch_flag, rank=rank, world_size=world_size,
                          preload_device=preload_device, max_shift=max_shift)
