"""Export a training run's checkpoint as a PEFT adapter or a merged Hugging Face model: the command line.

It reads the run's config and checkpoint (jaxtune.workdir), so that rank, alpha and targets are
never typed twice, and writes with jaxtune.peft (adapters) or jaxtune.hf (merged models):

    python -m jaxtune.export --workdir=runs/lora_llama --format=peft
    python -m jaxtune.export --workdir=runs/lora_llama --format=merged --step=best --dtype=bfloat16
    python -m jaxtune.export --workdir=runs/full_llama --format=merged --out=/tmp/merged --overwrite
    python -m jaxtune.export --workdir=runs/lora_llama --format=peft --save_embedding_layers
    python -m jaxtune.export --workdir=runs/qlora --format=merged --merge_base=original

A QLoRA run (model.quantize=nf4) trained its adapters over the NF4-quantised base. Its PEFT adapter
is written as for any LoRA run (peft applies it to the float base it is given). A merged export
folds the adapters into `--merge_base`: `dequantized` (the default for such a run), the NF4 weights
the run trained over, de-quantised to float: the merged model computes what the trained model
computed; or `original`, the float weights of model.path, which is what peft's merge_and_unload over
the float base gives, and which differs from the trained model by the quantisation error of every
targeted kernel.

Full embedding matrices (peft's `save_embedding_layers`) are written into a PEFT export only when
the run extended the vocabulary (data.add_tokens) or when asked to (--save_embedding_layers). peft's
"auto" writes them whenever embed_tokens / lm_head is a target, although without new tokens they are
exactly the base model's rows (1 GB per matrix for Llama-3.2-1B in float32): our adapter stays lean,
and peft loads it over the base model as it is.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys

import ml_collections

import jaxtune
from jaxtune import config as config_lib
from jaxtune import hf, lora
from jaxtune import params as params_lib
from jaxtune import peft as peft_io
from jaxtune import workdir as workdir_lib
from jaxtune.errors import JaxtuneError
from jaxtune.hf import ExportError

log = logging.getLogger("jaxtune.export")  # not __name__: that is "__main__" under python -m


def embedding_layers_reason(run: ml_collections.ConfigDict, trained_other: dict, save_embedding_layers: bool) -> str | None:
    """Why a PEFT export of the run must carry the full embedding layers, or None for a lean adapter.

    Decided on data.add_tokens, not on table sizes: a table with spare rows (Qwen) can keep its size
    while gaining tokens. Without new tokens the rows are exactly the base model's, which peft reads
    from the base model itself.
    """
    added = workdir_lib.run_added_tokens(run)
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


MERGE_BASES = ("dequantized", "original")


def merge_base_of(run: ml_collections.ConfigDict, fmt: str, merge_base: str | None) -> str:
    """The base weights a merged export folds the adapters into: `merge_base` checked against the run,
    or by default the one the run trained over (dequantized for model.quantize=nf4, else original)."""
    quantized = bool(run.model.quantize)
    if merge_base is None:
        return "dequantized" if quantized else "original"
    if merge_base not in MERGE_BASES:
        raise ExportError(f"--merge_base={merge_base}: choose {' or '.join(MERGE_BASES)}")
    if fmt != "merged":
        raise ExportError("--merge_base applies to --format=merged (a PEFT adapter holds no base weights)")
    if merge_base == "dequantized" and not quantized:
        raise ExportError("--merge_base=dequantized: the run did not quantise its base (model.quantize is ''), so "
                          "its base weights are the original ones: leave --merge_base out")
    return merge_base


def export_run(workdir: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None, step: str | int = "last",
               dtype: str | None = None, overwrite: bool = False, save_embedding_layers: bool = False,
               merge_base: str | None = None) -> pathlib.Path:
    """Export checkpoint `step` ('last', 'best' or a number) of the run in `workdir` as a PEFT adapter
    (fmt='peft') or a merged HF model (fmt='merged'); returns the output folder.

    save_embedding_layers: (peft) also write the full embedding / head matrices, as peft's
      save_embedding_layers=True does; they are written anyway when the run added tokens.
    merge_base: (merged) 'dequantized' | 'original' (see the module docstring); None = the base the
      run trained over.
    """
    if fmt not in ("peft", "merged"):
        raise ExportError(f"--format={fmt}: choose peft or merged")
    if save_embedding_layers and fmt != "peft":
        raise ExportError("--save_embedding_layers applies to --format=peft (a merged model holds every weight)")
    workdir = pathlib.Path(workdir)
    run = workdir_lib.read_run_config(workdir)
    merge_base = merge_base_of(run, fmt, merge_base)
    lora_cfg = workdir_lib.run_lora_config(run)
    if fmt == "peft" and lora_cfg is None:
        raise ExportError(f"{workdir} is a full fine-tuning run (lora.enabled=false): it has no adapter to export "
                          f"as PEFT; use --format=merged to write the full model")
    step_number = workdir_lib.resolve_step(workdir, step)
    trained = workdir_lib.load_trained_params(workdir, step_number)
    model_path = run.model.path
    folder = hf.resolve_model_dir(model_path, run.model.revision or None)
    base_cfg = hf.model_config_from_hf(folder, param_dtype="float32")
    adapters, trained_other = lora.split_trainable(trained, full_finetune=False) if lora_cfg else ({}, trained)
    cfg = base_cfg.replace(lora=lora_cfg, vocab_size=workdir_lib.trained_vocab_size(trained_other, base_cfg.vocab_size))
    if cfg.vocab_size != base_cfg.vocab_size:
        log.info("the run extended the vocabulary: %d -> %d tokens", base_cfg.vocab_size, cfg.vocab_size)
    workdir_lib.check_fits(trained, cfg, f"checkpoint step {step_number} of {workdir}", complete=lora_cfg is None)
    tokenizer = workdir_lib.run_tokenizer(workdir, folder, run)
    out = pathlib.Path(out) if out else workdir / "exports" / f"{fmt}-step{step_number}"
    log.info("exporting step %d of %s (%s) as %s", step_number, workdir,
             "full fine-tuning" if lora_cfg is None else f"LoRA r={lora_cfg.rank}", fmt)

    if fmt == "peft":
        not_embeddings = [p for p in params_lib.flat(trained_other) if p not in lora.EMBEDDING_PATHS]
        if not_embeddings:
            raise ExportError(f"trained leaves {', '.join('/'.join(p) for p in not_embeddings)} have no place in a "
                              f"PEFT adapter; use --format=merged")
        embedding_layers = None
        reason = embedding_layers_reason(run, trained_other, save_embedding_layers)
        if reason is not None:  # the full (trained or base) matrices, as peft's save_embedding_layers writes them
            log.info("writing the full embedding layers into the adapter: %s", reason)
            embedding_layers = params_lib.overlay(hf.base_embedding_layers(folder, base_cfg), trained_other)
            workdir_lib.check_fits(embedding_layers, cfg.replace(lora=None), "the embedding layers")
        if dtype is not None:  # float32 (what training keeps and peft saves) unless asked otherwise
            adapters = params_lib.cast_tree(adapters, hf.EXPORT_DTYPES[dtype])
            embedding_layers = params_lib.cast_tree(embedding_layers, hf.EXPORT_DTYPES[dtype]) \
                if embedding_layers is not None else None
        return peft_io.save_peft_adapter(adapters, cfg, out, peft_base_name(model_path, folder), tokenizer,
                                         embedding_layers, overwrite)

    quantized = config_lib.quant_config(run.model) if merge_base == "dequantized" else None
    base = {} if lora_cfg is None else hf.load_params(folder, base_cfg.replace(quant=quantized),
                                                      allow_pickle=bool(run.model.allow_pickle))
    if quantized is not None:
        log.info("merging into the de-quantised NF4 base the run trained over (--merge_base=original: into the "
                 "float weights of %s)", model_path)
        base = hf.dequantized_params(base)
    params = params_lib.overlay(base, trained)
    workdir_lib.check_fits(params, cfg, "the base weights with the trained ones", complete=True)
    return hf.save_merged_model(params, cfg, out, tokenizer, folder, dtype, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxtune.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the training run's folder (holds config.json, checkpoints/)")
    parser.add_argument("--format", required=True, choices=("peft", "merged"), dest="fmt",
                        help="peft: adapter folder for peft.PeftModel; merged: full HF model folder")
    parser.add_argument("--out", default="", help="output folder (default WORKDIR/exports/FORMAT-stepN)")
    parser.add_argument("--step", default="last", help="last | best (lowest eval loss) | a step number")
    parser.add_argument("--dtype", default=None, choices=tuple(hf.EXPORT_DTYPES),
                        help="weights dtype: merged, default the base model's; peft, default float32 (the "
                             "adapters as trained)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--save_embedding_layers", action="store_true",
                        help="peft: also write the full embedding / lm_head matrices (as peft's save_embedding_layers"
                             "=True); written anyway when the run added tokens (data.add_tokens)")
    parser.add_argument("--merge_base", default=None, choices=MERGE_BASES,
                        help="merged export of a QLoRA run (model.quantize=nf4): fold the adapters into the "
                             "dequantized NF4 base the run trained over (default; matches the trained model) or "
                             "into the original float weights")
    args = parser.parse_args(argv)
    jaxtune.setup_logging()
    try:
        out = export_run(args.workdir, args.fmt, args.out or None, args.step, args.dtype, args.overwrite,
                         args.save_embedding_layers, args.merge_base)
    except JaxtuneError as e:  # the user can fix it: one message, no traceback
        log.error("%s", e)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
