"""Every file a run writes (checkpoints, sample grids, results, plots) is written here: into a hidden temporary
file beside it, flushed to disk, then renamed into place, so a kill at any moment leaves the old file or the new
one, never a torn one. A write that fails (a full disk, a read-only folder, a quota) removes its temporary file
and becomes one UserError naming what was being written, the OS error and how to go on."""
import contextlib
import errno
import os

from brainomaly.errors import UserError

RERUN_HINT = ("Fix: free space on that disk (or make the folder writable) and rerun with --resume_iters latest: "
              "training continues from the last complete checkpoint (a protocol or score run: rerun the same "
              "command).")


def write_error(what, path, err):
    """The UserError for an OSError raised while writing `what` (e.g. "checkpoint", "sample grid") to path."""
    reason = err.strerror or str(err)
    code = errno.errorcode.get(err.errno) if err.errno else None
    return UserError(f"cannot write the {what} {path}: {reason}" + (f" ({code})" if code else "") +
                     f". Nothing half-written was left behind.\n{RERUN_HINT}")


@contextlib.contextmanager
def atomic_output(path, what):
    """Yields a temporary path to write `path`'s content to; renamed to `path` when the block ends without error.
    The temporary name is hidden and keeps the extension (a writer that picks its format by extension still
    works; no listing of slices or checkpoints ever sees it)."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}{os.path.splitext(name)[1]}")
    try:
        os.makedirs(folder or ".", exist_ok=True)
        yield tmp
        descriptor = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # on disk before the rename: a power cut leaves the old file, not an empty one
        finally:
            os.close(descriptor)
        os.replace(tmp, path)
    except OSError as err:
        raise write_error(what, path, err) from err
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def write_bytes(data, path, what):
    """Write bytes to path atomically (atomic_output)."""
    with atomic_output(path, what) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
