"""`python -m jaxtune.train`: fine-tune with LoRA or all parameters, from one config.

    python -m jaxtune.train --config=configs/lora_llama.py
    python -m jaxtune.train --config=configs/full_llama.py --workdir=runs/full
    python -m jaxtune.train --config=configs/lora_llama.py --config.lora.rank=16 --config.data.train=my.jsonl

`run(config, workdir)` is the whole job and reads as its data flow: validate -> data -> model ->
state -> step -> loop -> artifacts; each section is one function below it (`train_loop` is the loop).
Rerunning the same command on the same workdir resumes from its latest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import pathlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import ml_collections

import jaxtune
import numpy as np

from jaxtune import checkpoint, distributed, evaluate, generate, hf, metrics, optim, plan, sharding, step, tasks, vocab
from jaxtune import config as config_lib
from jaxtune import data as data_lib
from jaxtune import params as params_lib
from jaxtune import peft as peft_io
from jaxtune import state as state_lib
from jaxtune.errors import JaxtuneError
from jaxtune.hf import load_tokenizer
from jaxtune.loading import LoadedModel
from jaxtune.models.llama import ModelConfig
from jaxtune.plan import measured as plan_measured

# Named, not __name__: run as `python -m jaxtune.train` this module is `__main__`, a logger outside
# "jaxtune" whose INFO records jaxtune.setup_logging does not show.
log = logging.getLogger("jaxtune.train")


class TrainingError(JaxtuneError, RuntimeError):
    """The run cannot go on (NaN loss, ...); what is saved stays saved."""


@dataclasses.dataclass
class RunResult:
    workdir: pathlib.Path
    final_step: int
    train_loss: float | None
    eval_before: dict | None
    eval_after: dict | None
    task_before: dict | None
    task_after: dict | None
    params: dict  # trainable subtree at the end
    frozen: dict
    cfg: ModelConfig


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> RunResult:
    # ---- Validate: the whole config, before any compute ---------------------------------------
    config_lib.validate(config, jax.device_count())
    config = config_lib.resolve_auto(config)  # data.eval / train.task `auto` -> data.train's task or none
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh, rules = sharding.make_mesh(config.mesh.shape), sharding.make_rules(config.mesh.rules)
    distributed.check_batch_layout(mesh, rules, config.train.batch_size)  # each process feeds its own rows
    log.info("mesh: %s", sharding.describe_mesh(mesh))

    # ---- Data: the model's tokenizer (+ data.add_tokens) -> datasets -> batches ---------------
    source = model_source(config)
    data = training_data(config, source.tokenizer, mesh, rules)

    # ---- Model: base weights + adapters, each leaf placed in its sharding ----------------------
    params, cfg = model_params(config, source, mesh, rules)

    # ---- State: built once, then replaced by the latest valid checkpoint if there is one -------
    train_state = state_lib.build(config, params, mesh, rules, data.num_steps, source.vocab_ext)
    del params
    checkpointer, fingerprint = resume(config, workdir, cfg, train_state, data)
    if is_main:
        (workdir / "config.json").write_text(config_lib.to_json(config))
        if source.vocab_ext.changed:  # the extended tokenizer, read back by jaxtune.export
            source.tokenizer.save_pretrained(str(workdir / "tokenizer"))

    # ---- Step: compiled for the state's shardings ----------------------------------------------
    train_fn, eval_fn = compiled_steps(config, cfg, train_state, mesh, rules)
    plan_measured.trim_after_compiles()  # the compiler's freed memory is not kept resident while the steps run
    if is_main:  # what the run expects each device to hold; `python -m jaxtune.plan` adds the compiler's figures
        log.info("%s", plan.startup_report(config, cfg, source.vocab_ext, mesh))

    # ---- Loop: the "before" figures, then the steps --------------------------------------------
    def held_out_loss(trainable) -> dict | None:
        if not data.datasets.eval:
            return None
        return evaluate_loss(eval_fn, trainable, train_state.frozen, data.eval_batches())

    def task_score(trainable) -> dict | None:
        return task_scores(config, cfg, source.tokenizer, source.folder, trainable, train_state.frozen,
                           data.task_examples)

    metrics_log = metrics.MetricsLog(workdir, is_main)
    start_step = int(train_state.state["step"])
    eval_before, task_before = before_training(config, workdir, start_step, train_state.state["params"],
                                               held_out_loss, task_score, metrics_log)
    end = train_loop(config, train_state, train_fn, data, mesh, rules, checkpointer, fingerprint,
                     held_out_loss if data.datasets.eval else None, metrics_log, start_step)

    # ---- Artifacts: the "after" figures, reports/summary.json ----------------------------------
    trained = end.state["params"]
    eval_after = end.eval_metrics or held_out_loss(trained)  # a resumed finished run ran no step: evaluate it
    if eval_after:
        log.info("eval after training: loss %.4f, perplexity %.2f", eval_after["loss"], eval_after["perplexity"])
    task_after = task_score(trained)
    if task_after:
        log.info("task %s after training: accuracy %.3f", config.train.task, task_after["accuracy"])
        metrics_log.write("task", data.num_steps, numbers(task_after))
    metrics_log.close()
    result = RunResult(workdir, data.num_steps, end.last_loss, eval_before, eval_after, task_before, task_after,
                       trained, train_state.frozen, cfg)
    if is_main:
        write_summary(result, config)
    return result


# ============================================================================================
# Data and model


@dataclasses.dataclass
class ModelSource:
    """The model folder, its ModelConfig (vocabulary before data.add_tokens), tokenizer and vocab extension."""

    folder: pathlib.Path
    cfg: ModelConfig
    tokenizer: Any
    vocab_ext: vocab.VocabExtension


def model_source(config: ml_collections.ConfigDict) -> ModelSource:
    folder = hf.resolve_model_dir(config.model.path, config.model.revision or None)
    cfg = plan.model_config(config, folder)  # the one config -> ModelConfig mapping, shared with the planner
    tokenizer = load_tokenizer(folder)
    if config.train.task:  # the task's prompts are rendered as training renders conversations
        generate.prompt_template(tokenizer, config.data.template, f"train.task={config.train.task}",
                                 "set data.template=none (raw text) or a Jinja chat template, or train.task='' "
                                 "to score no task")
    vocab_ext = vocab.extend_tokenizer(tokenizer, config.data.add_tokens, cfg.vocab_size)  # data.add_tokens
    return ModelSource(folder, cfg, tokenizer, vocab_ext)


@dataclasses.dataclass
class TrainingData:
    """The tokenized datasets, the training batches and their step count, the task's scoring examples."""

    datasets: data_lib.Datasets
    batcher: data_lib.Batcher  # this process's rows of each global training batch, resumable
    num_steps: int
    task_examples: list  # train.task's test examples to score before and after training
    eval_batches: Callable[[], Iterator[dict]]  # the eval set as device batches, afresh at each call


def training_data(config: ml_collections.ConfigDict, tokenizer, mesh, rules) -> TrainingData:
    data_cfg = config.data.to_dict()
    data_cfg["train"] = resolve_data_spec(config.data.train, "train")
    data_cfg["eval"] = resolve_data_spec(config.data.eval, "validation") if config.data.eval else ""
    datasets = data_lib.build_datasets(data_cfg, tokenizer)
    log.info("train data: %s", datasets.train_stats)
    if datasets.eval_stats:
        log.info("eval data: %s", datasets.eval_stats)
    batcher = data_lib.Batcher(datasets.train, config.train.batch_size, config.data.max_len, datasets.pad_id,
                               seed=config.train.seed, packing=config.data.packing,
                               process_index=jax.process_index(), process_count=jax.process_count())
    num_steps = total_steps(config, batcher.steps_per_epoch)
    task_examples = tasks.load_examples(config.train.task, "test")[:config.train.task_examples] if config.train.task else []

    def eval_batches():
        batches = data_lib.eval_batches(datasets.eval, config.train.batch_size, config.data.max_len, datasets.pad_id,
                                        packing=config.data.packing, process_index=jax.process_index(),
                                        process_count=jax.process_count())
        limit = config.train.eval_batches or None
        for i, batch in enumerate(batches):
            if limit is not None and i >= limit:
                return
            yield sharding.device_batch(batch, mesh, rules)

    return TrainingData(datasets, batcher, num_steps, task_examples, eval_batches)


def model_params(config: ml_collections.ConfigDict, source: ModelSource, mesh, rules) -> tuple[dict, ModelConfig]:
    """(the whole param tree, its ModelConfig): base weights, resized for data.add_tokens, + adapters."""
    cfg = source.cfg
    base = hf.load_params(source.folder, storage_config(cfg, not config.lora.enabled),
                          allow_pickle=config.model.allow_pickle, place=sharding.place_fn(mesh, rules))
    if source.vocab_ext.changed:  # embedding (and untied head) resized for the added tokens, new rows = mean row
        base = vocab.resize_params(base, source.vocab_ext, sharding_for=lambda path, shape: jax.sharding.NamedSharding(
            mesh, sharding.spec_for(path, shape, mesh, rules)[0]))
        cfg = cfg.replace(vocab_size=source.vocab_ext.new_size)
    params = base if cfg.lora is None else params_lib.merge_trees(base, initial_adapters(config, cfg, mesh, rules, base))
    return params, cfg


# ============================================================================================
# State and step


def resume(config: ml_collections.ConfigDict, workdir: pathlib.Path, cfg: ModelConfig,
           train_state: state_lib.TrainState, data: TrainingData) -> tuple[checkpoint.Checkpointer, dict]:
    """The run's Checkpointer and fingerprint; the latest valid checkpoint, if any, replaces
    `train_state.state` and the data position. A workdir of another run config is refused."""
    keep_best = config.checkpoint.keep_best and bool(data.datasets.eval)  # no eval set: the last K only
    checkpointer = checkpoint.Checkpointer(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
                                           keep_best=keep_best, async_save=config.checkpoint.async_save)
    fingerprint = checkpoint.config_fingerprint(config.model.path, cfg, not config.lora.enabled,
                                                train_state.state["params"])
    restored = checkpointer.restore_latest_valid(checkpoint.abstract_like(train_state.state), fingerprint)
    if restored is not None:
        train_state.state = restored.state
        try:
            data.batcher.restore(restored.meta["data"])
        except data_lib.DataError as e:
            raise data_lib.DataError(f"{checkpointer.directory} step {restored.step}: {e}") from None
        log.info("resumed from checkpoint step %d in %s", restored.step, checkpointer.directory)
    return checkpointer, fingerprint


def compiled_steps(config: ml_collections.ConfigDict, cfg: ModelConfig, train_state: state_lib.TrainState,
                   mesh, rules) -> tuple[Callable, Callable]:
    """(train_fn, eval_fn), jitted with the state's and the batch's shardings; train_fn donates the state."""
    replicated = sharding.replicated(mesh)
    batch_sh = sharding.batch_sharding(mesh, rules)
    batch_shardings = {key: batch_sh for key in step.BATCH_KEYS}
    state_sh, frozen_sh = train_state.shardings, train_state.frozen_shardings
    # the program jaxtune.plan compiles for its plans
    train_fn = plan.jit_train_step(cfg, train_state, mesh, rules, config.optim.grad_accum)
    eval_fn = jax.jit(functools.partial(step.eval_step, cfg=cfg),
                      in_shardings=(state_sh["params"], frozen_sh, batch_shardings), out_shardings=replicated)
    return train_fn, eval_fn


# ============================================================================================
# Loop


def numbers(record: dict) -> dict:
    """The numeric entries of a task score (what metrics.jsonl records)."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float))}


def before_training(config, workdir: pathlib.Path, start_step: int, trainable, held_out_loss, task_score,
                    metrics_log: metrics.MetricsLog) -> tuple[dict | None, dict | None]:
    """(held-out loss, task score) of the untrained model, recorded at step 0; a resumed run reads
    back what its first attempt measured."""
    if start_step:
        return metrics.metrics_at(workdir, "eval", 0), metrics.metrics_at(workdir, "task", 0)
    eval_before, task_before = held_out_loss(trainable), task_score(trainable)
    if eval_before:
        log.info("eval before training: loss %.4f, perplexity %.2f", eval_before["loss"], eval_before["perplexity"])
        metrics_log.write("eval", 0, eval_before)
    if task_before:
        log.info("task %s before training: accuracy %.3f", config.train.task, task_before["accuracy"])
        metrics_log.write("task", 0, numbers(task_before))
    return eval_before, task_before


class LoopEnd(NamedTuple):
    state: dict
    last_loss: float | None  # the last logged train loss (None: no step ran)
    eval_metrics: dict | None  # the held-out loss at the final step (None: no eval set, or no step ran)


def train_loop(config, train_state: state_lib.TrainState, train_fn, data: TrainingData, mesh, rules,
               checkpointer: checkpoint.Checkpointer, fingerprint: dict, held_out_loss: Callable | None,
               metrics_log: metrics.MetricsLog, start_step: int) -> LoopEnd:
    """Steps start_step + 1 .. num_steps: train; when a log or a save is due, read the loss once, stop
    on divergence (so a diverged state is never saved), log; evaluate every train.eval_every steps and
    at the end; save when due (the eval loss ranks the checkpoint)."""
    num_steps, frozen = data.num_steps, train_state.frozen
    lr_at = optim.schedule(config.optim, num_steps)
    progress = metrics.ProgressBar(num_steps, start_step, enabled=jax.process_index() == 0 and config.train.progress)
    rate = metrics.TokenRate()
    state, last_loss, eval_metrics = train_state.state, None, None
    with checkpointer:  # closing waits for the last background write
        for step_num in range(start_step + 1, num_steps + 1):
            host_batch = next(data.batcher)
            state, step_metrics = train_fn(state, frozen, sharding.device_batch(host_batch, mesh, rules))
            rate.add(float(np.sum(host_batch["segment_ids"] > 0)) * jax.process_count())
            final = step_num == num_steps
            log_due = step_num % config.train.log_every == 0 or final
            save_due = checkpointer.due(step_num, final=final)
            eval_due = held_out_loss is not None and (
                final or bool(config.train.eval_every and step_num % config.train.eval_every == 0))
            if log_due or save_due:
                loss = float(step_metrics["loss"])
                if not (math.isfinite(loss) and bool(step_metrics["params_finite"])):
                    raise diverged(loss, step_num, config, checkpointer)
                if log_due:
                    values = {"loss": loss, "lr": float(lr_at(step_num - 1)),
                              "grad_norm": float(step_metrics["grad_norm"]), "tokens_per_s": rate.per_second()}
                    metrics_log.write("train", step_num, values)
                    progress.update(step_num, values)
                    rate.reset()
                    last_loss = loss
            eval_metrics = held_out_loss(state["params"]) if eval_due else None
            if eval_metrics:
                metrics_log.write("eval", step_num, eval_metrics)
            if save_due:
                meta = {"data": data.batcher.state(), "config_fingerprint": fingerprint, "model": config.model.path}
                checkpointer.save(step_num, state, meta, {"eval_loss": eval_metrics["loss"]} if eval_metrics else None,
                                  final=final)
    progress.close()
    return LoopEnd(state, last_loss, eval_metrics)


def diverged(loss: float, step_num: int, config, checkpointer: checkpoint.Checkpointer) -> TrainingError:
    what = f"loss is {loss}" if not math.isfinite(loss) else "the updated weights are not finite"
    return TrainingError(
        f"{what} at step {step_num}: training diverged. Lower optim.lr "
        f"(now {config.optim.lr}), keep optim.clip_norm > 0, or use model.compute_dtype=float32. "
        f"Checkpoints saved before this step are intact in {checkpointer.directory}.")


# ============================================================================================
# Config, evaluation, adapters: the pieces the sections use


def resolve_data_spec(spec: str, split: str) -> str:
    """Comma-separated specs; each `task:NAME[+NAME]` -> the bundled JSONL of those tasks' split."""
    return ",".join(evaluate.data_specs(spec, split))


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    if config.train.epochs > 0:
        return max(1, math.ceil(config.train.epochs * steps_per_epoch))
    return int(config.train.steps)


def evaluate_loss(eval_fn, trainable, frozen, batches) -> dict[str, float]:
    loss_sum, tokens = 0.0, 0.0
    for batch in batches:
        s, n = eval_fn(trainable, frozen, batch)
        loss_sum, tokens = loss_sum + float(s), tokens + float(n)
    return evaluate.loss_report(loss_sum, tokens)


def initial_adapters(config, cfg: ModelConfig, mesh, rules, base: dict | None = None) -> dict:
    """Fresh adapters (DoRA magnitudes from `base`), or those of an existing PEFT adapter folder
    (lora.init_from), sharded."""
    if not config.lora.init_from:
        return sharding.init_adapters_sharded(cfg, jax.random.key(config.train.seed + 1), mesh, rules, base=base)
    adapters, saved = peft_io.load_peft_adapter(config.lora.init_from, cfg.replace(lora=None))
    fields = ("rank", "alpha", "targets", "rslora", "dora")
    if [getattr(saved, f) for f in fields] != [getattr(cfg.lora, f) for f in fields]:
        raise config_lib.ConfigError(
            f"lora.init_from={config.lora.init_from}: the adapter has rank {saved.rank}, alpha {saved.alpha}, targets "
            f"{','.join(saved.targets)}, rslora {saved.rslora}, dora {saved.dora}; set the same --config.lora.* "
            f"values to continue it")
    shardings = sharding.param_shardings(adapters, mesh, rules)
    # each process copies only the shards its own devices hold (device_put cannot reach other hosts)
    return jax.tree_util.tree_map(lambda x, sh: jax.make_array_from_callback(
        x.shape, sh, lambda index: np.asarray(x)[index]), adapters, shardings)


def storage_config(cfg: ModelConfig, full_finetune: bool) -> ModelConfig:
    """The config the base weights load with. Full fine-tuning trains every weight, and trained weights
    are float32 master weights whatever model.dtype: they load straight in float32 (never rounded to
    model.dtype first). A LoRA run's frozen base keeps model.dtype."""
    return cfg.replace(param_dtype="float32") if full_finetune else cfg


def task_scores(config, cfg: ModelConfig, tokenizer, folder, trainable, frozen, task_examples) -> dict | None:
    if not task_examples:
        return None
    base_cfg = cfg.replace(lora=None)
    model = LoadedModel(base_cfg, params_lib.merge_trees(frozen, trainable), tokenizer, folder)
    return evaluate.task_accuracy(model, config.train.task, task_examples, params=model.params, lora=cfg.lora,
                                  max_new_tokens=config.train.task_max_new_tokens, template=config.data.template)


def write_summary(result: RunResult, config) -> None:
    """reports/summary.json + a before/after table on stdout."""
    summary = {"final_step": result.final_step, "train_loss": result.train_loss,
               "eval_before": result.eval_before, "eval_after": result.eval_after,
               "task": config.train.task or None,
               "task_before": {k: v for k, v in (result.task_before or {}).items() if k != "predictions"} or None,
               "task_after": {k: v for k, v in (result.task_after or {}).items() if k != "predictions"} or None,
               "memory": plan.measured_peak_memory()}
    evaluate.write_report(result.workdir / "reports" / "summary.json", summary)
    if result.task_after:
        evaluate.write_report(result.workdir / "reports" / "task_predictions.json", result.task_after["predictions"])
    rows = []
    if result.eval_after:
        before = result.eval_before["loss"] if result.eval_before else float("nan")
        rows.append(("held-out loss", f"{before:.4f}", f"{result.eval_after['loss']:.4f}"))
    if result.task_after:
        before = result.task_before["accuracy"] if result.task_before else float("nan")
        rows.append((f"{config.train.task} accuracy", f"{before:.3f}", f"{result.task_after['accuracy']:.3f}"))
    if rows:
        print(f"\n{'':24s} {'before':>10s} {'after':>10s}")
        for name, before, after in rows:
            print(f"{name:24s} {before:>10s} {after:>10s}")
    memory = summary["memory"]
    print(f"\npeak memory: {plan.gib(memory['peak_rss_bytes'])} resident (process)"
          + (f", {plan.gib(memory['device_peak_bytes'])} on the busiest device" if "device_peak_bytes" in memory else "")
          + " (the start-up plan is per device)")
    if rows:
        print(f"\nrun directory: {result.workdir}  (metrics.jsonl, tb/, checkpoints/, reports/)")


# ============================================================================================
# Command line


def default_workdir(config_path: str) -> str:
    return str(pathlib.Path("runs") / pathlib.Path(config_path.split(":")[0]).stem)


parse_flags = config_lib.parse_flags  # absl flag parsing with one clear error for a bad --config.KEY


def main(argv):
    from absl import flags

    del argv
    FLAGS = flags.FLAGS
    jaxtune.setup_logging()
    workdir = FLAGS.workdir or default_workdir(FLAGS["config"].config_filename)
    try:
        distributed.maybe_initialize()  # multi-host launches: before anything touches a JAX device
        run(FLAGS.config, workdir)
    except JaxtuneError as e:  # the user can fix it: one message, no traceback
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)", lock_config=True)
    flags.DEFINE_string("workdir", "", "run directory (default runs/<config name>); rerun to resume")
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
