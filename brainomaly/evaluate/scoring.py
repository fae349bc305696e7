"""Scoring, one path for every protocol and for score mode: each slice's healthy reconstructions (coarse
x_c = tanh(x + G(x)); calibrated f(x_c), the intensity correction of intensity_correction.py; refined
x_r = x_c + r_hat when a refiner is loaded), the anomaly map |x - reconstruction| / 2 of the one the networks
score with (ScoringNetworks.reconstruction) and its slice score, the map's mean inside the head (--score_region,
metrics.slice_scores), in [0, 1]. ReconstructionScores adds the other reconstructions' slice scores beside it.

scored_batches yields what scoring computes, batch by batch; score_slices collects the slice scores and hands
each batch to consumers, such as pixel_metrics_consumer, HealthyMapScale and AnomalyPanels below. anomaly_maps
is the same scoring as a callable on in-memory slices (volume_scoring.py: whole NIfTI scans in score mode).

Under torchrun each rank scores whole batches of the one-process order (batch b on rank b % ranks), so every
slice is scored in the batch it has in one process and the scores are bit-identical; score_slices gathers the
scores on every rank and then calls each consumer's merge_ranks (if it has one) to add up what the ranks saw.
"""
import os
import zlib
from typing import NamedTuple, Optional

import numpy as np
import torch
from tqdm import tqdm

import data_loader
from brainomaly import distributed, metrics, visualize
from brainomaly.data import slice_files
from model import healthy_reconstruction


def slice_noise(paths, shape, seed):
    """DDIM start noise seeded per slice (seed + file name), so a slice's score does not depend on the batch,
    the order or the protocol it is scored in."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
        seed * 1_000_003 + zlib.crc32(os.path.basename(p).encode()))) for p in paths])


def reconstruct(runtime, config, x, generator, refiner=None, noises=()):
    """(coarse x_c = tanh(x + G(x)), refined x_r or None). The refiner's residual is the mean of one DDIM sample
    per start noise in `noises` (--refiner_samples): with --ddim_steps 1 each is the one-step x0-prediction
    from t = T-1, the posterior-mean estimate E[r | x_c]; more samples or steps trade time for detail."""
    with runtime.autocast():
        coarse = healthy_reconstruction(x, generator(x)).float()
        if refiner is None:
            return coarse, None
        residual = sum(refiner.sample_residual(coarse, config.ddim_steps, noise=noise.to(x.device))
                       for noise in noises) / len(noises)
        return coarse, (coarse + residual).clamp(-1, 1).float()


class ScoredBatch(NamedTuple):
    index: np.ndarray  # positions of these slices in the scored list of paths
    x: torch.Tensor
    coarse: torch.Tensor
    refined: Optional[torch.Tensor]  # None without a refiner
    anomaly_map: torch.Tensor  # |x - reconstruction| / 2, channels averaged: (batch, height, width)
    scores: np.ndarray  # slice scores (float64), the anomaly map's mean over --score_region
    calibrated: Optional[torch.Tensor] = None  # f(x_c), None without an intensity correction

    def reconstruction(self, name):
        """The batch's reconstruction called name (coarse, calibrated or refined)."""
        return {"coarse": self.coarse, "calibrated": self.calibrated, "refined": self.refined}[name]


def map_and_scores(x, reconstruction, region):
    """(anomaly map |x - reconstruction| / 2 with channels averaged (N, H, W), slice scores (float64 (N,)) over
    `region` (--score_region, metrics.slice_scores))."""
    anomaly_map = (x - reconstruction).abs().mean(dim=1) / 2
    return anomaly_map, metrics.slice_scores(x.mean(dim=1).float().cpu(), anomaly_map.float().cpu(), region)


@torch.inference_mode()
def score_batch(runtime, networks, x, names, index):
    """The ScoredBatch of slices x (on runtime.device); their file names seed the refiner noise per slice."""
    c = networks.config
    noises = () if networks.refiner is None else [slice_noise(names, x.shape[1:], c.seed + k)
                                                  for k in range(c.refiner_samples)]
    coarse, refined = reconstruct(runtime, c, x, networks.generator, networks.refiner, noises)
    calibrated = None if networks.correction is None else networks.correction(coarse)
    batch = ScoredBatch(np.asarray(index), x, coarse, refined, None, None, calibrated)
    anomaly_map, scores = map_and_scores(x, batch.reconstruction(networks.reconstruction), c.score_region)
    return batch._replace(anomaly_map=anomaly_map, scores=scores)


@torch.inference_mode()
def scored_batches(runtime, networks, paths):
    """Score the slices of `paths` with networks (scoring_networks.ScoringNetworks), one ScoredBatch at a time: all of
    them in one process, this rank's whole batches under torchrun (ScoredBatch.index is a position in `paths`)."""
    c = networks.config
    if runtime.world_size > 1:
        mine = np.asarray(distributed.batch_shard(len(paths), c.score_batch_size), dtype=np.int64)
        loader = data_loader.scoring_loader([paths[i] for i in mine], c.image_size, c.score_batch_size,
                                            **runtime.loader_options)
    else:
        loader = data_loader.scoring_loader(paths, c.image_size, c.score_batch_size, **runtime.loader_options)
    for x, index in tqdm(loader, desc="scoring", unit="batch", leave=False, disable=not runtime.is_main):
        if runtime.world_size > 1:
            index = torch.from_numpy(mine[index.numpy()])
        x = x.to(runtime.device, non_blocking=True)
        yield score_batch(runtime, networks, x, [paths[i] for i in index], index.numpy())


def anomaly_maps(runtime, networks):
    """volume_scoring's model: (batch (N, C, S, S) in [-1, 1], slice file names) -> (N, S, S) anomaly maps on the
    CPU, scored as score_batch scores a slice PNG of that name (same reconstruction, same per-slice noise)."""
    def maps(x, names):
        x = x.to(runtime.device)
        return score_batch(runtime, networks, x, names, np.arange(len(names))).anomaly_map.cpu()
    return maps


@torch.inference_mode()
def score_slices(runtime, networks, paths, consumers=()):
    """Slice scores of `paths`, in their order; every consumer is called with every ScoredBatch (under torchrun:
    this rank's), then with merge_ranks() where it has one. The scores are all the slices' on every rank."""
    scores = np.empty(len(paths))
    scored = []
    for batch in scored_batches(runtime, networks, paths):
        scores[batch.index] = batch.scores
        scored.append(batch.index)
        for consume in consumers:
            consume(batch)
    if runtime.world_size > 1:
        mine = np.concatenate(scored) if scored else np.zeros(0, dtype=np.int64)
        scores = distributed.gather_by_index(mine, scores[mine], len(paths))
        for consume in consumers:
            if hasattr(consume, "merge_ranks"):
                consume.merge_ranks()
    return scores


class ReconstructionScores:
    """Consumer: each slice's score with another reconstruction (coarse or calibrated) beside the ones
    score_slices returns (one pass scores all); `scores` holds all the slices' on every rank after merge_ranks."""

    def __init__(self, n_slices, region, reconstruction="coarse"):
        self.scores, self.region, self.reconstruction, self.mine = np.zeros(n_slices), region, reconstruction, []

    def __call__(self, batch):
        self.scores[batch.index] = map_and_scores(batch.x, batch.reconstruction(self.reconstruction), self.region)[1]
        self.mine.append(batch.index)

    def merge_ranks(self):
        mine = np.concatenate(self.mine) if self.mine else np.zeros(0, dtype=np.int64)
        self.scores = distributed.gather_by_index(mine, self.scores[mine], len(self.scores))


def pixel_metrics_consumer(pixel_metrics, paths, image_dir, image_size):
    """Adds each slice's anomaly map to pixel_metrics (metrics.PixelMetrics) where the slice has an anomaly mask,
    counting the pixels inside its brain mask, or inside the head (metrics.head_region, as the slice score) where
    it has none. consume.regions counts the slices of each region ({"brain mask": n, "head": n})."""
    regions = np.zeros(2, dtype=np.int64)  # slices counted inside a brain mask, inside the head

    def consume(batch):
        for row, i in enumerate(batch.index.tolist()):
            masks = slice_files.ground_truth_masks(image_dir, paths[i], image_size)
            if masks is None:
                continue
            anomaly_mask, brain_mask = masks
            if brain_mask is not None:
                region = brain_mask
                regions[0] += 1
            else:
                region = metrics.head_region(batch.x[row].mean(dim=0).float().cpu().numpy())
                regions[1] += 1
            pixel_metrics.update(batch.anomaly_map[row].float().cpu().numpy(), anomaly_mask, region)
    consume.merge_ranks = lambda: distributed.sum_arrays(pixel_metrics.positive, pixel_metrics.negative, regions)
    consume.regions = lambda: {"brain mask": int(regions[0]), "head": int(regions[1])}
    return consume


MAP_SCALE_PERCENTILE = 99.0


class HealthyMapScale:
    """Consumer: a histogram of the anomaly-map values inside the head over the slices labelled 0 (the known-healthy
    set in AUCp); `scale()` is their 99th percentile, the top of the colour scale of every panel of the run."""

    bins = 4096

    def __init__(self, labels):
        self.is_healthy = np.asarray(labels) == 0
        self.histogram = np.zeros(self.bins, dtype=np.int64)

    def __call__(self, batch):
        rows = self.is_healthy[batch.index]
        if rows.any():
            head = batch.x[rows].mean(dim=1) > metrics.HEAD_LEVEL
            values = batch.anomaly_map[rows][head].float().clamp(0, 1).cpu().numpy()
            self.histogram += np.histogram(values, bins=self.bins, range=(0, 1))[0]

    def merge_ranks(self):
        """Every rank's counts added up (integers: the scale is the one-process scale)."""
        distributed.sum_arrays(self.histogram)

    def scale(self):
        cumulative = np.cumsum(self.histogram)
        if cumulative[-1] == 0:
            return 1.0
        upper = np.searchsorted(cumulative, MAP_SCALE_PERCENTILE / 100 * cumulative[-1]) + 1
        return float(max(upper / self.bins, 1 / self.bins))


class AnomalyPanels:
    """Consumer: keeps the first `per_class` slices of each label (labels None: of all); `write(map_scale)` then
    draws their panels, once the run's colour scale is known."""

    def __init__(self, paths, labels, label_names, maps_dir, per_class, image_dir, image_size):
        self.paths, self.labels, self.label_names = paths, labels, label_names
        self.maps_dir, self.image_dir, self.image_size = maps_dir, image_dir, image_size
        by_label = {}
        for index, label in enumerate(labels if labels is not None else [None] * len(paths)):
            by_label.setdefault(label, []).append(index)
        self.to_save = {i for indices in by_label.values() for i in indices[:per_class]}
        self.kept = []

    def __call__(self, batch):
        for row, i in enumerate(batch.index.tolist()):
            if i in self.to_save:
                self.kept.append((i, batch.x[row, 0].cpu().numpy(), batch.coarse[row, 0].cpu().numpy(),
                                  None if batch.refined is None else batch.refined[row, 0].cpu().numpy(),
                                  batch.anomaly_map[row].cpu().numpy(), batch.scores[row]))

    def merge_ranks(self):
        """Every rank's kept slices, in slice order (rank 0 writes them)."""
        self.kept = sorted((kept for part in distributed.all_gather(self.kept) for kept in part), key=lambda k: k[0])

    def write(self, map_scale):
        """Draw the kept panels (rank 0 alone: under torchrun merge_ranks has handed it every rank's)."""
        if not distributed.is_main():
            return
        for i, x, coarse, refined, anomaly_map, score in self.kept:
            masks = slice_files.ground_truth_masks(self.image_dir, self.paths[i], self.image_size)
            name = os.path.splitext(os.path.basename(self.paths[i]))[0]
            prefix = "" if self.labels is None else f"{self.label_names[self.labels[i]].replace(' ', '_')}_"
            visualize.save_anomaly_panel(
                x, coarse, anomaly_map, os.path.join(self.maps_dir, f"{prefix}{name}.png"),
                title=f"{os.path.basename(self.paths[i])}  score {score:.4f}", refined=refined,
                mask=None if masks is None else masks[0], map_scale=map_scale)
