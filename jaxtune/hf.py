"""Hugging Face interop: model resolution, config.json -> ModelConfig, safetensors <-> param tree.

What it owns:
  * `resolve_model_dir(path)`: a built-in alias (`smollm2-135m-instruct`), a local HF folder, or a
    hub id (downloaded through huggingface_hub where a network exists). Remote code is never run.
  * `model_config_from_hf(folder)`: the HF config (read with transformers' AutoConfig, so that its
    defaults and RoPE conventions apply) -> `ModelConfig`.
  * `load_params(folder, cfg)`: weights read tensor by tensor (memory-mapped), transposed into
    our [in, out] kernels, stacked over layers, cast to the param dtype and checked: missing,
    unexpected or wrongly shaped tensors give one `WeightsError` listing them all.
  * `hf_tensor_items(params, cfg)`: the inverse table, for merged exports.
Pickled `.bin` weights are refused unless `allow_pickle=True`.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import struct
from collections.abc import Callable, Iterator
from typing import Any

import ml_dtypes
import numpy as np

import jaxtune
from jaxtune.errors import JaxtuneError
from jaxtune.models.llama import DTYPES, ModelConfig

log = logging.getLogger("jaxtune")

BUILT_IN_ALIASES = ("smollm2-135m-instruct",)  # materialised by jaxtune.smollm2
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

_SAFETENSORS_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}

# HF module path inside one decoder layer -> (our path under model/layers, is a Linear kernel)
_LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class WeightsError(JaxtuneError, ValueError):
    """Weights that do not fit the model: lists every missing, unexpected and mis-shaped tensor."""


class ModelError(JaxtuneError, ValueError):
    """A model that cannot be resolved or is not supported."""


# --------------------------------------------------------------------------------------------
# Resolution


def resolve_model_dir(path: str, revision: str | None = None) -> pathlib.Path:
    """Alias, local folder or hub id -> a local folder holding config.json and weights."""
    if path in BUILT_IN_ALIASES:
        from jaxtune import smollm2

        return smollm2.materialize(path)
    local = pathlib.Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelError(f"{local} has no config.json: point model.path at a Hugging Face model folder")
        return local
    if local.exists() or path.startswith((".", "/", "~")):
        raise ModelError(f"model path {path!r} is not a folder (expected an HF model folder, a hub id, "
                         f"or an alias: {', '.join(BUILT_IN_ALIASES)})")
    return _download_from_hub(path, revision)


def _download_from_hub(repo_id: str, revision: str | None) -> pathlib.Path:
    import huggingface_hub

    log.info("downloading %s from the Hugging Face hub (safetensors, configs, tokenizer only)", repo_id)
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"],
        )
    except Exception as e:  # network errors, unknown repos, gated models
        raise ModelError(f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                         f"Offline? Pass a local folder or a built-in alias instead.") from e
    return pathlib.Path(folder)


# --------------------------------------------------------------------------------------------
# Config


def model_config_from_hf(folder: str | os.PathLike, **overrides) -> ModelConfig:
    """Read an HF config with AutoConfig (trust_remote_code=False) and map it to ModelConfig."""
    import transformers

    try:
        hf = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise ModelError(f"{folder}/config.json: {e}") from e
    architecture = (getattr(hf, "architectures", None) or ["?"])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"{folder}/config.json: architecture {architecture!r} is not supported; "
                         f"jaxtune ports {', '.join(SUPPORTED_ARCHITECTURES)}")
    is_qwen2, is_qwen3 = architecture == "Qwen2ForCausalLM", architecture == "Qwen3ForCausalLM"
    attention_bias = bool(getattr(hf, "attention_bias", False))
    sliding_window = None
    if architecture == "MistralForCausalLM":
        sliding_window = getattr(hf, "sliding_window", None)
    elif getattr(hf, "use_sliding_window", False):
        raise ModelError(f"{folder}/config.json: use_sliding_window=true (per-layer windows) is not supported")
    return ModelConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        rms_norm_eps=hf.rms_norm_eps,
        rope_theta=_rope_parameters(hf)["rope_theta"],
        rope_scaling=_rope_scaling(hf),
        max_position_embeddings=getattr(hf, "max_position_embeddings", 4096),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=is_qwen2 or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        qk_norm=is_qwen3,
        sliding_window=sliding_window,
        architecture=architecture,
    ).replace(**overrides)


def _rope_parameters(hf) -> dict[str, Any]:
    """transformers 5 keeps RoPE in `rope_parameters`; older configs in rope_theta / rope_scaling."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf, "rope_theta", 10000.0)
    legacy = getattr(hf, "rope_scaling", None)
    if legacy and "rope_type" not in params:
        params.update(legacy)
    return params


def _rope_scaling(hf) -> tuple[tuple[str, Any], ...] | None:
    params = _rope_parameters(hf)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    keep = {k: v for k, v in params.items() if k != "rope_theta" and v is not None}
    keep["rope_type"] = rope_type
    return tuple(sorted(keep.items()))


# --------------------------------------------------------------------------------------------
# Reading tensors


def _safetensors_files(folder: pathlib.Path) -> list[pathlib.Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))


def read_safetensors(file: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) memory-mapped from one safetensors file, any dtype incl. bfloat16."""
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + header_len)
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _SAFETENSORS_DTYPES:
            raise WeightsError(f"{file}: tensor {name} has unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        yield name, data[start:end].view(_SAFETENSORS_DTYPES[meta["dtype"]]).reshape(meta["shape"])


def _pickled_files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(folder.glob("pytorch_model*.bin"))


def read_hf_tensors(folder: pathlib.Path, allow_pickle: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """All tensors of an HF folder. Pickled .bin only with allow_pickle (torch.load, weights_only)."""
    files = _safetensors_files(folder)
    if files:
        for file in files:
            yield from read_safetensors(file)
        return
    pickled = _pickled_files(folder)
    if not pickled:
        raise WeightsError(f"{folder}: no model.safetensors (or sharded index) found")
    if not allow_pickle:
        raise WeightsError(
            f"{folder} holds only pickled PyTorch weights ({pickled[0].name}). Pickles can run code when "
            f"loaded; jaxtune refuses them by default. Convert them to safetensors, or, if you trust the "
            f"source, set --config.model.allow_pickle=True (needs torch)."
        )
    try:
        import torch
    except ImportError as e:
        raise jaxtune.MissingPackageError("torch", "reading pickled PyTorch weights (model.allow_pickle=True)",
                                          declared=False, cause=e) from e

    for file in pickled:
        for name, tensor in torch.load(file, map_location="cpu", weights_only=True).items():
            yield name, tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


# --------------------------------------------------------------------------------------------
# HF names <-> param paths


def param_path(hf_name: str) -> tuple[tuple[str, ...], int | None, bool] | None:
    """HF tensor name -> (our path, layer index or None, transpose?). None for unknown names."""
    if hf_name == "model.embed_tokens.weight":
        return ("model", "embed_tokens", "embedding"), None, False
    if hf_name == "model.norm.weight":
        return ("model", "norm", "scale"), None, False
    if hf_name == "lm_head.weight":
        return ("lm_head", "kernel"), None, True
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    if not match:
        return None
    layer, module, kind = int(match.group(1)), match.group(2), match.group(3)
    sub = ("model", "layers", *module.split("."))
    if module in _LAYER_LINEARS:
        return (*sub, "kernel" if kind == "weight" else "bias"), layer, kind == "weight"
    if module in _LAYER_NORMS and kind == "weight":
        return (*sub, "scale"), layer, False
    return None


def expected_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Base (non-LoRA) param path -> shape, from the model definition itself."""
    import jax

    from jaxtune.models.llama import abstract_params

    base_cfg = cfg.replace(lora=None)
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(base_cfg))[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def load_params(
    folder: str | os.PathLike,
    cfg: ModelConfig,
    allow_pickle: bool = False,
    place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
) -> dict:
    """Read the base weights of `folder` into our nested param dict (no LoRA leaves).

    `place(path, array)` puts each finished leaf on devices (default: jnp.asarray on the default
    device); the sharding module passes one that puts each leaf straight into its sharding.
    """
    import jax.numpy as jnp

    folder = pathlib.Path(folder)
    place = place or (lambda path, array: jnp.asarray(array))
    param_dtype = np.dtype(DTYPES[cfg.param_dtype])
    shapes = expected_shapes(cfg)
    buffers: dict[tuple[str, ...], np.ndarray] = {}
    layers_seen: dict[tuple[str, ...], set[int]] = {}
    unexpected, wrong_shape = [], []
    reported: set[tuple[tuple[str, ...], int | None]] = set()

    for name, tensor in read_hf_tensors(folder, allow_pickle):
        if _IGNORED.match(name):
            continue
        mapped = param_path(name)
        if mapped is None or mapped[0] not in shapes:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some tied checkpoints also store the (identical) head
            unexpected.append(name)
            continue
        path, layer, transpose = mapped
        value = tensor.T if transpose else tensor
        want = shapes[path][1:] if layer is not None else shapes[path]
        if tuple(value.shape) != tuple(want) or (layer is not None and layer >= cfg.num_layers):
            wrong_shape.append(f"{name}: file {tuple(tensor.shape)}, model expects "
                               f"{tuple(want[::-1]) if transpose else tuple(want)}"
                               + (f" (layer {layer} of {cfg.num_layers})" if layer is not None else ""))
            reported.add((path, layer))  # listed as mis-shaped, so not also as missing
            continue
        if layer is None:
            buffers[path] = np.asarray(value, dtype=param_dtype)
        else:
            if path not in buffers:
                buffers[path] = np.zeros(shapes[path], dtype=param_dtype)
            buffers[path][layer] = value
            layers_seen.setdefault(path, set()).add(layer)

    missing = []
    for path, shape in shapes.items():
        if path[:2] != ("model", "layers"):
            if path not in buffers and (path, None) not in reported:
                missing.append(hf_name_of(path))
            continue
        absent = [i for i in range(cfg.num_layers) if i not in layers_seen.get(path, ()) and (path, i) not in reported]
        if absent:
            missing.append(f"{hf_name_of(path)} for layers {absent}")
    if missing or unexpected or wrong_shape:
        lines = [f"weights in {folder} do not match the {cfg.architecture} config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        lines.append("Is config.json from the same checkpoint as the weights?")
        raise WeightsError("\n".join(lines))

    params: dict = {}
    for path, array in buffers.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = place(path, array)
    return params


def hf_name_of(path: tuple[str, ...], layer: int | None = None) -> str:
    """Our param path -> HF tensor name (layer index as N when not given)."""
    if path == ("model", "embed_tokens", "embedding"):
        return "model.embed_tokens.weight"
    if path == ("model", "norm", "scale"):
        return "model.norm.weight"
    if path == ("lm_head", "kernel"):
        return "lm_head.weight"
    module = ".".join(path[2:-1])
    kind = "bias" if path[-1] == "bias" else "weight"
    return f"model.layers.{'N' if layer is None else layer}.{module}.{kind}"


def hf_tensor_items(params: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Base params (no LoRA leaves) -> (HF name, array in HF layout), one layer slice at a time."""
    import jax

    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = tuple(k.key for k in key_path)
        if path[-1] in ("lora_a", "lora_b"):
            raise ValueError(f"merge LoRA into the base before exporting HF tensors (found {path})")
        array = np.asarray(leaf)
        transpose = path[-1] == "kernel"
        if path[:2] == ("model", "layers"):
            for layer in range(cfg.num_layers):
                yield hf_name_of(path, layer), np.ascontiguousarray(array[layer].T if transpose else array[layer])
        else:
            yield hf_name_of(path), np.ascontiguousarray(array.T if transpose else array)

