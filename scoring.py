"""Scoring, one path for every protocol and for score mode: each slice's healthy reconstruction (coarse
x_c = tanh(x + G(x)), refined x_r = x_c + r_hat when a refiner is loaded), its anomaly map |x - x_r| / 2 and
its slice score, the map's mean, in [0, 1].

scored_batches yields what scoring computes, batch by batch; score_slices collects the slice scores and hands
each batch to consumers, such as pixel_metrics_consumer and anomaly_panels below.
"""
import os
import zlib
from typing import NamedTuple, Optional

import numpy as np
import torch
from tqdm import tqdm

import data_loader
import visualize
from model import healthy_reconstruction


def slice_noise(paths, shape, seed):
    """DDIM start noise seeded per slice (seed + file name), so a slice's score does not depend on the batch,
    the order or the protocol it is scored in."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
        seed * 1_000_003 + zlib.crc32(os.path.basename(p).encode()))) for p in paths])


def reconstruct(runtime, config, x, generator, refiner=None, noise=None):
    """(coarse x_c = tanh(x + G(x)), refined x_r or None); noise = the refiner's DDIM start noise."""
    with runtime.autocast():
        coarse = healthy_reconstruction(x, generator(x)).float()
        if refiner is None:
            return coarse, None
        return coarse, refiner.refine(coarse, config.ddim_steps, noise=noise.to(x.device)).float()


class ScoredBatch(NamedTuple):
    index: np.ndarray  # positions of these slices in the scored list of paths
    x: torch.Tensor
    coarse: torch.Tensor
    refined: Optional[torch.Tensor]  # None when scoring with x_c alone
    anomaly_map: torch.Tensor  # |x - x_r| / 2, channels averaged: (batch, height, width)
    scores: np.ndarray  # slice scores (float64), the anomaly map's mean


@torch.inference_mode()
def scored_batches(runtime, networks, paths):
    """Score the slices of `paths` with networks (networks.ScoringNetworks), one ScoredBatch at a time."""
    c = networks.config
    loader = data_loader.scoring_loader(paths, c.image_size, c.score_batch_size, **runtime.loader_options)
    for x, index in tqdm(loader, desc="scoring", unit="batch", leave=False):
        x = x.to(runtime.device, non_blocking=True)
        noise = None if networks.refiner is None else slice_noise([paths[i] for i in index], x.shape[1:], c.seed)
        coarse, refined = reconstruct(runtime, c, x, networks.generator, networks.refiner, noise)
        reconstruction = coarse if refined is None else refined
        anomaly_map = (x - reconstruction).abs().mean(dim=1) / 2
        yield ScoredBatch(index.numpy(), x, coarse, refined, anomaly_map,
                          anomaly_map.mean(dim=(1, 2)).cpu().double().numpy())


@torch.inference_mode()
def score_slices(runtime, networks, paths, consumers=()):
    """Slice scores of `paths`, in their order; every consumer is called with every ScoredBatch."""
    scores = np.empty(len(paths))
    for batch in scored_batches(runtime, networks, paths):
        scores[batch.index] = batch.scores
        for consume in consumers:
            consume(batch)
    return scores


def pixel_metrics_consumer(pixel_metrics, paths, image_dir, image_size):
    """Adds each slice's anomaly map to pixel_metrics (metrics.PixelMetrics) where the slice has masks."""
    def consume(batch):
        for row, i in enumerate(batch.index.tolist()):
            masks = data_loader.ground_truth_masks(image_dir, paths[i], image_size)
            if masks is not None:
                pixel_metrics.update(batch.anomaly_map[row].cpu().numpy(), masks[0], masks[1])
    return consume


def anomaly_panels(paths, labels, label_names, maps_dir, per_class, image_dir, image_size):
    """Writes an anomaly-map panel for the first `per_class` slices of each label (labels None: of all)."""
    by_label = {}
    for index, label in enumerate(labels if labels is not None else [None] * len(paths)):
        by_label.setdefault(label, []).append(index)
    to_save = {i for indices in by_label.values() for i in indices[:per_class]}

    def consume(batch):
        for row, i in enumerate(batch.index.tolist()):
            if i not in to_save:
                continue
            masks = data_loader.ground_truth_masks(image_dir, paths[i], image_size)
            name = os.path.splitext(os.path.basename(paths[i]))[0]
            prefix = "" if labels is None else f"{label_names[labels[i]].replace(' ', '_')}_"
            visualize.save_anomaly_panel(
                batch.x[row, 0].cpu().numpy(), batch.coarse[row, 0].cpu().numpy(),
                batch.anomaly_map[row].cpu().numpy(), os.path.join(maps_dir, f"{prefix}{name}.png"),
                title=f"{os.path.basename(paths[i])}  score {batch.scores[row]:.4f}",
                refined=None if batch.refined is None else batch.refined[row, 0].cpu().numpy(),
                mask=None if masks is None else masks[0])
    return consume
