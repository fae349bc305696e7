"""Brain-mask Dice, time and memory of `prepare_data.py preprocess` on a synthetic 1 mm head with a skull-like shell
(tests/synthetic_head.py: the MNI152 brain shipped in nilearn, moved by a known transform, so its true brain mask
is known). No real T1 scan with its skull ships in the installed packages, so this is what can be measured here.

    python bench/preprocess_dice.py make OUT        # writes OUT/sub-head.nii.gz and OUT/sub-head_truth.nii.gz
    /usr/bin/time -v python prepare_data.py preprocess OUT/sub-head.nii.gz --out OUT/prep   # time and peak RSS
    python bench/preprocess_dice.py dice OUT        # Dice of OUT/prep/sub-head_brain_mask.nii.gz against the truth
"""
import argparse
import os
import sys

import nibabel as nib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from synthetic_head import dice, synthetic_head  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("make", "dice"))
    parser.add_argument("out", help="working folder")
    parser.add_argument("--voxel_mm", type=float, default=1.0, help="scanner voxel size of the synthetic head")
    args = parser.parse_args(argv)
    head, truth = os.path.join(args.out, "sub-head.nii.gz"), os.path.join(args.out, "sub-head_truth.nii.gz")
    if args.step == "make":
        os.makedirs(args.out, exist_ok=True)
        image, mask = synthetic_head(resolution=1, voxel_mm=args.voxel_mm)
        nib.save(image, head)
        nib.save(mask, truth)
        print(f"wrote {head} {image.shape} {nib.aff2axcodes(image.affine)} and {truth}")
    else:
        found = nib.load(os.path.join(args.out, "prep", "sub-head_brain_mask.nii.gz")).get_fdata()
        print(f"brain-mask Dice against the known brain: {dice(found, nib.load(truth).get_fdata()):.4f}")


if __name__ == "__main__":
    main()
