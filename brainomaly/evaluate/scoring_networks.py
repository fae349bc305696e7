"""What scoring needs of stage-1 checkpoint ITER, loaded together: the networks (networks.py), the intensity
correction f fitted for it (intensity_correction.py) and the reconstruction --refiner makes the scores use
(decisions.scored_reconstruction)."""
from typing import NamedTuple, Optional

import torch

from brainomaly.evaluate import intensity_correction
from brainomaly.run.networks import load_generator, load_refiner
from diffusion_refiner import ResidualDiffusion


class ScoringNetworks(NamedTuple):
    """What scoring needs of checkpoint ITER: G, the refiner (None: score without it), the intensity correction f
    (scores with f(x_c) are computed beside the others), the matching config, and the reconstruction the anomaly
    maps and scores use: refined (x_r), calibrated (f(x_c)) or coarse (x_c)."""
    iteration: int
    generator: torch.nn.Module
    refiner: Optional[ResidualDiffusion]
    config: object  # the caller's config with the checkpoints' architecture
    training_config: dict  # the config stage 1 was trained with (its image_dir holds the known-healthy set)
    correction: Optional[intensity_correction.IntensityCorrection] = None
    scoring_with: Optional[str] = None  # None: refined with a refiner, else coarse

    @property
    def reconstruction(self):
        """The reconstruction the anomaly maps and scores use: refined, calibrated or coarse."""
        return self.scoring_with or ("coarse" if self.refiner is None else "refined")


def load_for_scoring(runtime, config, iteration):
    """ScoringNetworks of checkpoint ITER: G, the refiner --refiner asks for, and f (fitted once, then read)."""
    generator, config, training_config = load_generator(runtime, config, iteration)
    refiner, config, reconstruction = load_refiner(runtime, config, iteration)
    correction = intensity_correction.for_checkpoint(runtime, config, iteration, generator, training_config)
    return ScoringNetworks(iteration, generator, refiner, config, training_config, correction, reconstruction)
