"""python prepare_data.py nifti | bids | preprocess | kaggle | csv --help: NIfTI volumes, BIDS trees, the
Kaggle tree or a split CSV become the dataset layout the trainer reads (brainomaly/data/prepare_command.py)."""
import sys

from brainomaly.data.prepare_command import main

if __name__ == "__main__":
    sys.exit(main())
