"""Export to PEFT adapters and merged Hugging Face models; import PEFT adapters.

What it owns:
  * `save_peft_adapter(adapters, cfg, out_dir, base_model_name_or_path, ...)`: our LoRA leaves ->
    `adapter_model.safetensors` + `adapter_config.json`, laid out exactly as peft's
    `save_pretrained` writes them, so `peft.PeftModel.from_pretrained(hf_model, out_dir)` (and
    servers that read PEFT folders) load them.
  * `load_peft_adapter(adapter_dir, base_cfg)`: a PEFT LoRA folder (written by peft or by us) ->
    (our adapter tree, LoRAConfig). Features our model cannot reproduce are refused by name.
  * `save_merged_model(params, cfg, out_dir, ...)`: adapters folded into the base weights (float32 sums),
    cast to one dtype, written as an HF folder (config.json, sharded safetensors, tokenizer,
    generation_config.json) that `transformers.AutoModelForCausalLM.from_pretrained` loads.
  * the command line, which reads a training run's config and checkpoint, so that rank, alpha and
    targets are never typed twice:

    python -m jaxtune.export --workdir=runs/lora_llama --format=peft
    python -m jaxtune.export --workdir=runs/lora_llama --format=merged --step=best --dtype=bfloat16
    python -m jaxtune.export --workdir=runs/full_llama --format=merged --out=/tmp/merged --overwrite
    python -m jaxtune.export --workdir=runs/lora_llama --format=peft --save_embedding_layers

PEFT layout (checked against peft 0.21.2 in tests/test_export.py). Every PEFT tensor is one of our
per-layer slices transposed:
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  [r, in]   = lora_a[i].T
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  [out, r]  = lora_b[i].T
    base_model.model.model.embed_tokens.lora_embedding_A              [r, V]    = lora_a.T  (no `.weight`)
    base_model.model.model.embed_tokens.lora_embedding_B              [D, r]    = lora_b.T
    base_model.model.lm_head.lora_A.weight / lora_B.weight            [r, D] / [V, r]  (tied heads too)
Full embedding matrices (peft's `save_embedding_layers`) are `...model.embed_tokens[.base_layer].weight`
[V, D] and `...lm_head[.base_layer].weight` [V, D], `.base_layer` when that module carries an adapter;
tied models write both names, as peft does. The command line writes them only when the run extended
the vocabulary (data.add_tokens) or when asked to (--save_embedding_layers). peft's "auto" writes
them whenever embed_tokens / lm_head is a target, although without new tokens they are exactly the
base model's rows (1 GB per matrix for Llama-3.2-1B in float32): our adapter stays lean, and peft loads it over
the base model as it is.

A tied model with an embed_tokens or lm_head adapter cannot stay tied once merged: in training (and
in peft) the input embedding is E + dE while the head is the base E (+ dH^T of its own adapter), and
one shared matrix holds only one of them. The merged export unties it (lm_head.weight written,
tie_word_embeddings false), whichever of the two carries the adapter. peft's own merge_and_unload
keeps the tie and gets the logits wrong there (peft issue #2777).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import jax

import jaxtune
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxtune import hf, lora, vocab
from jaxtune.errors import JaxtuneError
from jaxtune.models.llama import ADAPTER_DTYPE, ALL_TARGETS, DTYPES, LINEAR_TARGETS, LoRAConfig, ModelConfig

log = logging.getLogger("jaxtune")

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

# Parent module of each per-layer linear target (HF: model.layers.{i}.<parent>.<target>).
_LAYER_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                 "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

# Every key peft 0.21.2 writes into a LoRA adapter_config.json, with the values of a plain LoRA.
# The LoRA-specific keys (r, lora_alpha, ...) are filled in by `peft_adapter_config`. peft fills in
# `peft_version` itself on load; it is left out rather than claiming a version that did not write it.
_PEFT_LORA_CONFIG_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "bias": "none", "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
    "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
    "kasa_config": None, "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
    "loftq_config": {}, "lora_bias": False, "lora_ga_config": None, "megatron_config": None,
    "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA",
    "qalora_group_size": 16, "rank_pattern": {}, "revision": None, "target_parameters": None,
    "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "velora_config": None,
}

# adapter_config.json keys whose non-default values change the adapter's forward pass in ways our
# model does not implement -> the reason given when refusing them.
_UNSUPPORTED_FEATURES: dict[str, str] = {
    "use_dora": "DoRA (weight-decomposed LoRA) adds a magnitude vector",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "bias": "trained biases",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully trained extra modules",
    "layers_to_transform": "adapters on only some layers",
    "layer_replication": "replicated layers",
    "exclude_modules": "excluded modules",
    "target_parameters": "adapters on raw parameters",
    "trainable_token_indices": "trainable token rows",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QALoRA pooling",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "arrow routing",
    "kasa_config": "KaSA singular values",
    "monteclora_config": "Monte Carlo LoRA",
}
_SUPPORTED_INITS = (True, False, "gaussian", "eva", "orthogonal")  # the others rewrite the base weights

Path = tuple[str, ...]


class ExportError(JaxtuneError, ValueError):
    """An export or import that cannot be done; the message says which file / key and why."""


# ============================================================================================
# PEFT names


def module_name(target: str, layer: int | None) -> str:
    """HF module path of one LoRA target (inside the CausalLM), e.g. model.layers.3.mlp.up_proj."""
    if target == "embed_tokens":
        return "model.embed_tokens"
    if target == "lm_head":
        return "lm_head"
    return f"model.layers.{layer}.{_LAYER_PARENT[target]}.{target}"


def adapter_module_path(target: str) -> Path:
    """Our param path of the module holding a target's lora_a / lora_b."""
    if target == "embed_tokens":
        return ("model", "embed_tokens")
    if target == "lm_head":
        return ("lm_head",)
    return ("model", "layers", _LAYER_PARENT[target], target)


def peft_tensor_names(cfg: ModelConfig) -> Iterator[tuple[str, Path, int | None]]:
    """(PEFT key, our leaf path, layer index or None) for every adapter tensor of cfg.lora."""
    for target in cfg.lora.targets:
        base = adapter_module_path(target)
        layers = [None] if target in ("embed_tokens", "lm_head") else range(cfg.num_layers)
        for layer in layers:
            prefix = PEFT_PREFIX + module_name(target, layer)
            if target == "embed_tokens":
                names = (f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B")
            else:
                names = (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight")
            yield names[0], base + ("lora_a",), layer
            yield names[1], base + ("lora_b",), layer


def embedding_layer_names(cfg: ModelConfig) -> dict[str, str]:
    """'embed_tokens' / 'lm_head' -> the key peft's save_embedding_layers uses for the full matrix."""
    targets = cfg.lora.targets if cfg.lora is not None else ()
    return {target: PEFT_PREFIX + module_name(target, None) + (".base_layer" if target in targets else "") + ".weight"
            for target in ("embed_tokens", "lm_head")}


def _leaf(tree: dict, path: Path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            raise ExportError(f"the adapter tree has no {'/'.join(path)} (expected for targets of cfg.lora)")
        tree = tree[key]
    return tree


def _set_leaf(tree: dict, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ============================================================================================
# PEFT adapter out


def peft_adapter_tensors(adapters: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Our LoRA leaves -> (PEFT key, array in PEFT layout), one layer slice at a time."""
    for name, path, layer in peft_tensor_names(cfg):
        stacked = np.asarray(_leaf(adapters, path))
        yield name, np.ascontiguousarray((stacked if layer is None else stacked[layer]).T)


def embedding_layer_tensors(embedding_layers: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Full embedding / head matrices in peft's save_embedding_layers layout (both names when tied)."""
    names = embedding_layer_names(cfg)
    embedding = np.asarray(_leaf(embedding_layers, ("model", "embed_tokens", "embedding")))
    yield names["embed_tokens"], np.ascontiguousarray(embedding)
    if cfg.tie_word_embeddings:
        yield names["lm_head"], np.ascontiguousarray(embedding)
    else:
        yield names["lm_head"], np.ascontiguousarray(np.asarray(_leaf(embedding_layers, ("lm_head", "kernel"))).T)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def peft_adapter_config(lora_cfg: LoRAConfig, base_model_name_or_path: str | None) -> dict[str, Any]:
    """adapter_config.json contents for a plain LoRA, with the keys peft 0.21.2 writes."""
    return {
        **_PEFT_LORA_CONFIG_DEFAULTS,
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.rank,
        "lora_alpha": _number(lora_cfg.alpha),
        "lora_dropout": float(lora_cfg.dropout),
        "target_modules": sorted(lora_cfg.targets),
        "use_rslora": lora_cfg.rslora,
    }


def save_peft_adapter(
    adapters: dict,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None,
    tokenizer=None,
    embedding_layers: dict | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a PEFT LoRA adapter folder; returns it.

    adapters: the LoRA leaves (`lora_a` / `lora_b`) of cfg.lora's targets, our layout.
    embedding_layers: None, or the full (possibly extended) matrices as a param subtree
      {'model': {'embed_tokens': {'embedding': [V, D]}}, 'lm_head': {'kernel': [D, V]}} (no lm_head
      when tied); written the way peft's save_embedding_layers does. Pass them when the vocabulary
      was extended (new token rows trained): peft users then `resize_token_embeddings(len(tokenizer))`
      before `PeftModel.from_pretrained`, and the new rows load from the adapter.
    tokenizer: saved next to the adapter (needed whenever tokens were added).
    """
    if cfg.lora is None:
        raise ExportError("save_peft_adapter needs cfg.lora (the adapter's rank, alpha and targets)")
    tensors = dict(peft_adapter_tensors(adapters, cfg))
    if embedding_layers is not None:
        tensors.update(embedding_layer_tensors(embedding_layers, cfg))
    with _staging_dir(out_dir, overwrite) as staging:
        _save_safetensors(tensors, staging / ADAPTER_WEIGHTS)
        config = peft_adapter_config(cfg.lora, base_model_name_or_path)
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    log.info("PEFT adapter -> %s: r=%d alpha=%s%s, targets %s, %s adapter params%s%s", out_dir, cfg.lora.rank,
             cfg.lora.alpha, " (rsLoRA)" if cfg.lora.rslora else "", ",".join(cfg.lora.targets),
             f"{lora.count_params(adapters):,}",
             "" if embedding_layers is None else f"; full embedding layers of {cfg.vocab_size} tokens",
             "; tokenizer" if tokenizer is not None else "")
    return pathlib.Path(out_dir)


# ============================================================================================
# PEFT adapter in


def read_adapter_config(adapter_dir: pathlib.Path) -> dict[str, Any]:
    file = adapter_dir / ADAPTER_CONFIG
    if not file.exists():
        raise ExportError(f"{adapter_dir} has no {ADAPTER_CONFIG}: point at a PEFT adapter folder")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{file}: not valid JSON ({e})") from e


def _is_set(value) -> bool:
    return value not in (None, False, "none", {}, [], "")


def check_supported(config: dict[str, Any], file: pathlib.Path) -> None:
    """Refuse adapter features our LoRA cannot reproduce, naming every offending key."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{file}: peft_type={config.get('peft_type')!r}; jaxtune reads LORA adapters only")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise ExportError(f"{file}: task_type={config['task_type']!r}; jaxtune reads CAUSAL_LM adapters only")
    problems = [f"{key}={config[key]!r} ({reason})" for key, reason in _UNSUPPORTED_FEATURES.items()
                if _is_set(config.get(key))]
    init = config.get("init_lora_weights", True)
    if init not in _SUPPORTED_INITS:
        problems.append(f"init_lora_weights={init!r} (this initialisation rewrites the base weights; save the "
                        f"adapter with peft's path_initial_model_for_weight_conversion to get a plain LoRA)")
    if problems:
        raise ExportError(f"{file}: unsupported adapter features: " + "; ".join(problems)
                          + ". jaxtune imports plain LoRA / rsLoRA adapters.")


def all_module_names(cfg: ModelConfig) -> dict[str, str]:
    """Every HF module name that can carry an adapter -> its target type."""
    names = {module_name(target, layer): target
             for target in LINEAR_TARGETS for layer in range(cfg.num_layers)}
    names.update({"model.embed_tokens": "embed_tokens", "lm_head": "lm_head"})
    return names


def _module_matches(name: str, target_modules) -> bool:
    """peft's target_modules matching: a string is a full-match regex, a list matches name suffixes."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def resolve_targets(target_modules, cfg: ModelConfig, file: pathlib.Path) -> tuple[str, ...]:
    """adapter_config target_modules (list, regex or 'all-linear') -> our target names.

    Our adapters cover a module type in every layer or in none: a selection of some layers only is
    refused, as are patterns that match nothing in this model.
    """
    if not target_modules:
        raise ExportError(f"{file}: target_modules is empty; name the adapted modules")
    if isinstance(target_modules, str) and target_modules == "all-linear":
        return LINEAR_TARGETS
    names = all_module_names(cfg)
    matched: dict[str, int] = {}
    for name, target in names.items():
        if _module_matches(name, target_modules):
            matched[target] = matched.get(target, 0) + 1
    if not matched:
        raise ExportError(f"{file}: target_modules={target_modules!r} matches no module of this "
                          f"{cfg.architecture} (modules: {', '.join(ALL_TARGETS)})")
    partial = [f"{t} ({n} of {cfg.num_layers} layers)" for t, n in matched.items()
               if t in LINEAR_TARGETS and n != cfg.num_layers]
    if partial:
        raise ExportError(f"{file}: target_modules={target_modules!r} adapts only some layers: "
                          f"{', '.join(partial)}; jaxtune adapts a module in every layer")
    return tuple(t for t in ALL_TARGETS if t in matched)


def read_adapter_tensors(adapter_dir: pathlib.Path) -> dict[str, np.ndarray]:
    file = adapter_dir / ADAPTER_WEIGHTS
    if not file.exists():
        pickled = adapter_dir / "adapter_model.bin"
        raise ExportError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}"
                          + (" (only a pickled adapter_model.bin, which jaxtune does not unpickle: re-save it "
                             "with peft's save_pretrained(safe_serialization=True))" if pickled.exists() else ""))
    return dict(hf.read_safetensors(file))


def _adapter_dir_vocab(tensors: dict[str, np.ndarray]) -> int | None:
    for name, tensor in tensors.items():
        if name.endswith(("embed_tokens.weight", "embed_tokens.base_layer.weight")):
            return int(tensor.shape[0])
    return None


def load_peft_adapter(adapter_dir: str | os.PathLike, base_cfg: ModelConfig) -> tuple[dict, LoRAConfig]:
    """Read a PEFT LoRA adapter folder into (our adapter tree, LoRAConfig) for the model of base_cfg.

    Adapters come back in float32 (trainable leaves are always float32). Use them as
    `api.logits(model, tokens, params=merge_trees(base, adapters), lora=lora_cfg)`. An adapter trained
    with an extended vocabulary needs base_cfg.vocab_size set to that size and the embedding rows from
    `load_peft_embedding_layers`.
    """
    adapter_dir = pathlib.Path(adapter_dir)
    config_file = adapter_dir / ADAPTER_CONFIG
    config = read_adapter_config(adapter_dir)
    check_supported(config, config_file)
    targets = resolve_targets(config.get("target_modules"), base_cfg, config_file)
    if config.get("fan_in_fan_out"):
        log.warning("%s: fan_in_fan_out=true is ignored for Linear layers (peft resets it too)", config_file)
    try:
        lora_cfg = lora.lora_config(config.get("r", 8), config.get("lora_alpha", 8), config.get("lora_dropout", 0.0),
                                    targets, bool(config.get("use_rslora", False)))
    except ValueError as e:
        raise ExportError(f"{config_file}: {e}") from e
    if (config.get("ensure_weight_tying") and base_cfg.tie_word_embeddings
            and {"embed_tokens", "lm_head"} & set(targets)):
        raise ExportError(f"{config_file}: ensure_weight_tying=true shares one adapter between the tied "
                          f"embedding and lm_head; jaxtune keeps separate adapters")

    tensors = read_adapter_tensors(adapter_dir)
    saved_vocab = _adapter_dir_vocab(tensors)
    if saved_vocab is not None and saved_vocab != base_cfg.vocab_size:
        raise ExportError(f"{adapter_dir}: the adapter was trained with a vocabulary of {saved_vocab} tokens, the "
                          f"base model has {base_cfg.vocab_size}: pass base_cfg.replace(vocab_size={saved_vocab}) "
                          f"with the embedding rows from load_peft_embedding_layers")
    cfg = base_cfg.replace(lora=lora_cfg)
    shapes = {tuple(k.key for k in kp): leaf.shape
              for kp, leaf in jax.tree_util.tree_flatten_with_path(lora.adapter_shapes(cfg))[0]}
    dtype = np.dtype(ADAPTER_DTYPE)
    buffers: dict[Path, np.ndarray] = {}
    missing, wrong_shape = [], []
    for name, path, layer in peft_tensor_names(cfg):
        if name not in tensors:
            missing.append(name)
            continue
        want = shapes[path] if layer is None else shapes[path][1:]
        value = tensors[name].T
        if value.shape != tuple(want):
            wrong_shape.append(f"{name}: file {tuple(tensors[name].shape)}, model expects {tuple(want[::-1])}")
            continue
        if layer is None:
            buffers[path] = np.asarray(value, dtype)
        else:
            buffers.setdefault(path, np.zeros(shapes[path], dtype))[layer] = value
    known = {name for name, _, _ in peft_tensor_names(cfg)} | set(embedding_layer_names(cfg).values()) | {
        PEFT_PREFIX + "model.embed_tokens.weight", PEFT_PREFIX + "lm_head.weight"}
    unexpected = sorted(set(tensors) - known)
    if missing or unexpected or wrong_shape:
        lines = [f"{adapter_dir / ADAPTER_WEIGHTS} does not match its {ADAPTER_CONFIG} and the base model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if items:
                more = " ..." if len(items) > 12 else ""
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:12]) + more)
        raise ExportError("\n".join(lines))
    adapters: dict = {}
    for path, array in buffers.items():
        _set_leaf(adapters, path, jnp.asarray(array))
    log.info("PEFT adapter <- %s: r=%d alpha=%s%s, targets %s", adapter_dir, lora_cfg.rank, lora_cfg.alpha,
             " (rsLoRA)" if lora_cfg.rslora else "", ",".join(lora_cfg.targets))
    return adapters, lora_cfg


def load_peft_embedding_layers(adapter_dir: str | os.PathLike, base_cfg: ModelConfig) -> dict:
    """The full embedding / head matrices saved in a PEFT adapter (save_embedding_layers) as a param
    subtree in our layout ({} when the adapter holds none). lm_head is left out for tied models."""
    tensors = read_adapter_tensors(pathlib.Path(adapter_dir))
    dtype = DTYPES[base_cfg.param_dtype]
    subtree: dict = {}
    for name, tensor in tensors.items():
        if name in (PEFT_PREFIX + "model.embed_tokens.weight", PEFT_PREFIX + "model.embed_tokens.base_layer.weight"):
            _set_leaf(subtree, ("model", "embed_tokens", "embedding"), jnp.asarray(tensor, dtype))
        elif name in (PEFT_PREFIX + "lm_head.weight", PEFT_PREFIX + "lm_head.base_layer.weight"):
            if not base_cfg.tie_word_embeddings:
                _set_leaf(subtree, ("lm_head", "kernel"), jnp.asarray(tensor.T, dtype))
    return subtree


# ============================================================================================
# Merged HF model out


def _save_safetensors(tensors: dict[str, np.ndarray], file: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(file), metadata={"format": "pt"})


def write_sharded_safetensors(tensors: Iterable[tuple[str, np.ndarray]], out_dir: pathlib.Path,
                              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write tensors into shards of at most max_shard_bytes (a bigger single tensor gets its own);
    one shard is `model.safetensors`, several are `model-0000k-of-0000n.safetensors` plus
    `model.safetensors.index.json`, as transformers' save_pretrained writes them. Returns file names."""
    shard_maps: list[list[str]] = []
    current: dict[str, np.ndarray] = {}
    current_bytes = total_bytes = 0

    def flush():
        _save_safetensors(current, out_dir / f"shard-{len(shard_maps)}.tmp")
        shard_maps.append(list(current))
        current.clear()

    for name, tensor in tensors:
        if current and current_bytes + tensor.nbytes > max_shard_bytes:
            flush()
            current_bytes = 0
        current[name] = tensor
        current_bytes += tensor.nbytes
        total_bytes += tensor.nbytes
    if current or not shard_maps:
        flush()
    count = len(shard_maps)
    files = (["model.safetensors"] if count == 1
             else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
    for i, file in enumerate(files):
        (out_dir / f"shard-{i}.tmp").rename(out_dir / file)
    if count > 1:
        index = {"metadata": {"total_size": total_bytes},
                 "weight_map": {name: files[i] for i, names in enumerate(shard_maps) for name in sorted(names)}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def source_dtype(hf_config: dict[str, Any]) -> str:
    """The dtype an HF config.json declares (transformers 5: `dtype`; older: `torch_dtype`); float32 if none."""
    declared = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    return declared if declared in EXPORT_DTYPES else "float32"


def merged_hf_config(source_config: dict[str, Any], merged_cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """The source config.json with what the export changed: tie_word_embeddings, vocab_size, dtype."""
    config = dict(source_config)
    config["tie_word_embeddings"] = merged_cfg.tie_word_embeddings
    config["vocab_size"] = merged_cfg.vocab_size
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    return config


def save_merged_model(
    params: dict,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    tokenizer=None,
    source_folder: str | os.PathLike | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> pathlib.Path:
    """Fold the adapters of `params` into the base weights (sums in float32) and write an HF model folder.

    params: base params plus LoRA leaves (cfg.lora set), or full params (cfg.lora None).
    source_folder: the base model's HF folder: its config.json is the template (tie_word_embeddings
      false when a tied head had to be untied, dtype and vocab_size updated); its
      generation_config.json is copied, and its tokenizer files when `tokenizer` is None.
    dtype: float32 | bfloat16 | float16; default: the dtype the source config.json declares.
    """
    if source_folder is None:
        raise ExportError("save_merged_model needs source_folder (the base model's HF folder, for config.json)")
    source_folder = pathlib.Path(source_folder)
    source_config = json.loads((source_folder / "config.json").read_text())
    dtype = dtype or source_dtype(source_config)
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype={dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    if pathlib.Path(out_dir).resolve() == source_folder.resolve():
        raise ExportError(f"{out_dir} is the source model folder; export elsewhere")
    merged, merged_cfg = lora.merge_adapters(params, cfg)
    if cfg.tie_word_embeddings and not merged_cfg.tie_word_embeddings:
        log.info("the tied model carries a vocabulary adapter (%s): the merged model is untied (lm_head.weight = "
                 "the base embedding plus the head's own delta, tie_word_embeddings=false)",
                 ",".join(t for t in cfg.lora.targets if t in lora.VOCABULARY_TARGETS))
    out_dtype = EXPORT_DTYPES[dtype]
    tensors = ((name, np.ascontiguousarray(array.astype(out_dtype, copy=False)))
               for name, array in hf.hf_tensor_items(merged, merged_cfg))
    with _staging_dir(out_dir, overwrite) as staging:
        files = write_sharded_safetensors(tensors, staging, max_shard_bytes)
        config = merged_hf_config(source_config, merged_cfg, dtype)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if (source_folder / "generation_config.json").exists():
            shutil.copy2(source_folder / "generation_config.json", staging / "generation_config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        else:
            for name in TOKENIZER_FILES:
                if (source_folder / name).exists():
                    shutil.copy2(source_folder / name, staging / name)
    log.info("merged %s model -> %s: %s params in %s, %d file(s)%s", merged_cfg.architecture, out_dir,
             f"{lora.count_params(merged):,}", dtype, len(files),
             "" if cfg.lora is None else f" (LoRA r={cfg.lora.rank} on {','.join(cfg.lora.targets)} folded in)")
    return pathlib.Path(out_dir)


@contextlib.contextmanager
def _staging_dir(out_dir: str | os.PathLike, overwrite: bool) -> Iterator[pathlib.Path]:
    """Write into a fresh sibling folder and move it into place at the end: a failed export leaves
    any earlier export at out_dir untouched. A non-empty out_dir is replaced only with overwrite."""
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty; choose another folder or pass overwrite "
                          f"(--overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


# ============================================================================================
# A training run's checkpoint -> export (the command line)


def read_run_config(workdir: pathlib.Path) -> dict[str, Any]:
    """WORKDIR/config.json (the resolved config the run was started with) as a plain dict."""
    file = workdir / "config.json"
    if not file.exists():
        raise ExportError(f"{workdir} has no config.json: is it the --workdir of a jaxtune.train run?")
    return json.loads(file.read_text())


def resolve_step(workdir: str | os.PathLike, step: str | int = "last") -> int:
    """'last' | 'best' (lowest eval loss) | a step number -> a step with a complete checkpoint."""
    from jaxtune import checkpoint

    directory = checkpoint.checkpoint_dir(workdir)
    steps = checkpoint.step_dirs(directory)
    if not steps:
        raise ExportError(f"no complete checkpoint in {directory}")
    if step == "last":
        return max(steps)
    if step == "best":
        losses = {}
        for number, path in steps.items():
            metrics_file = path / "metrics" / "metrics"  # orbax's per-step metrics item
            try:
                losses[number] = checkpoint.metric_for_best(json.loads(metrics_file.read_text()))
            except (OSError, ValueError):
                continue  # not evaluated at this step (or its metrics are unreadable)
        finite = {number: loss for number, loss in losses.items() if math.isfinite(loss)}
        if not finite:
            raise ExportError(f"--step=best ranks checkpoints by eval loss, and no checkpoint in {directory} has one "
                              f"(a run without data.eval has none): use --step=last or a step number "
                              f"({', '.join(map(str, sorted(steps)))}), or train with --config.data.eval=FILE")
        return min(finite, key=lambda number: (finite[number], -number))
    if str(step).isdigit() and int(step) in steps:
        return int(step)
    raise ExportError(f"--step={step}: choose last, best or one of the saved steps "
                      f"{', '.join(map(str, sorted(steps)))} (in {directory})")


def load_trained_params(workdir: str | os.PathLike, step: int) -> tuple[dict, dict[str, Any]]:
    """(trained params of checkpoint `step` as numpy arrays, the run's config dict).

    Only `params` is read from the checkpoint's state (not the optimizer state). For LoRA runs that
    is the adapter subtree (plus any other trained leaves); for full fine-tuning, every weight.
    Reads only: nothing in the workdir is created, moved or removed.
    """
    import orbax.checkpoint as ocp

    from jaxtune import checkpoint

    workdir = pathlib.Path(workdir)
    run_config = read_run_config(workdir)
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
    return restored["params"], run_config


def run_lora_config(run_config: dict[str, Any]) -> LoRAConfig | None:
    lo = run_config.get("lora", {})
    if not lo.get("enabled", True):
        return None
    return lora.lora_config(lo["rank"], lo["alpha"], lo.get("dropout", 0.0), lo["targets"], lo.get("rslora", False))


def check_shapes(tree: dict, cfg: ModelConfig, what: str, complete: bool = False) -> None:
    """Every leaf of `tree` is a parameter of the model of `cfg` with the same shape (and, if
    `complete`, every parameter is there), or one ExportError lists the differences."""
    from jaxtune.models.llama import abstract_params

    want = {_path(kp): leaf.shape for kp, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]}
    have = {_path(kp): np.shape(leaf) for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    problems = [f"{'/'.join(path)} is not a parameter of this model" for path in have if path not in want]
    problems += [f"{'/'.join(path)}: saved {tuple(shape)}, model expects {tuple(want[path])}"
                 for path, shape in have.items() if path in want and tuple(shape) != tuple(want[path])]
    if complete:
        problems += [f"{'/'.join(path)} is missing" for path in want if path not in have]
    if problems:
        raise ExportError(f"{what} does not fit the run's model config:\n  " + "\n  ".join(problems[:20])
                          + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))


def _path(key_path) -> Path:
    return tuple(k.key for k in key_path)


def base_embedding_layers(folder: pathlib.Path, cfg: ModelConfig) -> dict:
    """Only the embedding (and untied head) of the base model, read from its safetensors."""
    wanted = {"model.embed_tokens.weight": ("model", "embed_tokens", "embedding")}
    if not cfg.tie_word_embeddings:
        wanted["lm_head.weight"] = ("lm_head", "kernel")
    subtree: dict = {}
    for name, tensor in hf.read_hf_tensors(folder):
        if name in wanted:
            _set_leaf(subtree, wanted[name], np.asarray(tensor.T if name == "lm_head.weight" else tensor, np.float32))
    return subtree


def overlay(base: dict, trained: dict) -> dict:
    """`base` with every leaf of `trained` put in (added or replacing the base leaf)."""
    out = dict(base)
    for key, value in trained.items():
        out[key] = overlay(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def run_tokenizer(workdir: pathlib.Path, folder: pathlib.Path, run_config: dict[str, Any]):
    """The run's tokenizer: WORKDIR/tokenizer if the run saved one, else the base tokenizer with the
    run's data.add_tokens added as special tokens."""
    from jaxtune.api import load_tokenizer

    if (workdir / "tokenizer").is_dir():
        return load_tokenizer(workdir / "tokenizer")
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        log.warning("%s has no tokenizer files: the export holds none either", folder)
        return None
    tokenizer = load_tokenizer(folder)
    added = run_added_tokens(run_config)
    if added:
        tokenizer.add_tokens(list(added), special_tokens=True)
    return tokenizer


def run_added_tokens(run_config: dict[str, Any]) -> tuple[str, ...]:
    """The run's data.add_tokens, parsed as training parses them."""
    return vocab.parse_tokens(str(run_config.get("data", {}).get("add_tokens", "") or ""))


def embedding_layers_reason(run_config: dict[str, Any], trained_other: dict, save_embedding_layers: bool) -> str | None:
    """Why a PEFT export of the run must carry the full embedding layers, or None for a lean adapter.

    Decided on data.add_tokens, not on table sizes: a table with spare rows (Qwen) can keep its size
    while gaining tokens. Without new tokens the rows are exactly the base model's, which peft reads
    from the base model itself.
    """
    added = run_added_tokens(run_config)
    if save_embedding_layers:
        return "--save_embedding_layers"
    if added:
        return f"the run extended the vocabulary (data.add_tokens={','.join(added)})"
    if trained_other:
        return "the checkpoint holds trained embedding rows"
    return None


def peft_base_name(model_path: str, folder: pathlib.Path) -> str:
    """base_model_name_or_path for adapter_config.json: a hub id as given, else the local HF folder."""
    return str(folder) if model_path in hf.BUILT_IN_ALIASES or pathlib.Path(model_path).expanduser().exists() \
        else model_path


def trained_vocab_size(trained_other: dict, base_vocab_size: int) -> int:
    """Vocabulary size after training: the trained embedding's rows if the run trained one."""
    embedding = trained_other.get("model", {}).get("embed_tokens", {}).get("embedding")
    return base_vocab_size if embedding is None else int(np.shape(embedding)[0])


def export_run(workdir: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None, step: str | int = "last",
               dtype: str | None = None, overwrite: bool = False, save_embedding_layers: bool = False) -> pathlib.Path:
    """Export checkpoint `step` ('last', 'best' or a number) of the run in `workdir` as a PEFT adapter
    (fmt='peft') or a merged HF model (fmt='merged'); returns the output folder.

    save_embedding_layers: (peft) also write the full embedding / head matrices, as peft's
      save_embedding_layers=True does; they are written anyway when the run added tokens.
    """
    if fmt not in ("peft", "merged"):
        raise ExportError(f"--format={fmt}: choose peft or merged")
    if save_embedding_layers and fmt != "peft":
        raise ExportError("--save_embedding_layers applies to --format=peft (a merged model holds every weight)")
    workdir = pathlib.Path(workdir)
    lora_cfg = run_lora_config(read_run_config(workdir))
    if fmt == "peft" and lora_cfg is None:
        raise ExportError(f"{workdir} is a full fine-tuning run (lora.enabled=false): it has no adapter to export "
                          f"as PEFT; use --format=merged to write the full model")
    step_number = resolve_step(workdir, step)
    trained, run_config = load_trained_params(workdir, step_number)
    model_path = run_config["model"]["path"]
    folder = hf.resolve_model_dir(model_path, run_config["model"].get("revision") or None)
    base_cfg = hf.model_config_from_hf(folder, param_dtype="float32")
    adapters, trained_other = lora.split_trainable(trained, full_finetune=False) if lora_cfg else ({}, trained)
    cfg = base_cfg.replace(lora=lora_cfg, vocab_size=trained_vocab_size(trained_other, base_cfg.vocab_size))
    if cfg.vocab_size != base_cfg.vocab_size:
        log.info("the run extended the vocabulary: %d -> %d tokens", base_cfg.vocab_size, cfg.vocab_size)
    check_shapes(trained, cfg, f"checkpoint step {step_number} of {workdir}", complete=lora_cfg is None)
    tokenizer = run_tokenizer(workdir, folder, run_config)
    out = pathlib.Path(out) if out else workdir / "exports" / f"{fmt}-step{step_number}"
    log.info("exporting step %d of %s (%s) as %s", step_number, workdir,
             "full fine-tuning" if lora_cfg is None else f"LoRA r={lora_cfg.rank}", fmt)

    if fmt == "peft":
        not_embeddings = [p for p in (_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(trained_other)[0])
                          if p not in (("model", "embed_tokens", "embedding"), ("lm_head", "kernel"))]
        if not_embeddings:
            raise ExportError(f"trained leaves {', '.join('/'.join(p) for p in not_embeddings)} have no place in a "
                              f"PEFT adapter; use --format=merged")
        embedding_layers = None
        reason = embedding_layers_reason(run_config, trained_other, save_embedding_layers)
        if reason is not None:  # the full (trained or base) matrices, as peft's save_embedding_layers writes them
            log.info("writing the full embedding layers into the adapter: %s", reason)
            embedding_layers = overlay(base_embedding_layers(folder, base_cfg), trained_other)
            check_shapes(embedding_layers, cfg.replace(lora=None), "the embedding layers")
        return save_peft_adapter(adapters, cfg, out, peft_base_name(model_path, folder), tokenizer,
                                 embedding_layers, overwrite)

    base = {} if lora_cfg is None else hf.load_params(folder, base_cfg,
                                                      allow_pickle=bool(run_config["model"].get("allow_pickle")))
    params = overlay(base, trained)
    check_shapes(params, cfg, "the base weights with the trained ones", complete=True)
    return save_merged_model(params, cfg, out, tokenizer, folder, dtype, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxtune.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the training run's folder (holds config.json, checkpoints/)")
    parser.add_argument("--format", required=True, choices=("peft", "merged"), dest="fmt",
                        help="peft: adapter folder for peft.PeftModel; merged: full HF model folder")
    parser.add_argument("--out", default="", help="output folder (default WORKDIR/exports/FORMAT-stepN)")
    parser.add_argument("--step", default="last", help="last | best (lowest eval loss) | a step number")
    parser.add_argument("--dtype", default=None, choices=tuple(EXPORT_DTYPES),
                        help="merged weights dtype (default: the base model's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--save_embedding_layers", action="store_true",
                        help="peft: also write the full embedding / lm_head matrices (as peft's save_embedding_layers"
                             "=True); written anyway when the run added tokens (data.add_tokens)")
    args = parser.parse_args(argv)
    jaxtune.setup_logging()
    try:
        out = export_run(args.workdir, args.fmt, args.out or None, args.step, args.dtype, args.overwrite,
                         args.save_embedding_layers)
    except JaxtuneError as e:  # the user can fix it: one message, no traceback
        log.error("%s", e)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
