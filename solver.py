"""Solver: picks the device and precision once, then hands --mode to the module that does that job:
brainomaly/train/stage1_gan.py (Brainomaly GAN), stage2_refiner.py (residual diffusion refiner),
brainomaly/evaluate/checkpoint_selection.py (the protocols inductive, transductive and AUCp at one checkpoint or
all, scored through scoring.py) and score_folder.py (new scans). Training holds the run folder's lock (run_lock)
while it runs."""
import contextlib

import torch

from brainomaly import distributed, seeds
from brainomaly.data import dataset_check
from brainomaly.errors import UserError
from brainomaly.evaluate import checkpoint_selection, score_folder
from brainomaly.run import run_lock
from brainomaly.run.settings import replace_config
from brainomaly.train import fast_path_selection, stage1_gan, stage2_refiner
from brainomaly.train.fast_path_selection import compile_module, keep_freed_memory


def pick_device(choice):
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA device.\n"
                        "Fix: use --device cpu or auto, or install a CUDA build of PyTorch.")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    # under torchrun distributed.init has made this rank's GPU (LOCAL_RANK) the current one
    return torch.device("cuda", torch.cuda.current_device()) if choice == "cuda" else torch.device(choice)


class Runtime:
    """Where and how the networks run: the device, the fast path (bf16 autocast and memory format, settled by
    settle_fast_path), compilation (--compile, --compile_backend), loader options, the training streams' options
    (--preload_on_device), and this process's place among the torchrun ranks (rank, world_size; is_main: the one
    that writes files)."""

    def __init__(self, config):
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self.device = pick_device(config.device)
        # until settle_fast_path: what the switches force, auto as plain fp32 NCHW (bf16 on CUDA)
        bf16, channels_last = fast_path_selection.switch(config.bf16), fast_path_selection.switch(config.channels_last)
        self.autocast_dtype = torch.bfloat16 if bf16 == "on" or (bf16 == "auto" and self.device.type == "cuda") else None
        self.channels_last = channels_last == "on"
        self.fast_path = None
        self.compile = config.compile
        self.compile_backend = getattr(config, "compile_backend", "inductor")
        self.loader_options = {"num_workers": config.num_workers, "pin_memory": self.device.type == "cuda"}
        self.preload_device = self.device if getattr(config, "preload_on_device", False) else None

    def settle_fast_path(self, config, saved=None):
        """Decide bf16 and channels_last once per process (brainomaly/train/fast_path_selection.py): take the run's
        choice from `saved` (a checkpoint's or config.json's config) where it has one, else resolve it (a CPU probe,
        cached in --model_save_dir). Prints the choice and why once; returns config with it as config.fast_path, for
        config.json and the checkpoints. Call it before the networks are built."""
        if self.fast_path is None:
            note = None
            if saved and saved.get("fast_path"):
                fast_path, note = fast_path_selection.adopt(config, self.device, saved["fast_path"])
            elif self.world_size > 1 and self.device.type == "cpu":
                # rank 0 alone probes (timing ranks that share the cores would disagree); all take its choice
                fast_path = distributed.broadcast(
                    fast_path_selection.resolve(config, self.device, config.model_save_dir) if self.is_main else None)
            else:
                fast_path = fast_path_selection.resolve(config, self.device, config.model_save_dir, writes=self.is_main)
            self.fast_path = fast_path
            self.autocast_dtype = torch.bfloat16 if fast_path["bf16"] else None
            self.channels_last = fast_path["channels_last"]
            if note:
                distributed.main_print(note)
            distributed.main_print(fast_path_selection.summary(fast_path))
        return replace_config(config, fast_path=self.fast_path)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def prepare(self, network):
        network = network.to(self.device)
        if self.channels_last:
            network = network.to(memory_format=torch.channels_last)
        return network

    def compiled(self, network):
        return compile_module(network, self)  # reads .compile and .compile_backend

    def wrapped(self, network):
        """The network in DistributedDataParallel under torchrun (itself for one process), compiled if asked."""
        return self.compiled(distributed.wrap(network, self.device))

    def stream_options(self):
        """Loader options plus this rank's shard and where preloaded slices live, for data_loader.training_stream."""
        return {**self.loader_options, "rank": self.rank, "world_size": self.world_size,
                "preload_device": self.preload_device}


class Solver:
    def __init__(self, config):
        self.config = config
        self.runtime = Runtime(config)
        seeds.seed_weights(config.seed)
        if self.runtime.device.type == "cpu" and getattr(config, "keep_freed_memory", False):
            keep_freed_memory()  # process-wide glibc heap setting (--keep_freed_memory, on by default)
        if self.runtime.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def run(self):
        mode, config, runtime = self.config.mode, self.config, self.runtime
        if mode == "train":
            with run_lock.one_trainer(config.run_dir):  # one training job per run folder
                stage1_gan.train(runtime, config)
        elif mode == "train_refiner":
            with run_lock.one_trainer(config.run_dir):
                stage2_refiner.train_refiner(runtime, config)
        elif mode.startswith("test_"):
            checkpoint_selection.test(runtime, config, mode[len("test_"):])
        elif mode == "score":
            score_folder.score_folder(runtime, config)
        elif mode == "check_data":
            dataset_check.check_dataset(config.image_dir, config.batch_size, full=True,
                                        healthy_holdout=config.healthy_holdout, seed=config.seed)
