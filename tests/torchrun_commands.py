"""Several main.py commands in one torchrun launch (the tests start the ranks once, not once per command):
    python -m torch.distributed.run --standalone --nproc_per_node N tests/torchrun_commands.py JSON
JSON: a list of main.py argument lists, run in order by every rank in the one process group; the first one that
fails ends the launch with its exit status."""
import json
import sys

import main
from brainomaly import distributed

if __name__ == "__main__":
    distributed.init("cpu")  # main.main sees the group and leaves it open for the next command
    try:
        for argv in json.loads(sys.argv[1]):
            status = main.main(argv)
            if status != 0:
                sys.exit(status)
    finally:
        distributed.close()
