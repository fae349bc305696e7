"""The intensity-corrected reconstruction f(x_c) (--refiner calibrate), label-free.

Stage 1's head tanh(x + map) reproduces each intensity with its own error (dark CSF comes out lighter, for
example), so |x - x_c| grows with how much of a slice is CSF: a score that counts CSF, not one that heals. f is
the monotone map from x_c to x that best undoes that on healthy brains: fitted on the known-healthy slices stage 1
trained on, inside the head, as the isotonic regression of x on x_c over BINS fine bins of x_c. Scoring with
|x - f(x_c)| / 2 removes every per-intensity error and keeps the generator's spatial changes (healing, and blur
at tissue edges). It is the cheapest correction of x_c, and the bar the diffusion refiner must clear.

A checkpoint's fit is kept in MODEL_DIR/ITER-intensity.json, so every protocol and score-mode run of that
checkpoint uses the same f.
"""
import json
import os
from typing import NamedTuple

import numpy as np
import torch
from sklearn.isotonic import IsotonicRegression
from tqdm import tqdm

import data_loader
from brainomaly import distributed, metrics
from brainomaly.data import healthy_split
from brainomaly.run import cache_keys, run_layout
from model import healthy_reconstruction

BINS = 256  # of x_c over [-1, 1]: a bin is 1/128 of the intensity range, finer than any tissue contrast


class IntensityCorrection(NamedTuple):
    """f as a piecewise-linear curve through (knots, values), constant beyond its ends."""
    knots: torch.Tensor   # mean x_c of each non-empty bin, ascending
    values: torch.Tensor  # f there, non-decreasing

    def __call__(self, coarse):
        """f(x_c), elementwise, in float32 on x_c's device."""
        knots, values = self.knots.to(coarse.device), self.values.to(coarse.device)
        if len(knots) == 1:
            return torch.full_like(coarse, float(values[0]))
        x = coarse.float().clamp(knots[0], knots[-1])
        right = torch.searchsorted(knots, x.contiguous()).clamp(1, len(knots) - 1)
        left = right - 1
        weight = (x - knots[left]) / (knots[right] - knots[left])
        return torch.lerp(values[left], values[right], weight)

    def to_json(self):
        return {"knots": self.knots.tolist(), "values": self.values.tolist()}

    @classmethod
    def from_json(cls, saved):
        return cls(torch.tensor(saved["knots"], dtype=torch.float32), torch.tensor(saved["values"], dtype=torch.float32))


class BinnedPairs:
    """Per bin of x_c: how many head pixels fell in it, and the sums of their x_c and x (float64)."""

    def __init__(self):
        self.count, self.sum_coarse, self.sum_x = np.zeros(BINS), np.zeros(BINS), np.zeros(BINS)

    def add(self, x, coarse):
        """x, coarse: (N, C, H, W) in [-1, 1]; only pixels inside the head (metrics.HEAD_LEVEL) count."""
        head = x.mean(dim=1) > metrics.HEAD_LEVEL
        xs = x.mean(dim=1)[head].double().cpu().numpy()
        cs = coarse.mean(dim=1)[head].double().cpu().numpy()
        bins = np.clip(((cs + 1) / 2 * BINS).astype(np.int64), 0, BINS - 1)
        self.count += np.bincount(bins, minlength=BINS)
        self.sum_coarse += np.bincount(bins, cs, minlength=BINS)
        self.sum_x += np.bincount(bins, xs, minlength=BINS)

    def fit(self):
        """The IntensityCorrection: isotonic (non-decreasing) regression of the bins' mean x on their mean x_c,
        each bin weighted by its pixel count."""
        used = self.count > 0
        if not used.any():
            raise ValueError("no head pixels to fit the intensity correction on")
        knots = self.sum_coarse[used] / self.count[used]
        means = self.sum_x[used] / self.count[used]
        values = IsotonicRegression(increasing=True).fit(knots, means, sample_weight=self.count[used]).predict(knots)
        return IntensityCorrection(torch.tensor(knots, dtype=torch.float32), torch.tensor(values, dtype=torch.float32))


def correction_path(model_dir, iteration):
    return os.path.join(model_dir, f"{iteration}-intensity.json")


@torch.inference_mode()
def fit_on_slices(runtime, generator, paths, image_size, batch_size):
    """Fit f on these slices' (x_c, x) head pixels, x_c = tanh(x + G(x)) as scoring computes it."""
    pairs = BinnedPairs()
    loader = data_loader.scoring_loader(paths, image_size, batch_size, **runtime.loader_options)
    for x, _ in tqdm(loader, desc="intensity correction", unit="batch", leave=False, disable=not runtime.is_main):
        x = x.to(runtime.device)
        with runtime.autocast():
            coarse = healthy_reconstruction(x, generator(x)).float()
        pairs.add(x.float(), coarse)
    return pairs.fit()


def for_checkpoint(runtime, config, iteration, generator, training_config):
    """The intensity correction of checkpoint ITER: read from MODEL_DIR/ITER-intensity.json, or fitted on the
    known-healthy slices stage 1 trained on (training_config's image_dir and --healthy_holdout) and saved there.
    Every rank fits the same f from the same slices, so none waits for another."""
    path = correction_path(config.model_save_dir, iteration)
    training_dir = healthy_split.training_data_dir(training_config, config.image_dir)
    trained_on = healthy_split.run_split(training_dir, training_config)[0]
    made_with = {**cache_keys.data_key(training_dir, trained_on), "bins": BINS,
                 **cache_keys.weights_key(config.model_save_dir, iteration)}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                saved = json.load(f)
            why = cache_keys.stale_reason(saved.get("made_with"), made_with)
            if why is None:
                return IntensityCorrection.from_json(saved)
            distributed.main_print(f"The intensity correction {path} is out of date ({why}): fitting it again.")
        except (ValueError, KeyError):  # a torn file (a write cut short): fit again, same slices, same f
            pass
    correction = fit_on_slices(runtime, generator, trained_on, config.image_size, config.score_batch_size)
    if runtime.is_main:
        run_layout.write_json({"checkpoint": iteration, "made_with": made_with,
                               "fitted_on": f"{len(trained_on)} known-healthy slices stage 1 trained on "
                                            f"({training_dir}/train/neg)", "bins": BINS,
                               **correction.to_json()}, path)
    return correction
