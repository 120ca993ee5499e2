"""Hugging Face model folders in and out: resolution, config.json -> ModelConfig, safetensors <-> param tree.

What it owns:
  * `resolve_model_dir(path)`: a built-in alias (`smollm2-135m-instruct`), a local HF folder, or a
    hub id (downloaded through huggingface_hub where a network exists). Remote code is never run.
  * `model_config_from_hf(folder)`: the HF config (read with transformers' AutoConfig, so that its
    defaults and RoPE conventions apply) -> `ModelConfig`.
  * `load_params(folder, cfg)`: weights read tensor by tensor (memory-mapped), transposed into
    our [in, out] kernels, stacked over layers, cast to the param dtype and checked: missing,
    unexpected or wrongly shaped tensors give one `WeightsError` listing them all.
  * `load_tokenizer(folder)`: the folder's tokenizer (also used for a run's saved tokenizer).
  * `hf_tensor_items(params, cfg)`: the inverse table; `save_merged_model(params, cfg, out_dir, ...)`:
    adapters folded into the base weights (float32 sums), cast to one dtype, written as an HF folder
    (config.json, sharded safetensors, tokenizer, generation_config.json) that
    `transformers.AutoModelForCausalLM.from_pretrained` loads, through `staging_dir` (a failed write
    leaves any earlier folder untouched; shared with jaxtune.peft).
Pickled `.bin` weights are refused unless `allow_pickle=True`. Reading and writing share the one
name table (`param_path` / `hf_name_of`), which is why both live here.

A tied model with an embed_tokens or lm_head adapter cannot stay tied once merged: in training (and
in peft) the input embedding is E + dE while the head is the base E (+ dH^T of its own adapter), and
one shared matrix holds only one of them. The merged export unties it (lm_head.weight written,
tie_word_embeddings false), whichever of the two carries the adapter. peft's own merge_and_unload
keeps the tie and gets the logits wrong there (peft issue #2777).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy

import jaxtune
from jaxtune import architectures, lora, smollm2
from jaxtune import params as params_lib
from jaxtune.errors import JaxtuneError
from jaxtune.models import quant
from jaxtune.models.llama import DTYPES, ModelConfig, abstract_params

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
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


class ExportError(JaxtuneError, ValueError):
    """An export or import (HF folder, PEFT adapter, training run) that cannot be done; the message
    says which file / key and why. Raised by hf, peft, workdir and export alike."""


# --------------------------------------------------------------------------------------------
# Resolution


def resolve_model_dir(path: str, revision: str | None = None, *, config_only: bool = False) -> pathlib.Path:
    """Alias, local folder or hub id -> a local folder holding config.json and weights.

    `arch:NAME` (jaxtune.architectures: a shipped config.json, no weights) resolves only with
    `config_only=True` (the planner); anything that needs weights gets a ModelError saying what to pass.
    """
    if architectures.is_architecture(path):
        return _architecture_dir(path, config_only)
    if path in BUILT_IN_ALIASES:
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


def _architecture_dir(path: str, config_only: bool) -> pathlib.Path:
    try:
        folder = architectures.folder(path)
    except ValueError as e:
        raise ModelError(str(e)) from None
    if not config_only:
        raise ModelError(f"model.path={path!r} is a shipped architecture (a config.json without weights, for "
                         f"`python -m jaxtune.plan`): to train or run it, set model.path to the weights' folder "
                         f"or hub id, e.g. --config.model.path={architectures.source_repo(path)}")
    return folder


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
    cfg = ModelConfig(
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
    if cfg.quant is not None and cfg.tie_word_embeddings and "lm_head" in cfg.quant.targets:
        raise ModelError(f"{folder}/config.json: tied embeddings (tie_word_embeddings=true), so lm_head is the "
                         f"embedding, which is not quantised: leave lm_head out of model.quantize_targets")
    return cfg


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
    """Base (non-LoRA, float) param path -> shape, from the model definition itself."""
    return params_lib.shapes(abstract_params(cfg.replace(lora=None, quant=None)))


def load_params(
    folder: str | os.PathLike,
    cfg: ModelConfig,
    allow_pickle: bool = False,
    place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
) -> dict:
    """Read the base weights of `folder` into our nested param dict (no LoRA leaves).

    `place(path, array)` puts each finished leaf on devices (default: jnp.asarray on the default
    device); the sharding module passes one that puts each leaf straight into its sharding.
    With cfg.quant (model.quantize=nf4) each targeted kernel is quantised on the host CPU, one
    stacked leaf at a time, and only its NF4 leaves are placed (`quantized_leaves`).
    """
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
    params_lib.raise_mismatch(WeightsError, f"weights in {folder} do not match the {cfg.architecture} config",
                              missing, unexpected, wrong_shape, hint="Is config.json from the same checkpoint as the weights?")
    params: dict = {}
    for path in list(buffers):
        array = buffers.pop(path)  # each float leaf is dropped once placed (or quantised)
        for leaf_path, leaf in quantized_leaves(path, array, cfg).items():
            params_lib.set_leaf(params, leaf_path, place(leaf_path, leaf))
    return params


def quantized_target(cfg: ModelConfig, path: tuple[str, ...]) -> bool:
    """Whether the base weight at `path` is stored quantised under cfg.quant (a targeted kernel)."""
    if cfg.quant is None or path[-1] != "kernel":
        return False
    return path[-2] in cfg.quant.targets


def quantized_leaves(path: tuple[str, ...], array: np.ndarray, cfg: ModelConfig) -> dict[tuple[str, ...], np.ndarray]:
    """{path: array} of one loaded base leaf: itself, or the NF4 leaves of a targeted kernel ([in, out],
    stacked [L, in, out] under model/layers), quantised in HF layout [out, in] on the host CPU (no
    accelerator ever holds the float copy)."""
    if not quantized_target(cfg, path):
        return {path: array}
    try:
        quant.check_quantizable(array.shape[:-2] + array.shape[-1:] + array.shape[-2:-1], hf_name_of(path))
    except ValueError as e:
        raise WeightsError(f"{e}; leave {path[-2]} out of model.quantize_targets") from None
    with jax.default_device(jax.devices("cpu")[0]):
        leaves = quant.quantize(jnp.swapaxes(jnp.asarray(array, jnp.float32), -1, -2), cfg.quant.double,
                                stacked=path[:2] == ("model", "layers"))
        return {(*path[:-1], name): np.asarray(leaf) for name, leaf in leaves.items()}


def dequantized_params(params: dict) -> dict:
    """`params` with every NF4 module (`nf4`, `absmax` ... leaves) back as a float32 `kernel` [in, out]:
    the weights a QLoRA run trained over, e.g. for a merged export that matches the trained model."""
    if quant.is_quantized(params):
        rest = {name: leaf for name, leaf in params.items() if name not in quant.ALL_LEAVES}
        return {**rest, "kernel": np.asarray(jnp.swapaxes(quant.dequantize(params, jnp.float32), -1, -2))}
    return {name: dequantized_params(node) if isinstance(node, dict) else node for name, node in params.items()}


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
    for path, leaf in params_lib.flat(params).items():
        if path[-1] in ("lora_a", "lora_b"):
            raise ValueError(f"merge LoRA into the base before exporting HF tensors (found {path})")
        array = np.asarray(leaf)
        transpose = path[-1] == "kernel"
        if path[:2] == ("model", "layers"):
            for layer in range(cfg.num_layers):
                yield hf_name_of(path, layer), np.ascontiguousarray(array[layer].T if transpose else array[layer])
        else:
            yield hf_name_of(path), np.ascontiguousarray(array.T if transpose else array)


def load_tokenizer(folder: str | os.PathLike):
    """The tokenizer of an HF folder (transformers' AutoTokenizer, never remote code)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def base_embedding_layers(folder: pathlib.Path, cfg: ModelConfig) -> dict:
    """Only the embedding (and untied head) of the base model, read from its safetensors."""
    wanted = {"model.embed_tokens.weight": ("model", "embed_tokens", "embedding")}
    if not cfg.tie_word_embeddings:
        wanted["lm_head.weight"] = ("lm_head", "kernel")
    subtree: dict = {}
    for name, tensor in read_hf_tensors(folder):
        if name in wanted:
            params_lib.set_leaf(subtree, wanted[name], np.asarray(tensor.T if name == "lm_head.weight" else tensor, np.float32))
    return subtree



# --------------------------------------------------------------------------------------------
# Writing: a merged HF model folder


@contextlib.contextmanager
def staging_dir(out_dir: str | os.PathLike, overwrite: bool) -> Iterator[pathlib.Path]:
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


def save_safetensors(tensors: dict[str, np.ndarray], file: pathlib.Path) -> None:
    """Write one safetensors file with the metadata transformers expects ({"format": "pt"})."""
    safetensors.numpy.save_file(tensors, str(file), metadata={"format": "pt"})


def write_sharded_safetensors(tensors: Iterable[tuple[str, np.ndarray]], out_dir: pathlib.Path,
                              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write tensors into shards of at most max_shard_bytes (a bigger single tensor gets its own);
    one shard is `model.safetensors`, several are `model-0000k-of-0000n.safetensors` plus
    `model.safetensors.index.json`, as transformers' save_pretrained writes them. Returns file names."""
    shard_maps: list[list[str]] = []
    current: dict[str, np.ndarray] = {}
    current_bytes = total_bytes = 0

    def flush():
        save_safetensors(current, out_dir / f"shard-{len(shard_maps)}.tmp")
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
               for name, array in hf_tensor_items(merged, merged_cfg))
    with staging_dir(out_dir, overwrite) as staging:
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
             f"{params_lib.count_params(merged):,}", dtype, len(files),
             "" if cfg.lora is None else f" (LoRA r={cfg.lora.rank} on {','.join(cfg.lora.targets)} folded in)")
    return pathlib.Path(out_dir)
