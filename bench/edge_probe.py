"""Does a stage-1 generator's map follow where the head sits in the frame? The known-healthy test slices (test/neg),
moved up and down by a few pixels (background coming in, as the shift augmentation fills), scored by the coarse
anomaly map |x - x_c| / 2 in three parts of the head: its 4 rows nearest the top and the bottom of the frame, and the
rest. A map that only looks at the brain gives the same edge values at every shift; one that reads the frame's
border (zero padding) changes them as the head nears or leaves it.

Usage: python bench/edge_probe.py RUN_DIR ITERATION DATA_DIR [--shifts 0 4 8] [--json OUT]"""
import argparse
import glob
import json
import os
import sys
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

import data_loader
from brainomaly.data import slice_files  # noqa: E402
from brainomaly.metrics import HEAD_LEVEL  # noqa: E402
from brainomaly.run import checkpoint as ckpt  # noqa: E402
from brainomaly.run.networks import stage1_generator  # noqa: E402
from model import healthy_reconstruction  # noqa: E402

EDGE_ROWS = 4


def edge_errors(generator, x):
    """Mean anomaly map in the head's EDGE_ROWS rows nearest the top and the bottom of the frame, and elsewhere."""
    with torch.no_grad():
        maps = torch.cat([(b - healthy_reconstruction(b, generator(b))).abs().mean(1) / 2 for b in x.split(64)])
    head = x.mean(1) > HEAD_LEVEL
    rows = torch.arange(x.shape[-2])[None, :, None].expand_as(head)
    lowest = torch.where(head, rows, -1).amax(dim=(1, 2))[:, None, None]
    highest = torch.where(head, rows, x.shape[-2]).amin(dim=(1, 2))[:, None, None]
    bottom, top = head & (rows > lowest - EDGE_ROWS), head & (rows < highest + EDGE_ROWS)
    inner = head & ~bottom & ~top
    return {name: maps[region].mean().item() for name, region in (("top", top), ("bottom", bottom), ("inner", inner))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("iteration", type=int)
    p.add_argument("data_dir")
    p.add_argument("--shifts", type=int, nargs="+", default=[0, 4, 8], help="pixels moved (down and up)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    saved = ckpt.load(ckpt.checkpoint_path(os.path.join(args.run_dir, "models"), args.iteration, "G"))
    config = SimpleNamespace(**saved["config"])
    generator = stage1_generator(config).eval()
    generator.load_state_dict(saved["state_dict"])
    paths = sorted(glob.glob(os.path.join(args.data_dir, "test", "neg", "*.png")))
    x = torch.stack([slice_files.load_slice(path, config.image_size) for path in paths])
    rows = []
    for shift in sorted({s * sign for s in args.shifts for sign in (1, -1)}):
        moved = data_loader.shifted(x, [(shift, 0)] * len(x), max(abs(s) for s in args.shifts))
        rows.append({"shift": shift, **edge_errors(generator, moved)})
    padding = getattr(config, "g_padding", "zeros")
    print(f"{args.run_dir} at {args.iteration} (--g_padding {padding}), {len(paths)} healthy test slices")
    print("shift (px, + = down)   top edge   bottom edge   inner")
    for r in rows:
        print(f"{r['shift']:>+8d}            {r['top']:.4f}     {r['bottom']:.4f}      {r['inner']:.4f}")
    # how much the edges' error changes with the position: the spread of each edge's value over the shifts
    spread = {edge: max(r[edge] for r in rows) - min(r[edge] for r in rows) for edge in ("top", "bottom", "inner")}
    print(f"spread over the shifts: top {spread['top']:.4f}, bottom {spread['bottom']:.4f}, inner {spread['inner']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": args.run_dir, "iteration": args.iteration, "g_padding": padding, "rows": rows,
                       "spread": spread}, f, indent=1)


if __name__ == "__main__":
    main()
