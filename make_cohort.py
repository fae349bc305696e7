"""python make_cohort.py data/NAME [--help]: the synthetic cohort, healthy and diseased T1 slices with masks, built
from the MNI152 template (brainomaly/data/synthetic_cohort.py)."""
import sys

from brainomaly.data.synthetic_cohort import main

if __name__ == "__main__":
    sys.exit(main())
