"""python report.py --image_dir data/NAME --run_dir runs/NAME --iteration ITER: the results table and the
figures of a run (brainomaly/evaluate/report.py)."""
import sys

from brainomaly.evaluate.report import main

if __name__ == "__main__":
    sys.exit(main())
