"""python baseline.py data/NAME: the CSF-fraction baseline, the one-number score the method must beat
(brainomaly/evaluate/baseline.py)."""
import sys

from brainomaly.evaluate.baseline import main

if __name__ == "__main__":
    sys.exit(main())
