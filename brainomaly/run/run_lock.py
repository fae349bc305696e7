"""One training job per run folder: while stage 1 or stage 2 trains, RUN_DIR/training.lock holds an OS file lock
(fcntl.flock) with the holder's process id written in it. A second training job on the same folder (a requeued
job while the old one still runs, a command started twice) stops at once instead of writing checkpoints between
the first one's. The kernel drops the lock when the holding process ends in any way, SIGKILL included, so a killed
job never leaves a stale lock behind. Protocols and score mode take no lock: they read finished checkpoints only.
Under torchrun rank 0 holds the lock and tells the other ranks whether it got it."""
import contextlib
import fcntl
import os

from brainomaly import distributed
from brainomaly.errors import UserError

LOCK_NAME = "training.lock"


def lock_path(run_dir):
    return os.path.join(run_dir, LOCK_NAME)


def acquire(run_dir):
    """The open lock file of run_dir, locked by this process; a UserError naming the folder and the process id
    holding it when another process has it."""
    path = lock_path(run_dir)
    lock_file = open(path, "a+")  # never truncated before the lock is ours: it holds the holder's id
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise UserError(f"another training job (process id {holder}) is training in the run folder {run_dir} "
                        f"(it holds {path}); two jobs would write their checkpoints between each other's.\n"
                        f"Fix: wait for it to end (or stop it: kill {holder}), then rerun with --resume_iters "
                        f"latest; or train into another --run_dir.") from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    return lock_file


@contextlib.contextmanager
def one_trainer(run_dir):
    """Hold run_dir's training lock for the block (rank 0; every rank stops when it is refused)."""
    created = not os.path.isdir(run_dir)
    lock_file, refusal = None, None
    if distributed.is_main():
        os.makedirs(run_dir, exist_ok=True)
        try:
            lock_file = acquire(run_dir)
        except UserError as err:
            refusal = str(err)
    refusal = distributed.broadcast(refusal)
    if refusal is not None:
        raise UserError(refusal)
    try:
        yield
    finally:
        if lock_file is not None:
            if created and os.listdir(run_dir) == [LOCK_NAME]:
                # this job created the folder and wrote nothing else (bad data, a refused flag): leave no trace
                os.remove(lock_file.name)
                os.rmdir(run_dir)
            lock_file.close()
