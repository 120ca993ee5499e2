"""A finished (or interrupted) training run's folder, read back: what export, evaluate and loading need.

A workdir holds config.json (the resolved config the run started with), checkpoints/, tokenizer/
(when the run extended the vocabulary), metrics.jsonl, exports/ and reports/. This module owns
reading it, never writing it:
  * `read_run_config(workdir)`: config.json as a ConfigDict on top of the current schema
    (`config.from_json`), so keys are attributes (`run.model.path`) and missing keys take defaults;
  * `resolve_step(workdir, step)`: 'last' | 'best' (lowest eval loss) | a number -> a saved step;
  * `load_trained_params(workdir, step)`: the trained params of that checkpoint (not the optimizer);
  * `run_lora_config(run)`, `run_added_tokens(run)`, `run_tokenizer(workdir, folder, run)`,
    `trained_vocab_size(trained_other, base_vocab_size)`, `check_fits(trained, cfg, what)`.
Everything here reads only: nothing in the workdir is created, moved or removed.
"""

from __future__ import annotations

import logging
import os
import pathlib

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxtune import checkpoint, hf, lora, vocab
from jaxtune import config as config_lib
from jaxtune import params as params_lib
from jaxtune.hf import ExportError
from jaxtune.models.llama import LoRAConfig, ModelConfig, abstract_params

log = logging.getLogger(__name__)

RUN_CONFIG = "config.json"
TOKENIZER_DIR = "tokenizer"


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """WORKDIR/config.json (the resolved config the run was started with) as a ConfigDict."""
    file = pathlib.Path(workdir) / RUN_CONFIG
    if not file.exists():
        raise ExportError(f"{pathlib.Path(workdir)} has no {RUN_CONFIG}: is it the --workdir of a jaxtune.train run?")
    try:
        return config_lib.from_json(file.read_text())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ExportError(f"{file}: not a jaxtune run config ({type(e).__name__}: {e})") from e


def resolve_step(workdir: str | os.PathLike, step: str | int = "last") -> int:
    """'last' | 'best' (lowest eval loss) | a step number -> a step with a complete checkpoint."""
    directory = checkpoint.checkpoint_dir(workdir)
    steps = checkpoint.step_dirs(directory)
    if not steps:
        raise ExportError(f"no complete checkpoint in {directory}")
    if step == "last":
        return max(steps)
    if step == "best":
        losses = checkpoint.eval_losses(directory)
        if not losses:
            raise ExportError(f"--step=best ranks checkpoints by eval loss, and no checkpoint in {directory} has one "
                              f"(a run without data.eval has none): use --step=last or a step number "
                              f"({', '.join(map(str, sorted(steps)))}), or train with --config.data.eval=FILE")
        return min(losses, key=lambda number: (losses[number], -number))
    if str(step).isdigit() and int(step) in steps:
        return int(step)
    raise ExportError(f"--step={step}: choose last, best or one of the saved steps "
                      f"{', '.join(map(str, sorted(steps)))} (in {directory})")


def load_trained_params(workdir: str | os.PathLike, step: int) -> dict:
    """The trained params of checkpoint `step` as numpy arrays.

    Only `params` is read from the checkpoint's state (not the optimizer state). For LoRA runs that
    is the adapter subtree (plus any other trained leaves); for full fine-tuning, every weight.
    """
    item = checkpoint.checkpoint_dir(workdir) / str(step) / checkpoint.STATE_ITEM
    if not item.is_dir():
        raise ExportError(f"no checkpoint state at {item}")
    reader = ocp.PyTreeCheckpointer()
    saved = reader.metadata(item).item_metadata.tree
    if "params" not in saved:
        raise ExportError(f"{item}: the saved state has no 'params' (keys: {', '.join(map(str, saved))})")
    target = jax.tree_util.tree_map(lambda m: np.zeros((), m.dtype), saved["params"])
    restore_args = jax.tree_util.tree_map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), saved["params"])
    restored = reader.restore(item, args=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
    return restored["params"]


def run_lora_config(run: ml_collections.ConfigDict) -> LoRAConfig | None:
    """The run's adapter settings, or None for a full fine-tuning run (lora.enabled false)."""
    if not run.lora.enabled:
        return None
    return lora.lora_config(run.lora.rank, run.lora.alpha, run.lora.dropout, run.lora.targets, run.lora.rslora,
                            run.lora.dora)


def run_added_tokens(run: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The run's data.add_tokens, parsed as training parses them."""
    return vocab.parse_tokens(str(run.data.add_tokens or ""))


def run_tokenizer(workdir: str | os.PathLike, folder: pathlib.Path, run: ml_collections.ConfigDict):
    """The run's tokenizer: WORKDIR/tokenizer if the run saved one, else the base tokenizer with the
    run's data.add_tokens added as special tokens; None when the base folder has no tokenizer."""
    saved = pathlib.Path(workdir) / TOKENIZER_DIR
    if saved.is_dir():
        return hf.load_tokenizer(saved)
    if not any((folder / name).exists() for name in hf.TOKENIZER_FILES):
        log.warning("%s has no tokenizer files", folder)
        return None
    tokenizer = hf.load_tokenizer(folder)
    added = run_added_tokens(run)
    if added:
        tokenizer.add_tokens(list(added), special_tokens=True)
    return tokenizer


def trained_vocab_size(trained_other: dict, base_vocab_size: int) -> int:
    """Vocabulary size after training: the trained embedding's rows if the run trained one."""
    embedding = trained_other.get("model", {}).get("embed_tokens", {}).get("embedding")
    return base_vocab_size if embedding is None else int(np.shape(embedding)[0])


def check_fits(tree: dict, cfg: ModelConfig, what: str, complete: bool = False) -> None:
    """Every leaf of `tree` is a parameter of the model of `cfg` with the same shape (and, if
    `complete`, every parameter is there), or one ExportError lists the differences."""
    params_lib.check_shapes(tree, abstract_params(cfg), f"{what} does not fit the run's model config", ExportError,
                            complete=complete)
