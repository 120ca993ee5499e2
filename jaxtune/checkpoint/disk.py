"""WORKDIR/checkpoints/ on disk: committed step folders, unfinished writes of a killed run, damaged
checkpoints set aside, sizes, and the one `CheckpointError` of a failed write (what failed, the OS
cause, what is safe, the fix)."""

from __future__ import annotations

import errno as errno_lib
import json
import logging
import math
import os
import pathlib
import re
import shutil
import time

import jax
import orbax.checkpoint as ocp

from jaxtune.checkpoint.stored import metric_for_best
from jaxtune.errors import JaxtuneError

log = logging.getLogger(__name__)

DAMAGED_DIR = "damaged"
UNFINISHED_MARKER = ocp.path.atomicity.TMP_DIR_SUFFIX  # ".orbax-checkpoint-tmp"
STEP_DIR_NAME = re.compile(r"^\d+$")


class CheckpointError(JaxtuneError, OSError):
    """A checkpoint could not be written, read or used. Earlier checkpoints on disk are untouched."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, errno: int | None = None):
        super().__init__(message)
        self.message = message
        self.errno = errno
        self.filename = None if path is None else str(path)

    def __str__(self) -> str:  # OSError would print "[Errno N] strerror: filename" instead
        return self.message


def checkpoint_dir(workdir: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(workdir).absolute() / "checkpoints"


def checkpoint_size_bytes(path: str | os.PathLike) -> int:
    """Total size in bytes of the regular files under `path` (a step folder, or all of checkpoints/)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            file_path = os.path.join(root, name)
            if not os.path.islink(file_path):
                total += os.path.getsize(file_path)
    return total


def unfinished_writes(directory: pathlib.Path, step: int | None = None) -> list[pathlib.Path]:
    """`N.orbax-checkpoint-tmp*` folders: writes that never committed (killed run, failed write)."""
    if not directory.is_dir():
        return []
    prefix = "" if step is None else f"{step}{UNFINISHED_MARKER}"
    return sorted(path for path in directory.iterdir()
                  if UNFINISHED_MARKER in path.name and path.name.startswith(prefix)
                  and STEP_DIR_NAME.match(path.name.split(".")[0]))


def remove_unfinished_writes(directory: pathlib.Path, step: int | None = None) -> list[pathlib.Path]:
    """Delete unfinished writes (never a committed checkpoint); returns what was removed."""
    removed = []
    for path in unfinished_writes(directory, step):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def remove_failed_write(directory: pathlib.Path, step: int, attempts: int = 40, settle_s: float = 0.05) -> None:
    """Remove the unfinished write of `step` after a failure, freeing its space.

    Orbax surfaces the first failing write while its other writer threads of that save may still be
    finishing (they fail once their folder is gone): remove until the folder stays gone.
    """
    for _ in range(attempts):
        remove_unfinished_writes(directory, step)
        time.sleep(settle_s)
        if not unfinished_writes(directory, step):
            return
    log.warning("could not remove the unfinished write of step %d in %s; it is removed when a Checkpointer opens "
                "this folder again", step, directory)


def step_dirs(directory: pathlib.Path) -> dict[int, pathlib.Path]:
    if not directory.is_dir():
        return {}
    return {int(p.name): p for p in directory.iterdir() if p.is_dir() and STEP_DIR_NAME.match(p.name)}


def metrics_file(step_path: pathlib.Path) -> pathlib.Path:
    """Orbax's per-step metrics item of one checkpoint step folder (N/metrics/metrics)."""
    return step_path / "metrics" / "metrics"


def steps_with_unreadable_metrics(directory: pathlib.Path) -> dict[int, str]:
    """step -> error for committed checkpoints whose metrics JSON does not parse (orbax cannot open those)."""
    unreadable = {}
    for step, path in step_dirs(directory).items():
        if metrics_file(path).is_file():
            try:
                json.loads(metrics_file(path).read_text())
            except (ValueError, UnicodeDecodeError) as error:
                unreadable[step] = f"{type(error).__name__}: {error}"
    return unreadable


def eval_losses(directory: pathlib.Path) -> dict[int, float]:
    """step -> eval loss of every committed checkpoint evaluated at its step (finite losses only)."""
    losses = {}
    for step, path in step_dirs(directory).items():
        try:
            loss = metric_for_best(json.loads(metrics_file(path).read_text()))
        except (OSError, ValueError):
            continue  # not evaluated at this step (or its metrics are unreadable)
        if math.isfinite(loss):
            losses[step] = loss
    return losses


def set_aside(directory: pathlib.Path, step: int) -> pathlib.Path:
    """Move checkpoint `step` to checkpoints/damaged/ (out of orbax's sight, kept for the user)."""
    target_root = directory / DAMAGED_DIR
    target_root.mkdir(exist_ok=True)
    target = target_root / str(step)
    suffix = 1
    while target.exists():
        target, suffix = target_root / f"{step}-{suffix}", suffix + 1
    os.replace(directory / str(step), target)
    return target


def _errno_of(error: BaseException) -> int | None:
    """The OS error number behind `error` or its causes (tensorstore reports it as os_error_code='N')."""
    while error is not None:
        if isinstance(error, OSError) and error.errno:
            return error.errno
        found = re.search(r"os_error_code='?(\d+)|\[Errno (\d+)\]", str(error))
        if found:
            return int(found.group(1) or found.group(2))
        error = error.__cause__ or error.__context__
    return None


_CAUSES = {
    errno_lib.ENOSPC: "the disk is full",
    errno_lib.EDQUOT: "the disk quota is exhausted",
    errno_lib.EFBIG: "a file exceeds the size limit of this filesystem or process",
    errno_lib.EROFS: "the filesystem is read-only",
    errno_lib.EACCES: "permission denied",
    errno_lib.EPERM: "operation not permitted",
    errno_lib.ENOTDIR: "a part of the path is a file, not a folder",
    errno_lib.EEXIST: "a file is in the way",
}


def short_error(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def write_error(directory: pathlib.Path, error: BaseException, step: int | None, kept_steps) -> CheckpointError:
    """One clear error for a failed checkpoint write: what failed, why, what is safe, what to do."""
    code = _errno_of(error)
    cause = _CAUSES.get(code, "the write failed")
    what = f"could not write checkpoint step {step} to {directory}" if step is not None \
        else f"cannot write checkpoints to {directory}"
    kept = (f"Earlier checkpoints are untouched (steps {', '.join(map(str, kept_steps))})." if kept_steps
            else "No earlier checkpoint was changed.")
    if code in (errno_lib.ENOSPC, errno_lib.EDQUOT, errno_lib.EFBIG):
        fix = (f"free space on that disk (check with `df -h {directory}`) or rerun with --workdir on a disk "
               f"with more room; rerunning the same command resumes from the latest checkpoint")
    else:
        fix = "rerun with a --workdir you can write to (a writable, existing disk)"
    return CheckpointError(f"{what}: {cause} ({short_error(error)}). {kept} Fix: {fix}.", path=directory, errno=code)


def ensure_writable(directory: pathlib.Path) -> None:
    """Create `directory` and prove a file can be written and removed there, before any compute."""
    probe = directory / f".write-probe-{jax.process_index()}-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"jaxtune")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as error:
        raise write_error(directory, error, None, []) from error
