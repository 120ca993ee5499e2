"""Loading a model to run: a base model (`load`), plus a run's checkpoint or a PEFT adapter.

This module owns `LoadedModel` and `load` (alias, HF folder or hub id -> config, params, tokenizer;
re-exported as `jaxtune.api.load`), and `load_for_inference`, shared by
`python -m jaxtune.generate --adapter=DIR` and `python -m jaxtune.evaluate`:

    from jaxtune import generate, loading
    model, params, lora_cfg = loading.load_for_inference(None, "runs/lora_llama", "float32")
    generate.generate_text(model, ["Hi"], 32, params=params, lora=lora_cfg)

`adapter` is one of
  * a jaxtune workdir (it has config.json): the base model is the run's model.path unless one is
    given; the checkpoint is `step` ('last', 'best' or a number). A LoRA run's trained leaves are put
    over the base weights; a full fine-tuning run's params replace them. A QLoRA run's base
    (model.quantize=nf4) is quantised at load exactly as training quantised it: its adapters were
    trained over the NF4 weights, not the float ones.
  * a PEFT LoRA adapter folder (it has adapter_config.json): the base model is the one given, else
    the adapter's base_model_name_or_path.
  * None: the model itself.

The returned LoadedModel is the BASE model (cfg without LoRA, base params, the tokenizer to use);
`params` / `lora_cfg` are what to pass as `params=` / `lora=` to generate, api.logits or evaluate.
`adapter_template` is the data.template prompts for an adapter are rendered with (a run's own).
`load_tokenizer` is jaxtune.hf's (re-exported here): a run's saved tokenizer is read below this layer.
When a run extended the vocabulary, the base model's embedding (and untied head) are extended with
the run's new rows so that both share one config.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from jaxtune import config as config_lib
from jaxtune import hf, lora
from jaxtune import params as params_lib
from jaxtune import peft as peft_io
from jaxtune import workdir as workdir_lib
from jaxtune.errors import JaxtuneError
from jaxtune.hf import load_tokenizer
from jaxtune.models.llama import DTYPES, Llama, LoRAConfig, ModelConfig
from jaxtune.models.quant import QuantConfig

__all__ = ["InferenceError", "LoadedModel", "adapter_kind", "adapter_template", "base_model_path", "extend_vocab", "load",
           "load_for_inference", "load_peft", "load_run", "load_tokenizer", "load_with_info"]

log = logging.getLogger(__name__)

RUN_CONFIG = workdir_lib.RUN_CONFIG


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: its config, params (nested dict), tokenizer and source folder."""

    cfg: ModelConfig
    params: dict
    tokenizer: Any
    folder: pathlib.Path

    @property
    def module(self) -> Llama:
        return Llama(self.cfg)


def load(
    path: str,
    param_dtype: str = "float32",
    compute_dtype: str = "float32",
    allow_pickle: bool = False,
    revision: str | None = None,
    with_tokenizer: bool = True,
    quant: QuantConfig | None = None,
) -> LoadedModel:
    """Resolve `path` (alias, HF folder or hub id), read its config and weights, and its tokenizer.

    quant: store the targeted kernels as NF4 (a QLoRA run's base, exactly as training quantised it)."""
    folder = hf.resolve_model_dir(path, revision)
    cfg = hf.model_config_from_hf(folder, param_dtype=param_dtype, compute_dtype=compute_dtype, quant=quant)
    params = hf.load_params(folder, cfg, allow_pickle=allow_pickle)
    tokenizer = hf.load_tokenizer(folder) if with_tokenizer else None
    return LoadedModel(cfg, params, tokenizer, folder)


class InferenceError(JaxtuneError, ValueError):
    """The model / adapter combination cannot be loaded; the message says why."""


def adapter_kind(adapter: str | pathlib.Path) -> str:
    """'workdir' (jaxtune run) or 'peft' (PEFT adapter folder), or InferenceError."""
    directory = pathlib.Path(adapter)
    if (directory / peft_io.ADAPTER_CONFIG).is_file():
        return "peft"
    if (directory / RUN_CONFIG).is_file():
        return "workdir"
    raise InferenceError(f"--adapter={adapter}: neither a jaxtune workdir (no {RUN_CONFIG}) nor a PEFT adapter "
                         f"folder (no {peft_io.ADAPTER_CONFIG})")


def base_model_path(model: str | None, adapter: str | pathlib.Path | None) -> str:
    """The base model to load: the one given, else the run's model.path / the adapter's base model."""
    if model:
        return model
    if adapter is None:
        raise InferenceError("give --model (an alias, HF folder or hub id) or --adapter=DIR")
    directory = pathlib.Path(adapter)
    if adapter_kind(directory) == "workdir":
        return workdir_lib.read_run_config(directory).model.path
    name = peft_io.read_adapter_config(directory).get("base_model_name_or_path")
    if not name:
        raise InferenceError(f"{directory / peft_io.ADAPTER_CONFIG} names no base_model_name_or_path: give --model")
    return name


def adapter_template(adapter: str | pathlib.Path | None) -> str:
    """How prompts for `adapter` are rendered (a data.template value): a jaxtune run's data.template,
    as it trained; 'auto' (the tokenizer's chat template) for a PEFT folder or no adapter."""
    if adapter is None or adapter_kind(adapter) == "peft":
        return "auto"
    return workdir_lib.read_run_config(adapter).data.template


def extend_vocab(base: dict, trained: dict, vocab_size: int) -> dict:
    """`base` with its embedding [V0, D] (and untied lm_head [D, V0]) grown to vocab_size rows taken
    from the trained matrices (rows V0.. are the tokens the run added)."""
    out = jax.tree_util.tree_map(lambda x: x, base)
    embedding = out["model"]["embed_tokens"]["embedding"]
    old = embedding.shape[0]
    if old == vocab_size:
        return out
    new_rows = jnp.asarray(trained["model"]["embed_tokens"]["embedding"][old:], embedding.dtype)
    out["model"]["embed_tokens"]["embedding"] = jnp.concatenate([embedding, new_rows], axis=0)
    head = out.get("lm_head", {}).get("kernel")
    if head is not None:
        new_cols = jnp.asarray(trained["lm_head"]["kernel"][:, old:], head.dtype)
        out["lm_head"]["kernel"] = jnp.concatenate([head, new_cols], axis=1)
    return out


def load_run(model_path: str, workdir: pathlib.Path, dtype: str, step: str | int):
    """(base LoadedModel, fine-tuned params, LoRAConfig | None, step number) of a jaxtune run."""
    run = workdir_lib.read_run_config(workdir)
    if model_path != run.model.path:
        log.warning("%s was trained from %s; loading it over %s", workdir, run.model.path, model_path)
    step_number = workdir_lib.resolve_step(workdir, step)
    trained = workdir_lib.load_trained_params(workdir, step_number)
    lora_cfg = workdir_lib.run_lora_config(run)
    model = load(model_path, param_dtype=dtype, compute_dtype=dtype, allow_pickle=bool(run.model.allow_pickle),
                 revision=run.model.revision or None, with_tokenizer=False, quant=config_lib.quant_config(run.model))
    model.tokenizer = workdir_lib.run_tokenizer(workdir, model.folder, run)
    adapters, other = lora.split_trainable(trained, full_finetune=False) if lora_cfg else ({}, trained)
    vocab_size = workdir_lib.trained_vocab_size(other, model.cfg.vocab_size)
    if vocab_size != model.cfg.vocab_size:
        log.info("the run extended the vocabulary: %d -> %d tokens", model.cfg.vocab_size, vocab_size)
        model.params = extend_vocab(model.params, other, vocab_size)
        model.cfg = model.cfg.replace(vocab_size=vocab_size)
    workdir_lib.check_fits(trained, model.cfg.replace(lora=lora_cfg), f"checkpoint step {step_number} of {workdir}",
                           complete=lora_cfg is None)
    params = params_lib.overlay(model.params, params_lib.cast_tree(trained, DTYPES[dtype]))
    log.info("loaded step %d of %s (%s)", step_number, workdir,
             "full fine-tuning" if lora_cfg is None else f"LoRA r={lora_cfg.rank}")
    return model, params, lora_cfg, step_number


def load_peft(model_path: str, adapter_dir: pathlib.Path, dtype: str):
    """(base LoadedModel, base params + adapters, LoRAConfig) for a PEFT adapter folder."""
    model = load(model_path, param_dtype=dtype, compute_dtype=dtype)
    if any((adapter_dir / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        model.tokenizer = load_tokenizer(adapter_dir)
    adapters, lora_cfg = peft_io.load_peft_adapter(adapter_dir, model.cfg)
    return model, params_lib.merge_trees(model.params, adapters), lora_cfg


def load_for_inference(model_path_or_alias: str | None, adapter: str | pathlib.Path | None,
                       dtype: str = "float32", step: str | int = "last"
                       ) -> tuple[LoadedModel, dict, LoRAConfig | None]:
    """(base LoadedModel, params to run, LoRAConfig or None); see the module docstring."""
    info = load_with_info(model_path_or_alias, adapter, dtype, step)
    return info["model"], info["params"], info["lora"]


def load_with_info(model_path_or_alias: str | None, adapter: str | pathlib.Path | None,
                   dtype: str = "float32", step: str | int = "last") -> dict:
    """load_for_inference plus what was loaded: {model, params, lora, model_path, adapter_kind, step}."""
    if dtype not in DTYPES:
        raise InferenceError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    model_path = base_model_path(model_path_or_alias, adapter)
    if adapter is None:
        model = load(model_path, param_dtype=dtype, compute_dtype=dtype)
        return {"model": model, "params": model.params, "lora": None, "model_path": model_path,
                "adapter_kind": None, "step": None}
    directory = pathlib.Path(adapter)
    kind = adapter_kind(directory)
    if kind == "workdir":
        model, params, lora_cfg, step_number = load_run(model_path, directory, dtype, step)
    else:
        (model, params, lora_cfg), step_number = load_peft(model_path, directory, dtype), None
    if model.tokenizer is None:
        raise InferenceError(f"{model.folder} has no tokenizer files")
    return {"model": model, "params": params, "lora": lora_cfg, "model_path": model_path, "adapter_kind": kind,
            "step": step_number}
