"""`Checkpointer`: the orbax CheckpointManager of WORKDIR/checkpoints/ as the train loop uses it:
save when due (async), keep the last K + the best, restore the newest valid checkpoint walking back
past damaged ones. The guarantees are listed in jaxtune/checkpoint/__init__.py."""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from jaxtune.checkpoint.disk import (CheckpointError, checkpoint_dir, checkpoint_size_bytes, ensure_writable,
                                     remove_failed_write, remove_unfinished_writes, set_aside,
                                     steps_with_unreadable_metrics, write_error, short_error)
from jaxtune.checkpoint.fingerprint import check_compatible
from jaxtune.checkpoint.stored import (abstract_like, abstract_storage, checksum_mismatches, data_to_keys,
                                       json_document, keys_to_data, metric_for_best, state_checksums)

log = logging.getLogger(__name__)

STATE_ITEM = "state"
META_ITEM = "meta"
CHECKSUMS_ITEM = "checksums"


class Restored(NamedTuple):
    step: int
    state: Any
    meta: dict


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
                log.debug("further error of the failed checkpoint write: %s", short_error(error))

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
        meta_document = json_document(meta, "meta")
        # {} rather than None: orbax warns on every save without metrics; {} ranks as worst (metric_for_best)
        metrics_document = json_document(metrics or {}, "metrics")
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
        reason = short_error(error)
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
