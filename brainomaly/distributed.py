"""Several processes (torchrun) as one training or scoring job: the process group, who writes, sharding, gathering.

Started by `torchrun --nproc_per_node N main.py ...` the environment holds RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address; started by plain `python main.py` there is one process and every helper here is a no-op.
NCCL on CUDA, gloo on CPU. Rank 0 alone writes files; every rank reads them.

A rank that stops on a UserError (a failed write on rank 0, say) ends every rank at once with its message: it
posts the message in the process group's key-value store, where a watch thread of every rank looks for one, instead
of leaving the others waiting in their next collective until it times out.
"""
import gc
import os
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

from brainomaly.errors import EXIT_USER_ERROR

FAILURE_KEY = "brainomaly/failure"  # the first failing rank's message
ENDED_KEY = "brainomaly/ended"  # how many ranks have printed it and ended
FAILURE_POLL_SECONDS = 0.2
_failing = False  # this process posted the failure: its own watch leaves the ending to it


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    """The one process that writes checkpoints, samples, logs and results, and prints progress."""
    return rank() == 0


def main_print(*args, **kwargs):
    if is_main():
        print(*args, **kwargs)


_noted = set()


def note_once(message):
    """main_print a note once per process: the same check runs for every protocol and scoring pass of a command."""
    if message not in _noted:
        _noted.add(message)
        main_print(message)


def init(device_choice="auto"):
    """Join the torchrun process group when launched by torchrun. True when this call started the group (its
    caller closes it); False without torchrun or when the group already exists (several commands in one launch)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_choice != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)  # before the group exists: NCCL binds each rank to its own GPU
    dist.init_process_group("nccl" if use_cuda else "gloo")
    threading.Thread(target=_watch_for_failure, args=(_store(),), daemon=True, name="failure-watch").start()
    return True


def _store():
    return dist.distributed_c10d._get_default_store()


def _watch_for_failure(store):
    """Every rank: end this process as soon as another rank has posted a failure (see end_every_rank)."""
    while True:
        time.sleep(FAILURE_POLL_SECONDS)
        try:
            if _failing or not store.check([FAILURE_KEY]):
                continue
            message = store.get(FAILURE_KEY).decode()
        except Exception:  # the group is gone (closed, or its host ended): nothing left to watch
            return
        _print_and_exit(store, message)


def _print_and_exit(store, message):
    _print_failure(store, message)
    os._exit(EXIT_USER_ERROR)  # not a normal exit: a collective this rank is blocked in would never return


def _print_failure(store, message):
    """Print the failure and count this rank among those that have."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    try:
        store.add(ENDED_KEY, 1)
    except Exception:  # the store's host has ended: nobody is left to count
        pass


def end_every_rank(message, wait_seconds=30):
    """Post this rank's UserError message, naming the rank (the first posted wins, so every rank prints the same
    line), let the other ranks print it and end, then end this one, exit status 2. Never returns."""
    global _failing
    _failing = True
    store = _store()
    if not store.check([FAILURE_KEY]):
        store.set(FAILURE_KEY, rank_prefix(message))
    # printed first: once any rank has exited, torchrun stops the others, this one too
    _print_failure(store, store.get(FAILURE_KEY).decode())
    deadline = time.time() + wait_seconds  # then the others print it and end before this one does
    while store.add(ENDED_KEY, 0) < world_size() and time.time() < deadline:
        time.sleep(FAILURE_POLL_SECONDS)
    os._exit(EXIT_USER_ERROR)


def failure_of_another_rank(wait_seconds=5):
    """The message another rank posted, or None: for an error that may only be the echo of its failure (a
    collective whose peer has ended), waited for a moment."""
    deadline = time.time() + wait_seconds
    try:
        store = _store()
        while time.time() < deadline:
            if store.check([FAILURE_KEY]):
                return store.get(FAILURE_KEY).decode()
            time.sleep(FAILURE_POLL_SECONDS)
    except Exception:
        return None
    return None


def end_with_failure_of_another_rank(message):
    """End this rank with the failure another rank posted (see failure_of_another_rank). Never returns."""
    _print_and_exit(_store(), message)


def close():
    if dist.is_initialized():
        gc.collect()  # free the DDP wrappers first: collected after the group is gone, their reducers spin forever
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def broadcast(value):
    """Rank 0's picklable value on every rank (a decision taken once, e.g. from files only rank 0 wrote)."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather(value):
    """Every rank's picklable value, in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def mean(tensor):
    """The mean over ranks of a tensor (a copy; the same on every rank)."""
    if not dist.is_initialized():
        return tensor.detach().clone()
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total / world_size()


def rank_slice(global_batch):
    """This rank's part of a batch drawn for all ranks at once: rows [rank*B, (rank+1)*B) of world*B rows.
    Drawing random numbers for the global batch and slicing keeps every rank's generator in step and makes
    N ranks x batch B see exactly what 1 process x batch N*B sees."""
    per_rank = global_batch.shape[0] // world_size()
    return global_batch[rank() * per_rank:(rank() + 1) * per_rank]


def batch_shard(n_items, batch_size):
    """Indices this rank scores: whole batches of the one-process order, batch b going to rank b % world.
    Every slice is scored in exactly the batch it has in one process, so the scores are bit-identical."""
    batches = range(rank(), (n_items + batch_size - 1) // batch_size, world_size())
    return [i for b in batches for i in range(b * batch_size, min((b + 1) * batch_size, n_items))]


def gather_by_index(indices, values, n_items):
    """Full array of n_items values from every rank's (indices, values) part, on every rank."""
    full = np.empty(n_items, dtype=np.asarray(values).dtype)
    for part_indices, part_values in all_gather((list(indices), np.asarray(values))):
        full[part_indices] = part_values
    return full


def sum_arrays(*arrays):
    """Sum numpy arrays (e.g. histogram counts) over ranks, in place."""
    if not dist.is_initialized():
        return
    parts = all_gather(arrays)
    for k, array in enumerate(arrays):
        array[...] = sum(part[k] for part in parts)


def wrap(network, device):
    """Network in DistributedDataParallel when there are several ranks (the same network otherwise)."""
    if world_size() == 1:
        return network
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=device_ids)


def unwrap(network):
    """The plain module inside a DDP (or torch.compile) wrapper: its state_dict keys carry no prefix."""
    network = getattr(network, "_orig_mod", network)
    return getattr(network, "module", network)


def rank_prefix(message):
    """A message that names the rank when there are several (torchrun interleaves their output)."""
    return f"[rank {rank()}] {message}" if world_size() > 1 else message
