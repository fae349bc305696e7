"""Draws assets/architecture.png (python assets/make_architecture.py)."""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

fig, ax = plt.subplots(figsize=(13, 5.2), dpi=100)
ax.set_xlim(0, 13); ax.set_ylim(0, 5.2); ax.axis("off")

def box(x, y, w, h, text, color):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05,rounding_size=0.12", fc=color, ec="#333", lw=1.2))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9.5)

def arrow(x0, y0, x1, y1, text=""):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", lw=1.4, color="#333"))
    if text:
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.15, text, ha="center", fontsize=8.5, color="#333")

ax.text(0.1, 4.95, "Stage 1: Brainomaly GAN (WGAN-GP)", fontsize=11, weight="bold")
box(0.1, 3.3, 1.7, 1.1, "input slice x\n(mixed set M or\nknown-healthy H)", "#e8eef7")
box(2.4, 3.3, 2.1, 1.1, "Generator G\nencoder, 6 res. blocks,\ndecoder -> map M", "#cfe0f5")
box(5.1, 3.3, 1.9, 1.1, "coarse healthy\nx_c = tanh(x + M)", "#dff0d8")
box(7.6, 3.9, 2.3, 0.9, "PatchGAN critic D\nreal = H, fake = x_c(M)", "#f5e1cf")
box(7.6, 2.8, 2.3, 0.8, "identity L1 on H:\n|x_H - x_c(H)|", "#f5e1cf")
arrow(1.8, 3.85, 2.4, 3.85); arrow(4.5, 3.85, 5.1, 3.85); arrow(7.0, 4.0, 7.6, 4.3); arrow(7.0, 3.6, 7.6, 3.2)

ax.text(0.1, 2.25, "Stage 2: attention-based residual diffusion refiner (G frozen)", fontsize=11, weight="bold")
box(0.1, 0.5, 2.2, 1.3, "train on H only:\nr0 = x - x_c\n(the GAN's artifacts)", "#e8eef7")
box(2.9, 0.5, 2.6, 1.3, "UNet (v-prediction)\ninput [r_t, x_c], time emb.,\nres. blocks + skips,\nself-attention at low res.", "#cfe0f5")
box(6.1, 0.5, 2.4, 1.3, "DDIM (eta = 0), S steps\nfrom seeded noise\n-> residual r_hat", "#dff0d8")
box(8.9, 0.5, 2.1, 1.3, "refined x_r =\nclamp(x_c + r_hat)", "#dff0d8")
arrow(2.3, 1.15, 2.9, 1.15); arrow(5.5, 1.15, 6.1, 1.15); arrow(8.5, 1.15, 8.9, 1.15)
arrow(6.05, 3.3, 4.2, 1.8, "x_c")

box(11.2, 2.2, 1.7, 2.0, "anomaly map\n|x - x_r| / 2\n\nslice score = mean\npatient score =\nmean of slices", "#f7d9d9")
arrow(10.9, 1.4, 11.6, 2.2)
arrow(9.95, 4.35, 11.5, 4.2); ax.text(10.0, 4.6, "AUCp over checkpoints\npicks ITER (no labels)", fontsize=8.5)
fig.savefig(os.path.join(os.path.dirname(os.path.abspath(__file__)), "architecture.png"), bbox_inches="tight")
