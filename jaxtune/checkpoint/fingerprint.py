"""What a checkpoint was trained for: the run fingerprint stored in every checkpoint's meta, and the
check that refuses to resume a workdir written by another model or run config (naming each key
that differs), or by a jaxtune from before trained weights were float32 master weights (naming the
way to continue from its weights)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np

from jaxtune.checkpoint.disk import CheckpointError
from jaxtune.checkpoint.stored import json_value
from jaxtune.params import path_str

# Settings that choose numerics or memory, not what the trained weights mean: they may change between
# a run and its resume without making the checkpoint incompatible.
# quant: recorded below only when set, so checkpoints of unquantised runs keep their fingerprint.
FINGERPRINT_IGNORED_MODEL_FIELDS = ("lora", "compute_dtype", "remat", "quant")
LORA_FINGERPRINT_FIELDS = ("rank", "alpha", "targets", "rslora")
# Fingerprint keys holding a set: compared regardless of order (checkpoints written before
# lora.parse_targets returned one canonical order hold the targets in the order they were typed).
UNORDERED_FINGERPRINT_KEYS = ("lora.targets",)


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
    quantized = getattr(model_config, "quant", None)  # a QLoRA run's adapters fit only its NF4 base
    if quantized is not None:
        architecture["quant"] = dataclasses.asdict(quantized)
    adapter = model_config.lora
    lora = None if adapter is None else {name: getattr(adapter, name) for name in LORA_FINGERPRINT_FIELDS}
    return json_value({
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
_NARROW_FLOATS = ("bfloat16", "float16")


def narrow_trained_dtype(saved: dict, current: dict) -> str | None:
    """'bfloat16' / 'float16' when the checkpoint differs from this run only in holding its trained
    leaves in that dtype where this run keeps float32 master weights (a checkpoint written before
    jaxtune kept them, whatever model.dtype); else None."""
    saved_shapes, current_shapes = saved.get("trainable_shapes"), current.get("trainable_shapes")
    if not (isinstance(saved_shapes, dict) and isinstance(current_shapes, dict)) or \
            saved_shapes.keys() != current_shapes.keys():
        return None
    others = (saved.keys() | current.keys()) - {"trainable_shapes"}
    if fingerprint_differences({key: saved.get(key) for key in others}, {key: current.get(key) for key in others}):
        return None
    narrowed = set()
    for path, (shape, dtype) in saved_shapes.items():
        current_shape, current_dtype = current_shapes[path]
        if shape != current_shape:
            return None
        if dtype != current_dtype:
            if dtype not in _NARROW_FLOATS or current_dtype != "float32":
                return None
            narrowed.add(dtype)
    return narrowed.pop() if len(narrowed) == 1 else None


def _describe(value: Any) -> str:
    return "nothing" if value is _ABSENT else json.dumps(value)


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """'key: checkpoint has X, this run has Y' for every dotted key whose value differs."""
    saved_flat, current_flat = _flatten_json(json_value(saved)), _flatten_json(json_value(current))
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
    narrow = narrow_trained_dtype(json_value(saved), json_value(fingerprint))
    if narrow is not None:
        workdir = pathlib.Path(where).parent
        raise CheckpointError(
            f"the checkpoints in {where} hold the trained weights (and Adam's moments) in {narrow}: they were "
            f"written by a jaxtune from before trained weights were float32 master weights (whatever model.dtype), "
            f"and this version cannot resume them. To continue from their weights in a new run (the optimizer "
            f"state and the lr schedule start afresh): python -m jaxtune.export --workdir={workdir} --format=peft "
            f"(a LoRA run; then train with --config.lora.init_from=<the folder it writes>) or --format=merged "
            f"(full fine-tuning; then --config.model.path=<that folder>), with a new --workdir. To resume them as they "
            f"were, use the jaxtune version that wrote them.", path=directory)
    differences = fingerprint_differences(saved, fingerprint)
    if differences:
        listed = differences[:max_listed] + ([f"... and {len(differences) - max_listed} more"]
                                             if len(differences) > max_listed else [])
        raise CheckpointError(
            f"the checkpoints in {where} were written by a different model or run config, so this run cannot "
            f"resume from them:\n  " + "\n  ".join(listed) + f"\nTo start a new run, {fix}.", path=directory)
