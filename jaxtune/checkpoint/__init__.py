"""Checkpoints of a training run: save, keep, resume exactly, survive damage.

This package owns `WORKDIR/checkpoints/`. One checkpoint is one orbax step folder `checkpoints/N/`:

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
- A workdir written by a different model or run config is refused (`check_compatible`), naming each
  key that differs; one written by a jaxtune from before trained weights were float32 master weights
  (a bfloat16 run's trained leaves stored in bfloat16) is refused naming how to go on from its weights.
- Restoring takes an abstract state whose leaves carry the target shardings, so a checkpoint written
  on one mesh restores onto another (different device count or layout).

PRNG keys: the state's "rng" is a typed key (`jax.random.key`); it is stored as its raw key data and
rebuilt with the implementation named by the abstract state's key dtype.

Modules, one concept each (import the names below from `jaxtune.checkpoint`):
- `checkpointer`: `Checkpointer` (save when due, keep, restore walking back past damage) and `Restored`.
- `fingerprint`: what a checkpoint was trained for (`config_fingerprint`) and `check_compatible`.
- `stored`: the state as orbax stores it (keys as key data, abstract trees with shardings), the
  per-leaf checksums, the eval loss that ranks the best checkpoint.
- `disk`: the step folders, unfinished writes, damaged checkpoints set aside, sizes, `CheckpointError`
  and the one error of a failed write.
"""

from jaxtune.checkpoint.checkpointer import (CHECKSUMS_ITEM, META_ITEM, STATE_ITEM, Checkpointer, Restored,
                                             preservation_policy)
from jaxtune.checkpoint.disk import (DAMAGED_DIR, STEP_DIR_NAME, UNFINISHED_MARKER, CheckpointError, checkpoint_dir,
                                     checkpoint_size_bytes, ensure_writable, eval_losses, metrics_file,
                                     remove_failed_write, remove_unfinished_writes, set_aside, step_dirs,
                                     steps_with_unreadable_metrics, unfinished_writes, write_error)
from jaxtune.checkpoint.fingerprint import (FINGERPRINT_IGNORED_MODEL_FIELDS, LORA_FINGERPRINT_FIELDS,
                                            UNORDERED_FINGERPRINT_KEYS, check_compatible, config_fingerprint,
                                            fingerprint_differences, param_shapes)
from jaxtune.checkpoint.stored import (BEST_METRIC, abstract_like, abstract_storage, checksum_mismatches,
                                       data_to_keys, json_document, json_value, keys_to_data, metric_for_best,
                                       state_checksums)

__all__ = [
    "CHECKSUMS_ITEM", "META_ITEM", "STATE_ITEM", "Checkpointer", "Restored", "preservation_policy",
    "DAMAGED_DIR", "STEP_DIR_NAME", "UNFINISHED_MARKER", "CheckpointError", "checkpoint_dir", "checkpoint_size_bytes",
    "ensure_writable", "eval_losses", "metrics_file", "remove_failed_write", "remove_unfinished_writes", "set_aside",
    "step_dirs", "steps_with_unreadable_metrics", "unfinished_writes", "write_error",
    "FINGERPRINT_IGNORED_MODEL_FIELDS", "LORA_FINGERPRINT_FIELDS", "UNORDERED_FINGERPRINT_KEYS", "check_compatible",
    "config_fingerprint", "fingerprint_differences", "param_shapes",
    "BEST_METRIC", "abstract_like", "abstract_storage", "checksum_mismatches", "data_to_keys", "json_document",
    "json_value", "keys_to_data", "metric_for_best", "state_checksums",
]
