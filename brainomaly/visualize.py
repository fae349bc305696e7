"""Pictures of results, independent of the model: each function turns numbers or images into one PNG.

Every function creates the parent folder, writes the PNG atomically (atomic_files: a full disk is one clear
error, no partial file) and closes its figure, so long runs do not leak memory.
"""
import matplotlib

matplotlib.use("Agg")  # headless: training machines and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

from brainomaly.atomic_files import atomic_output  # noqa: E402

DPI = 100
PANEL_INCHES = 3.0  # one anomaly-panel column; the figure widens by this much per panel


def _save(fig, path, what="plot"):
    try:
        with atomic_output(path, what) as tmp:
            fig.savefig(tmp, dpi=DPI, format="png")  # no bbox_inches="tight": the pixel size stays figsize * DPI
    finally:
        plt.close(fig)


def save_roc_curve(labels, scores, path, title):
    """ROC curve with the AUC in the legend and the chance diagonal."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {roc_auc_score(labels, scores):.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="chance")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title=title,
           xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def save_score_histogram(labels, scores, threshold, path, title, label_names=("healthy", "diseased")):
    """Overlaid score histograms of the two classes on shared bins, with the decision threshold."""
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    bins = np.histogram_bin_edges(np.append(scores, threshold), bins=30)  # shared bins so bars compare
    fig, ax = plt.subplots(figsize=(6, 4))
    for value, name, color in zip((0, 1), label_names, ("tab:blue", "tab:red")):
        ax.hist(scores[labels == value], bins=bins, alpha=0.5, color=color,
                label=f"{name} (n={np.sum(labels == value)})")
    ax.axvline(threshold, color="black", ls="--", label=f"threshold = {threshold:.4g}")
    ax.set(xlabel="anomaly score", ylabel="patients", title=title)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def _as_2d(array, name):
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = array.mean(axis=0)  # channel-first grayscale (MRI slices are replicated to 3 channels)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D image (H, W), got shape {array.shape}")
    return array


def save_anomaly_panel(image, coarse, anomaly_map, path, title="", refined=None, mask=None, map_scale=1.0):
    """One row: input, coarse x_c, refined x_r (if given), anomaly map over the input, ground truth (if given).

    image, coarse and refined are in [-1, 1]; anomaly_map is in [0, 1] and shown on [0, map_scale], one scale
    for a whole run (scoring.healthy_map_scale: a high percentile of the known-healthy maps), so panels of
    different scans compare and a change above what healthy brains show stands out.
    """
    image = _as_2d(image, "image")
    panels = [("input", image), ("coarse $x_c$", _as_2d(coarse, "coarse"))]
    if refined is not None:
        panels.append(("refined $x_r$", _as_2d(refined, "refined")))
    anomaly_map = _as_2d(anomaly_map, "anomaly_map")
    mask = None if mask is None else _as_2d(mask, "mask") > 0.5
    n_panels = len(panels) + 1 + (mask is not None)
    fig, axes = plt.subplots(1, n_panels, figsize=(PANEL_INCHES * n_panels, PANEL_INCHES + 0.4))
    for ax, (name, picture) in zip(axes, panels):
        ax.imshow(picture, cmap="gray", vmin=-1, vmax=1)
        ax.set_title(name)
    ax = axes[len(panels)]
    ax.imshow(image, cmap="gray", vmin=-1, vmax=1)
    heat = ax.imshow(anomaly_map, cmap="jet", vmin=0, vmax=map_scale, alpha=0.5)
    fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title("anomaly map")
    if mask is not None:
        axes[-1].imshow(image, cmap="gray", vmin=-1, vmax=1)
        axes[-1].set_title("ground truth")
        for ax in axes[len(panels):]:  # the lesion outline on the heat map too, to judge overlap at a glance
            ax.contour(mask.astype(float), levels=[0.5], colors="magenta", linewidths=1)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def save_learning_curve(iterations, curves, path, title, intervals=None, picked=None):
    """Metric(s) against training iteration, on [0, 1] with the 0.5 chance line; None marks a missing value.
    intervals: {curve name: (lows, highs)} drawn as a band in the curve's colour (e.g. AUCp's bootstrap interval);
    picked: (iteration, curve name) marked with a ring (the label-free pick)."""
    intervals = intervals or {}
    for name, values in [*curves.items(), *((f"{k} (low)", v[0]) for k, v in intervals.items()),
                         *((f"{k} (high)", v[1]) for k, v in intervals.items())]:
        if len(values) != len(iterations):
            raise ValueError(f"curve {name!r} has {len(values)} values for {len(iterations)} iterations")
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, values in curves.items():
        present = [v for v in values if v is not None]
        style = {"marker": "*", "ms": 14, "ls": "none"} if len(present) == 1 else {"marker": "o", "ms": 3}
        line, = ax.plot(iterations, [np.nan if v is None else v for v in values], label=name, **style)
        if name in intervals:
            low, high = ([np.nan if v is None else v for v in bound] for bound in intervals[name])
            ax.fill_between(iterations, low, high, color=line.get_color(), alpha=0.15, lw=0)
        if picked is not None and picked[1] == name and picked[0] in iterations:
            ax.plot([picked[0]], [values[iterations.index(picked[0])]], marker="o", ms=12, mfc="none",
                    mec="black", ls="none", label="label-free pick")
    ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
    ax.set(ylim=(0, 1), xlabel="iteration", ylabel="value", title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the axes: the bands stay visible
    fig.tight_layout()
    _save(fig, path)


def normalise_per_image(x):
    """Min-max scale each image of a (B, C, H, W) batch to [-1, 1], e.g. an anomaly map before save_sample_grid."""
    flat = x.detach().flatten(1)
    low, high = flat.min(1, keepdim=True)[0], flat.max(1, keepdim=True)[0]
    scaled = (flat - low) / (high - low).clamp_min(1e-12)  # a constant map becomes all -1, not NaN
    return (scaled * 2 - 1).view_as(x)


def save_sample_grid(columns, path):
    """One PNG, one row per sample, columns side by side (e.g. input | map | reconstruction), each in [-1, 1].
    Columns of different lengths (a held-out split can leave fewer healthy samples than mixed ones) are cut to
    the shortest, so every row is complete. Returns the picture as a (C, H, W) tensor in [0, 1]."""
    columns = [c.detach().float().cpu() for c in columns]
    rows = min(c.shape[0] for c in columns)
    channels = max(c.shape[1] for c in columns)
    row = torch.cat([c[:rows].expand(-1, channels, -1, -1) for c in columns], dim=3)  # widths add up per row
    grid = ((row + 1) / 2).clamp(0, 1)
    with atomic_output(path, "sample grid") as tmp:
        save_image(grid, tmp, nrow=1, padding=0, format="png")
    return torch.cat(list(grid), dim=1)  # (C, rows x H, W): the picture as written, for TensorBoard


def save_overlay_montage(panels, path, title, threshold, aspect=1.0, label="anomaly"):
    """Scan levels side by side: the scan in gray, the map above `threshold` in a hot colormap, one colorbar.

    panels: [(name, scan in [0, 1], map)] of display images; aspect = row mm / column mm of a pixel.
    """
    top = max(float(max(np.max(m) for _, _, m in panels)), threshold + 1e-6)
    fig, axes = plt.subplots(1, len(panels), figsize=(PANEL_INCHES * len(panels) + 1.0, PANEL_INCHES + 0.6),
                             squeeze=False)
    heat = None
    for ax, (name, scan, anomaly_map) in zip(axes[0], panels):
        ax.imshow(scan, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        shown = np.ma.masked_less_equal(np.asarray(anomaly_map, dtype=np.float64), threshold)
        heat = ax.imshow(shown, cmap="hot", vmin=threshold, vmax=top, aspect=aspect, alpha=0.8,
                         interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    colorbar = fig.colorbar(heat, ax=list(axes[0]), fraction=0.02, pad=0.01)
    colorbar.set_label(f"{label} (shown above {threshold:.3g})")
    fig.suptitle(title)
    _save(fig, path)


def read_png(path):
    """A PNG this module wrote as a (C, H, W) float array in [0, 1], RGB (alpha dropped)."""
    from PIL import Image
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
