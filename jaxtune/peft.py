"""PEFT LoRA adapter folders in and out: `adapter_model.safetensors` + `adapter_config.json`.

What it owns:
  * `save_peft_adapter(adapters, cfg, out_dir, base_model_name_or_path, ...)`: our LoRA leaves ->
    an adapter folder laid out exactly as peft's `save_pretrained` writes it, so
    `peft.PeftModel.from_pretrained(hf_model, out_dir)` (and servers that read PEFT folders) load it.
  * `load_peft_adapter(adapter_dir, base_cfg)`: a PEFT LoRA folder (written by peft or by us) ->
    (our adapter tree, LoRAConfig). Features our model cannot reproduce are refused by name.
  * `load_peft_embedding_layers(adapter_dir, base_cfg)`: the full embedding matrices an adapter may carry.
  * the PEFT tensor names (`peft_tensor_names`) and adapter_config.json (`peft_adapter_config`,
    `read_adapter_config`, `check_supported`, `resolve_targets`).

Not to be confused with the third-party `peft` package: inside jaxtune this module is always
imported absolutely (`from jaxtune import peft as peft_io`).

PEFT layout (checked against peft 0.21.2 in tests/test_export.py). Every PEFT tensor is one of our
per-layer slices transposed:
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  [r, in]   = lora_a[i].T
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  [out, r]  = lora_b[i].T
    base_model.model.model.embed_tokens.lora_embedding_A              [r, V]    = lora_a.T  (no `.weight`)
    base_model.model.model.embed_tokens.lora_embedding_B              [D, r]    = lora_b.T
    base_model.model.lm_head.lora_A.weight / lora_B.weight            [r, D] / [V, r]  (tied heads too)
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_magnitude_vector  [out]  = lora_magnitude[i]
                                                                      (DoRA, adapter_config use_dora: true)
Full embedding matrices (peft's `save_embedding_layers`) are `...model.embed_tokens[.base_layer].weight`
[V, D] and `...lm_head[.base_layer].weight` [V, D], `.base_layer` when that module carries an adapter;
tied models write both names, as peft does. The command line writes them only when the run extended
the vocabulary (data.add_tokens) or when asked to (--save_embedding_layers). peft's "auto" writes
them whenever embed_tokens / lm_head is a target, although without new tokens they are exactly the
base model's rows (1 GB per matrix for Llama-3.2-1B in float32): our adapter stays lean, and peft loads it over
the base model as it is.

"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxtune import hf, lora
from jaxtune import params as params_lib
from jaxtune.hf import ExportError
from jaxtune.models.llama import ADAPTER_DTYPE, ALL_TARGETS, DTYPES, LINEAR_TARGETS, LoRAConfig, ModelConfig

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."

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
            if cfg.lora.dora:
                yield f"{prefix}.lora_magnitude_vector", base + ("lora_magnitude",), layer


def embedding_layer_names(cfg: ModelConfig) -> dict[str, str]:
    """'embed_tokens' / 'lm_head' -> the key peft's save_embedding_layers uses for the full matrix."""
    targets = cfg.lora.targets if cfg.lora is not None else ()
    return {target: PEFT_PREFIX + module_name(target, None) + (".base_layer" if target in targets else "") + ".weight"
            for target in ("embed_tokens", "lm_head")}


def _adapter_leaf(tree: dict, path: Path):
    try:
        return params_lib.get_leaf(tree, path)
    except KeyError:
        raise ExportError(f"the adapter tree has no {'/'.join(path)} (expected for targets of cfg.lora)") from None


# ============================================================================================
# PEFT adapter out


def peft_adapter_tensors(adapters: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Our LoRA leaves -> (PEFT key, array in PEFT layout), one layer slice at a time (matrices
    transposed; a DoRA magnitude [out] is the same vector in both)."""
    for name, path, layer in peft_tensor_names(cfg):
        stacked = np.asarray(_adapter_leaf(adapters, path))
        yield name, np.ascontiguousarray((stacked if layer is None else stacked[layer]).T)


def embedding_layer_tensors(embedding_layers: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Full embedding / head matrices in peft's save_embedding_layers layout (both names when tied)."""
    names = embedding_layer_names(cfg)
    embedding = np.asarray(_adapter_leaf(embedding_layers, ("model", "embed_tokens", "embedding")))
    yield names["embed_tokens"], np.ascontiguousarray(embedding)
    if cfg.tie_word_embeddings:
        yield names["lm_head"], np.ascontiguousarray(embedding)
    else:
        yield names["lm_head"], np.ascontiguousarray(np.asarray(_adapter_leaf(embedding_layers, ("lm_head", "kernel"))).T)


def describe_variant(lora_cfg: LoRAConfig) -> str:
    """' (rsLoRA, DoRA)' / ' (DoRA)' / '' for log lines."""
    names = [name for name, on in (("rsLoRA", lora_cfg.rslora), ("DoRA", lora_cfg.dora)) if on]
    return f" ({', '.join(names)})" if names else ""


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def peft_adapter_config(lora_cfg: LoRAConfig, base_model_name_or_path: str | None) -> dict[str, Any]:
    """adapter_config.json contents for a LoRA (DoRA: use_dora), with the keys peft 0.21.2 writes."""
    return {
        **_PEFT_LORA_CONFIG_DEFAULTS,
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.rank,
        "lora_alpha": _number(lora_cfg.alpha),
        "lora_dropout": float(lora_cfg.dropout),
        "target_modules": sorted(lora_cfg.targets),
        "use_rslora": lora_cfg.rslora,
        "use_dora": lora_cfg.dora,
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
    with hf.staging_dir(out_dir, overwrite) as staging:
        hf.save_safetensors(tensors, staging / ADAPTER_WEIGHTS)
        config = peft_adapter_config(cfg.lora, base_model_name_or_path)
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    log.info("PEFT adapter -> %s: r=%d alpha=%s%s, targets %s, %s adapter params%s%s", out_dir, cfg.lora.rank,
             cfg.lora.alpha, describe_variant(cfg.lora), ",".join(cfg.lora.targets),
             f"{params_lib.count_params(adapters):,}",
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
                          + ". jaxtune imports LoRA / rsLoRA / DoRA adapters.")


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
    `api.logits(model, tokens, params=params.merge_trees(base, adapters), lora=lora_cfg)`. An adapter trained
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
    vocabulary = [t for t in targets if t in lora.VOCABULARY_TARGETS]
    if config.get("use_dora") and vocabulary:
        raise ExportError(f"{config_file}: use_dora=true on {', '.join(vocabulary)}: jaxtune's DoRA adapts the "
                          f"linear layers of the blocks only (DoRA on the embedding / lm_head is not implemented)")
    try:
        lora_cfg = lora.lora_config(config.get("r", 8), config.get("lora_alpha", 8), config.get("lora_dropout", 0.0),
                                    targets, bool(config.get("use_rslora", False)), bool(config.get("use_dora", False)))
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
    shapes = params_lib.shapes(lora.adapter_shapes(cfg))
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
    params_lib.raise_mismatch(ExportError, f"{adapter_dir / ADAPTER_WEIGHTS} does not match its {ADAPTER_CONFIG} "
                              f"and the base model", missing, unexpected, wrong_shape)
    adapters: dict = {}
    for path, array in buffers.items():
        params_lib.set_leaf(adapters, path, jnp.asarray(array))
    log.info("PEFT adapter <- %s: r=%d alpha=%s%s, targets %s", adapter_dir, lora_cfg.rank, lora_cfg.alpha,
             describe_variant(lora_cfg), ",".join(lora_cfg.targets))
    return adapters, lora_cfg


def load_peft_embedding_layers(adapter_dir: str | os.PathLike, base_cfg: ModelConfig) -> dict:
    """The full embedding / head matrices saved in a PEFT adapter (save_embedding_layers) as a param
    subtree in our layout ({} when the adapter holds none). lm_head is left out for tied models."""
    tensors = read_adapter_tensors(pathlib.Path(adapter_dir))
    dtype = DTYPES[base_cfg.param_dtype]
    subtree: dict = {}
    for name, tensor in tensors.items():
        if name in (PEFT_PREFIX + "model.embed_tokens.weight", PEFT_PREFIX + "model.embed_tokens.base_layer.weight"):
            params_lib.set_leaf(subtree, ("model", "embed_tokens", "embedding"), jnp.asarray(tensor, dtype))
        elif name in (PEFT_PREFIX + "lm_head.weight", PEFT_PREFIX + "lm_head.base_layer.weight"):
            if not base_cfg.tie_word_embeddings:
                params_lib.set_leaf(subtree, ("lm_head", "kernel"), jnp.asarray(tensor.T, dtype))
    return subtree
