"""What a cached result was computed from, so that a cache read with other settings or other weights is computed
again instead of being used silently.

A cache (the known-healthy reference behind score mode's threshold and every panel's colour scale, a checkpoint's
intensity correction) stores the key of what made it under "made_with"; a reader compares it with the key of what
it would compute now. Every key names the data too (data_key): the resolved dataset folder and the patients scored,
so a result computed on another dataset is never taken for the run's own."""
import hashlib
import os

from brainomaly.data.dataset_layout import patient_id
from brainomaly.run import checkpoint as ckpt


def file_fingerprint(path):
    """A short hash of a checkpoint file's bytes: a replaced checkpoint gets another one."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def weights_key(model_dir, iteration, parts=("G",)):
    return {f"{part}_weights": file_fingerprint(ckpt.checkpoint_path(model_dir, iteration, part)) for part in parts}


def data_key(folder, paths):
    """{"data": the resolved dataset folder, its number of patients among `paths` and a hash of their ids}: the data a
    result was computed on (a moved or another dataset, or other patients, give another key)."""
    patients = sorted({patient_id(p) for p in paths})
    digest = hashlib.sha256("\n".join(patients).encode()).hexdigest()[:12]
    return {"data": f"{os.path.realpath(folder)} ({len(patients)} patients, ids {digest})"}


def scoring_key(networks, paths):
    """What the scores of these networks (scoring_networks.ScoringNetworks) on the slices `paths` of
    networks.config.image_dir depend on: the data, the reconstruction, the score region, the weights, and for the
    refined one its sampling (steps, samples, seed)."""
    c = networks.config
    key = {**data_key(c.image_dir, paths), "reconstruction": networks.reconstruction, "score_region": c.score_region}
    if networks.reconstruction == "refined":
        key.update(ddim_steps=c.ddim_steps, refiner_samples=c.refiner_samples, seed=c.seed)
    return {**key, **weights_key(c.model_save_dir, networks.iteration,
                                 ("G", "R") if networks.reconstruction == "refined" else ("G",))}


def stale_reason(saved, key):
    """None when a cache's saved key is the key now, else why not, in words (the first differences)."""
    if saved is None:
        return "it records nothing of what it was computed from"
    if "data" in key and "data" not in saved:  # written before caches recorded their data
        return "it does not record the data it was computed on"
    differences = [f"{name} {saved.get(name)} (now {value})" for name, value in key.items() if saved.get(name) != value]
    return None if not differences else "it was computed with " + ", ".join(differences[:3])
