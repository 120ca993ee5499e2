"""Checkpoints of a training run: save, keep, resume exactly, survive damage.

This module owns `WORKDIR/checkpoints/`. One checkpoint is one orbax step folder `checkpoints/N/`:

    N/state    the training state pytree {"step", "params", "opt_state", "rng"} (orbax StandardSave);
               for LoRA runs "params" is only the adapter leaves: frozen base weights are reloaded
               from the model path, never written here
    N/meta       host-side JSON from the caller: {"data": {"epoch", "index"}, "config_fingerprint",
                 "model", "metrics"}
    N/checksums  one position-weighted checksum per state leaf, verified after every restore
    N/metrics    {"eval_loss": ...}, or {} when the step was not evaluated (orbax's file, ranks the best)

Use from the train loop:

    ckpt = Checkpointer(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
                        keep_best=config.checkpoint.keep_best, async_save=config.checkpoint.async_save)
    fingerprint = config_fingerprint(config.model.path, model_cfg, full_finetune, trainable)
    resumed = ckpt.restore_latest_valid(state, fingerprint)   # state (or its abstract twin) as template
    if resumed: state, meta = resumed.state, resumed.meta      # meta["data"]: where the data iterator was
    for step in ...:
        ckpt.save(step, state, {"data": ..., "config_fingerprint": fingerprint, ...},
                  metrics={"eval_loss": loss} if evaluated else None, final=step == num_steps)
    ckpt.close()                                               # waits for the last background write

What it guarantees:
- Only complete checkpoints are used. Orbax writes `N.orbax-checkpoint-tmp/` and renames it to `N/`
  when everything is on disk; leftovers of a killed run are reported and removed when a Checkpointer
  opens the folder, and are never restored.
- Kept: the last `keep` checkpoints plus the one with the lowest eval loss (orbax 0.12's
  preservation policies: AnyPreservationPolicy([LatestN(keep), BestN(n=1)]); a checkpoint saved
  without an eval loss ranks as worst, so it is kept only while it is among the last `keep`).
- Saving is asynchronous: `save` returns once the arrays are copied to host memory (the caller may
  donate or overwrite them), the files are written in the background; the next `save`,
  `wait_until_finished` and `close` wait for it.
- A write that fails (disk full, read-only or missing workdir) raises one `CheckpointError` naming the
  path, the cause and the fix; the unfinished write is removed and earlier checkpoints stay intact.
- Orbax stores no checksums: a data file garbled in place restores silently wrong values. Each
  checkpoint therefore carries a checksum per leaf (computed on device while saving); a restore whose
  arrays do not match counts as damaged.
- `restore_latest_valid` walks back from the newest checkpoint: a damaged one (truncated data file,
  missing metadata) is reported with its step and error, the previous one is used, and the damaged
  one is moved to `checkpoints/damaged/N` (kept for inspection, never deleted).
- A workdir written by a different model or run config is refused (`check_compatible`).
- Restoring takes an abstract state whose leaves carry the target shardings, so a checkpoint written
  on one mesh restores onto another (different device count or layout).

PRNG keys: the state's "rng" is a typed key (`jax.random.key`); it is stored as its raw key data and
rebuilt with the implementation named by the abstract state's key dtype.
"""

from __future__ import annotations

import dataclasses
import errno as errno_lib
import json
import logging
import math
import os
import pathlib
import re
import shutil
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from jaxtune.errors import JaxtuneError
from jaxtune.params import path_str

log = logging.getLogger(__name__)

STATE_ITEM = "state"
META_ITEM = "meta"
CHECKSUMS_ITEM = "checksums"
DAMAGED_DIR = "damaged"
UNFINISHED_MARKER = ocp.path.atomicity.TMP_DIR_SUFFIX  # ".orbax-checkpoint-tmp"
BEST_METRIC = "eval_loss"
STEP_DIR_NAME = re.compile(r"^\d+$")

# Settings that choose numerics or memory, not what the trained weights mean: they may change between
# a run and its resume without making the checkpoint incompatible.
FINGERPRINT_IGNORED_MODEL_FIELDS = ("lora", "compute_dtype", "remat")
LORA_FINGERPRINT_FIELDS = ("rank", "alpha", "targets", "rslora")
# Fingerprint keys holding a set: compared regardless of order (checkpoints written before
# lora.parse_targets returned one canonical order hold the targets in the order they were typed).
UNORDERED_FINGERPRINT_KEYS = ("lora.targets",)


class CheckpointError(JaxtuneError, OSError):
    """A checkpoint could not be written, read or used. Earlier checkpoints on disk are untouched."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, errno: int | None = None):
        super().__init__(message)
        self.message = message
        self.errno = errno
        self.filename = None if path is None else str(path)

    def __str__(self) -> str:  # OSError would print "[Errno N] strerror: filename" instead
        return self.message


class Restored(NamedTuple):
    step: int
    state: Any
    meta: dict


def checkpoint_dir(workdir: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(workdir).absolute() / "checkpoints"


# ============================================================================================
# Run fingerprint: what a checkpoint was trained for


def _json_value(value: Any) -> Any:
    """Tuples -> lists, numpy/jax scalars -> Python numbers, recursively (what JSON round-trips to)."""
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        return np.asarray(value).item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def param_shapes(params) -> dict[str, list]:
    """{'model/layers/self_attn/q_proj/lora_a': [[3, 64, 8], 'float32'], ...} of arrays or ShapeDtypeStructs."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {path_str(kp): [list(leaf.shape), str(np.dtype(leaf.dtype))] for kp, leaf in flat}


def _model_path_id(model_path: str) -> str:
    """An existing local folder by its absolute path; a hub id or built-in alias as given."""
    return str(pathlib.Path(model_path).absolute()) if os.path.exists(model_path) else str(model_path)


def config_fingerprint(model_path: str, model_config, full_finetune: bool, trainable_params) -> dict:
    """What defines a run's checkpoints: model, architecture, LoRA shape, full/LoRA, trainable shapes.

    `model_config` is a jaxtune.models.llama.ModelConfig; `trainable_params` the trainable subtree
    (arrays or ShapeDtypeStructs). Stored in every checkpoint's meta as "config_fingerprint".
    """
    architecture = {field.name: getattr(model_config, field.name) for field in dataclasses.fields(model_config)
                    if field.name not in FINGERPRINT_IGNORED_MODEL_FIELDS}
    adapter = model_config.lora
    lora = None if adapter is None else {name: getattr(adapter, name) for name in LORA_FINGERPRINT_FIELDS}
    return _json_value({
        "model_path": _model_path_id(model_path),
        "architecture": architecture,
        "lora": lora,
        "full_finetune": bool(full_finetune),
        "trainable_shapes": param_shapes(trainable_params),
    })


def _flatten_json(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat = {}
        for key, sub in value.items():
            flat.update(_flatten_json(sub, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


_ABSENT = object()


def _describe(value: Any) -> str:
    return "nothing" if value is _ABSENT else json.dumps(value)


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """'key: checkpoint has X, this run has Y' for every dotted key whose value differs."""
    saved_flat, current_flat = _flatten_json(_json_value(saved)), _flatten_json(_json_value(current))
    lines = []
    for key in sorted(set(saved_flat) | set(current_flat)):
        old, new = saved_flat.get(key, _ABSENT), current_flat.get(key, _ABSENT)
        if key in UNORDERED_FINGERPRINT_KEYS and isinstance(old, list) and isinstance(new, list):
            old, new = sorted(old), sorted(new)
        if old != new:
            lines.append(f"{key}: checkpoint has {_describe(old)}, this run has {_describe(new)}")
    return lines


def check_compatible(meta: dict, fingerprint: dict, directory: str | os.PathLike | None = None,
                     max_listed: int = 12) -> None:
    """Raise CheckpointError listing the differing keys if `meta` was saved by a different run config."""
    where = str(directory) if directory is not None else "WORKDIR/checkpoints"
    fix = f"use a new --workdir or remove {where}"
    saved = meta.get("config_fingerprint")
    if saved is None:
        raise CheckpointError(f"the checkpoints in {where} carry no config fingerprint, so they cannot be matched "
                              f"to this run: {fix}", path=directory)
    differences = fingerprint_differences(saved, fingerprint)
    if differences:
        listed = differences[:max_listed] + ([f"... and {len(differences) - max_listed} more"]
                                             if len(differences) > max_listed else [])
        raise CheckpointError(
            f"the checkpoints in {where} were written by a different model or run config, so this run cannot "
            f"resume from them:\n  " + "\n  ".join(listed) + f"\nTo start a new run, {fix}.", path=directory)


# ============================================================================================
# State <-> what orbax stores (typed PRNG keys as raw key data)


def _is_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _key_impl_name(abstract_key) -> str:
    names = []
    jax.eval_shape(lambda key: names.append(jax.random.key_impl(key)), abstract_key)
    return str(names[0])


def abstract_like(tree):
    """Arrays -> ShapeDtypeStruct with the array's sharding; ShapeDtypeStructs pass through."""
    def to_abstract(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        dtype = leaf.dtype if hasattr(leaf, "dtype") else jnp.asarray(leaf).dtype
        return jax.ShapeDtypeStruct(np.shape(leaf), dtype, sharding=getattr(leaf, "sharding", None))
    return jax.tree_util.tree_map(to_abstract, tree)


def keys_to_data(state):
    """Typed PRNG key leaves -> their uint32 key data (what orbax can write)."""
    return jax.tree_util.tree_map(lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, state)


def abstract_storage(abstract_state):
    """The abstract tree orbax restores into: key leaves become key data with the key's sharding."""
    def storage(leaf):
        if not _is_key(leaf):
            return leaf
        data = jax.eval_shape(jax.random.key_data, leaf)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=leaf.sharding)
    return jax.tree_util.tree_map(storage, abstract_state)


def data_to_keys(restored, abstract_state):
    """Inverse of keys_to_data, with each key's implementation read from the abstract state."""
    def rebuild(data, leaf):
        return jax.random.wrap_key_data(data, impl=_key_impl_name(leaf)) if _is_key(leaf) else data
    return jax.tree_util.tree_map(rebuild, restored, abstract_state)


_BITS_OF_WIDTH = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _leaf_checksum(leaf: jax.Array) -> jax.Array:
    """sum(bits * (2 * position + 1)) mod 2**32: any change of one element changes it (odd weights)."""
    if leaf.dtype == jnp.bool_:
        bits = leaf.astype(jnp.uint32)
    else:  # 64-bit leaves become two uint32 words along a new last axis
        bits = jax.lax.bitcast_convert_type(leaf, _BITS_OF_WIDTH[leaf.dtype.itemsize]).astype(jnp.uint32)
    position = jnp.zeros(bits.shape, jnp.uint32)
    for axis in range(bits.ndim):  # row-major position without reshaping (keeps the sharding)
        stride = int(np.prod(bits.shape[axis + 1:], dtype=np.uint64) % (1 << 32))
        position = position + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride)
    return jnp.sum(bits * (position * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _checksums_on_device(leaves: list) -> list:
    return [_leaf_checksum(jnp.asarray(leaf)) for leaf in leaves]


def state_checksums(stored_state) -> dict[str, int]:
    """{leaf path: checksum} of a state as stored (keys as key data); equal on any mesh or device count."""
    flat = jax.tree_util.tree_flatten_with_path(stored_state)[0]
    sums = _checksums_on_device([leaf for _, leaf in flat])
    return {path_str(kp): int(np.asarray(value)) for (kp, _), value in zip(flat, sums)}


def checksum_mismatches(expected: dict, actual: dict) -> list[str]:
    return sorted(path for path in set(expected) | set(actual) if expected.get(path) != actual.get(path))


def _json_document(value: Any, what: str) -> Any:
    document = _json_value(value)
    try:
        json.dumps(document, allow_nan=True)
    except (TypeError, ValueError) as error:
        raise TypeError(f"checkpoint {what} must be JSON-serialisable: {error}") from error
    return document


def metric_for_best(metrics) -> float:
    """The eval loss orbax ranks by; missing or non-finite counts as worst."""
    value = (metrics or {}).get(BEST_METRIC)
    return float(value) if value is not None and math.isfinite(float(value)) else math.inf


# ============================================================================================
# Files on disk


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


def _short(error: BaseException, limit: int = 400) -> str:
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
    return CheckpointError(f"{what}: {cause} ({_short(error)}). {kept} Fix: {fix}.", path=directory, errno=code)


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


# ============================================================================================
# The checkpointer the train loop uses


def preservation_policy(keep: int, keep_best: bool):
    """Last `keep` checkpoints, plus (keep_best) the one with the lowest eval loss (missing = worst)."""
    latest = checkpoint_managers.LatestN(n=keep)
    if not keep_best:
        return latest
    best = checkpoint_managers.BestN(get_metric_fn=metric_for_best, reverse=True, n=1,
                                     keep_checkpoints_without_metrics=False)
    return checkpoint_managers.AnyPreservationPolicy([latest, best])


class Checkpointer:
    """WORKDIR/checkpoints/: save every `every` steps (0: only the final one), keep the last `keep`
    plus the best by eval loss; async_save writes in the background. See the module docstring."""

    def __init__(self, workdir: str | os.PathLike, *, every: int, keep: int, keep_best: bool = True,
                 async_save: bool = True):
        if every < 0 or keep < 1:
            raise ValueError(f"checkpoint.every={every} must be >= 0 and checkpoint.keep={keep} >= 1")
        self.directory = checkpoint_dir(workdir)
        self.every = every
        self._pending_step: int | None = None
        ensure_writable(self.directory)
        if jax.process_index() == 0:
            self._clean_up_after_killed_runs()
        self._sync("jaxtune_checkpoint_open")
        self._options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation_policy(keep, keep_best),
            best_fn=metric_for_best if keep_best else None,  # also makes orbax write N/metrics
            best_mode="min",
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = self._open_manager()

    # ---- housekeeping -------------------------------------------------------------------------

    def _clean_up_after_killed_runs(self) -> None:
        for path in remove_unfinished_writes(self.directory):
            log.warning("removed unfinished checkpoint write %s (left by an interrupted run; never restored)", path)
        for step, error in steps_with_unreadable_metrics(self.directory).items():
            target = set_aside(self.directory, step)
            log.warning("checkpoint step %d in %s is damaged (its metrics file does not parse: %s); moved it to %s "
                        "(kept for inspection: delete it when you no longer need it)", step, self.directory, error,
                        target)

    @staticmethod
    def _sync(name: str) -> None:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

    def _open_manager(self) -> ocp.CheckpointManager:
        try:
            return ocp.CheckpointManager(self.directory, options=self._options,
                                         item_names=(STATE_ITEM, META_ITEM, CHECKSUMS_ITEM))
        except OSError as error:
            raise write_error(self.directory, error, None, []) from error

    def _close_failed_manager(self, attempts: int = 4) -> None:
        """Let orbax's background threads of a failed save finish; their further errors (kept by orbax to
        raise at the next call) belong to the failure being reported."""
        for _ in range(attempts):
            try:
                self._manager.close()
                return
            except Exception as error:  # noqa: BLE001
                log.debug("further error of the failed checkpoint write: %s", _short(error))

    def _after_failed_write(self, step: int | None, error: BaseException) -> CheckpointError:
        self._close_failed_manager()
        if jax.process_index() == 0 and step is not None:
            remove_failed_write(self.directory, step)
        self._sync("jaxtune_checkpoint_failed_write")
        self._manager = self._open_manager()  # reads the disk afresh: orbax's in-memory list went stale
        return write_error(self.directory, error, step, self._manager.all_steps())

    # ---- saving -------------------------------------------------------------------------------

    def due(self, step: int, *, final: bool = False) -> bool:
        return final or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, state, meta: dict, metrics: dict | None = None, *, final: bool = False) -> bool:
        """Save `state` (+ JSON `meta`, `metrics`) at `step` if due; returns whether a save started.

        Returns after the arrays are copied off the devices (async mode): the caller may donate them.
        Raises CheckpointError if this or the previous (background) write failed.
        """
        if not self.due(step, final=final):
            return False
        self.wait_until_finished()
        if step in self._manager.all_steps():
            log.info("checkpoint step %d already exists in %s; not saving it again", step, self.directory)
            return False
        if jax.process_index() == 0:  # a failed earlier attempt at this step may have left its folder
            remove_unfinished_writes(self.directory, step)
        meta_document = _json_document(meta, "meta")
        # {} rather than None: orbax warns on every save without metrics; {} ranks as worst (metric_for_best)
        metrics_document = _json_document(metrics or {}, "metrics")
        stored_state = keys_to_data(state)
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(stored_state),
                                     META_ITEM: ocp.args.JsonSave(meta_document),
                                     CHECKSUMS_ITEM: ocp.args.JsonSave(state_checksums(stored_state))})
        try:
            self._manager.save(step, args=args, metrics=metrics_document, force=True)
        except Exception as error:  # noqa: BLE001 - every write failure becomes one CheckpointError
            raise self._after_failed_write(step, error) from error
        self._pending_step = step
        return True

    def wait_until_finished(self) -> None:
        """Block until the background write (if any) is committed; raise CheckpointError if it failed."""
        step, self._pending_step = self._pending_step, None
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as error:  # noqa: BLE001
            raise self._after_failed_write(step, error) from error

    def close(self) -> None:
        try:
            self.wait_until_finished()
        finally:
            self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            self.close()
        except CheckpointError:
            if exc is None:
                raise
            log.exception("the last checkpoint write failed while handling another error")

    # ---- what is on disk ----------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        return self._manager.best_step()

    def step_path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def size_bytes(self, step: int | None = None) -> int:
        """Bytes on disk of checkpoint `step` (default: the latest), after pending writes finish."""
        self.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}", path=self.directory)
        return checkpoint_size_bytes(self.step_path(step))

    # ---- restoring ----------------------------------------------------------------------------

    def read_meta(self, step: int) -> dict:
        restored = self._manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
        return restored[META_ITEM]

    def restore_state(self, step: int, abstract_state):
        """The state of checkpoint `step`, placed as `abstract_state`'s leaves say (shape, dtype, sharding).

        Raises CheckpointError if the restored arrays do not match the checksums written with them.
        """
        abstract_state = abstract_like(abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore(abstract_storage(abstract_state)),
            CHECKSUMS_ITEM: ocp.args.JsonRestore()}))
        mismatched = checksum_mismatches(restored[CHECKSUMS_ITEM], state_checksums(restored[STATE_ITEM]))
        if mismatched:
            raise CheckpointError(f"checkpoint step {step} in {self.directory}: restored data does not match the "
                                  f"checksums written with it ({', '.join(mismatched[:8])}): the files changed after "
                                  f"the save", path=self.step_path(step))
        return data_to_keys(restored[STATE_ITEM], abstract_state)

    def restore(self, step: int | None, abstract_state) -> tuple[Any, dict]:
        """(state, meta) of checkpoint `step` (None: the latest). Errors propagate as they are."""
        self.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint to restore in {self.directory}", path=self.directory)
        return self.restore_state(step, abstract_state), self.read_meta(step)

    def restore_latest_valid(self, abstract_state, fingerprint: dict | None = None) -> Restored | None:
        """Newest checkpoint that restores, walking back past damaged ones; None if there is none.

        A checkpoint from a different run config (fingerprint) is refused with CheckpointError, not
        skipped. Damaged checkpoints newer than the one restored are reported and moved to
        checkpoints/damaged/; if no checkpoint restores, nothing is moved and CheckpointError lists why.
        """
        self.wait_until_finished()
        failures: list[tuple[int, str]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                meta = self.read_meta(step)
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is reported, then skipped
                failures.append((step, self._report_damaged(step, "its meta", error)))
                continue
            if fingerprint is not None:
                check_compatible(meta, fingerprint, self.directory)
            try:
                state = self.restore_state(step, abstract_state)
            except Exception as error:  # noqa: BLE001
                failures.append((step, self._report_damaged(step, "its state", error)))
                continue
            self._set_aside_damaged([failed_step for failed_step, _ in failures])
            return Restored(step, state, meta)
        if failures:
            listed = "\n  ".join(f"step {step}: {reason}" for step, reason in failures)
            raise CheckpointError(
                f"no checkpoint in {self.directory} could be restored (none was changed or deleted):\n  {listed}\n"
                f"If the state layout changed on purpose, start a new run with a new --workdir.", path=self.directory)
        return None

    def _report_damaged(self, step: int, part: str, error: BaseException) -> str:
        reason = _short(error)
        log.warning("checkpoint step %d in %s cannot be restored: reading %s failed with %s. Trying the previous "
                    "checkpoint.", step, self.directory, part, reason)
        return reason

    def _set_aside_damaged(self, steps: list[int]) -> None:
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                target = set_aside(self.directory, step)
                log.warning("moved damaged checkpoint step %d to %s (kept for inspection: delete it when you no "
                            "longer need it)", step, target)
        self._sync("jaxtune_checkpoint_set_aside")
        self._manager.reload()
