"""The run's random streams, each seeded from --seed by name, so that every stage draws the same numbers when it
continues a run (on resume, or as stage 2 in a new process) as in one uninterrupted run."""
import torch

# stream -> offset from --seed (the values are the ones runs have always used: changing one changes every run)
OFFSETS = {
    "weights": 0,  # the networks' initial weights (the global torch generator)
    "mixed_set": 0,  # stage 1's mixed-set batches (order, flips, shifts)
    "healthy_set": 1,  # stage 1's known-healthy batches
    "gradient_penalty": 2,  # WGAN-GP interpolation weights
    "refiner_healthy_set": 3,  # stage 2's known-healthy batches
    "refiner_noise": 4,  # stage 2's diffusion timesteps and noise
    "healthy_holdout": 5,  # which known-healthy patients a new run holds out
    "diff_augment": 6,  # stage 1's critic augmentation (--diffaug)
}


def seed(config_seed, stream):
    return config_seed + OFFSETS[stream]


def seed_weights(config_seed):
    """Seed the global generator the networks initialise from with the run's --seed (taken from the run on a
    resume or in stage 2, which the process's first seeding, from the command line, cannot know)."""
    torch.manual_seed(seed(config_seed, "weights"))
