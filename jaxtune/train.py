"""`python -m jaxtune.train`: fine-tune with LoRA or all parameters, from one config.

    python -m jaxtune.train --config=configs/lora_llama.py
    python -m jaxtune.train --config=configs/full_llama.py --workdir=runs/full
    python -m jaxtune.train --config=configs/lora_llama.py --config.lora.rank=16 --config.data.train=my.jsonl

`run(config, workdir)` is the whole job, in sections that follow the data flow:
config -> data -> model -> state -> step -> loop -> artifacts. Rerunning the same command on the
same workdir resumes from its latest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections

import jaxtune
import numpy as np

from jaxtune import checkpoint, distributed, evaluate, hf, lora, optim, sharding, step, tasks, vocab
from jaxtune import config as config_lib
from jaxtune import data as data_lib
from jaxtune import params as params_lib
from jaxtune import peft as peft_io
from jaxtune.hf import load_tokenizer
from jaxtune.loading import LoadedModel
from jaxtune.errors import JaxtuneError
from jaxtune.models.llama import ModelConfig

log = logging.getLogger(__name__)


class TrainingError(JaxtuneError, RuntimeError):
    """The run cannot go on (NaN loss, ...); what is saved stays saved."""


# ============================================================================================
# Config


def resolve_data_spec(spec: str, split: str) -> str:
    """Comma-separated specs; each `task:NAME[+NAME]` -> the bundled JSONL of those tasks' split."""
    return ",".join(evaluate.data_specs(spec, split))


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    if config.train.epochs > 0:
        return max(1, math.ceil(config.train.epochs * steps_per_epoch))
    return int(config.train.steps)


def model_config(config: ml_collections.ConfigDict, folder: pathlib.Path) -> ModelConfig:
    adapter = None
    if config.lora.enabled:
        lo = config.lora
        adapter = lora.lora_config(lo.rank, lo.alpha, lo.dropout, lo.targets, lo.rslora)
    return hf.model_config_from_hf(folder, param_dtype=config.model.dtype, compute_dtype=config.model.compute_dtype,
                                   remat=config.model.remat, lora=adapter)


# ============================================================================================
# Metrics


class MetricsLog:
    """metrics.jsonl + TensorBoard events in the workdir (process 0 only)."""

    def __init__(self, workdir: pathlib.Path, enabled: bool):
        self.enabled = enabled
        self.file = open(workdir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tb"))

    def write(self, kind: str, step_num: int, values: dict):
        if not self.enabled:
            return
        record = {"kind": kind, "step": step_num, "time": round(time.time(), 3),
                  **{k: float(v) for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in values.items():
            self.tb.add_scalar(f"{kind}/{key}", float(value), step_num)
        self.tb.flush()

    def close(self):
        if self.enabled:
            self.file.close()
            self.tb.close()


def metrics_at(workdir: pathlib.Path, kind: str, step_num: int) -> dict | None:
    """The last `kind` record of `step_num` in WORKDIR/metrics.jsonl (None if absent)."""
    path = workdir / "metrics.jsonl"
    found = None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if record.get("kind") == kind and record.get("step") == step_num:
                found = record
    return found


# ============================================================================================
# Evaluation


def evaluate_loss(eval_fn, trainable, frozen, batches) -> dict[str, float]:
    loss_sum, tokens = 0.0, 0.0
    for batch in batches:
        s, n = eval_fn(trainable, frozen, batch)
        loss_sum, tokens = loss_sum + float(s), tokens + float(n)
    return evaluate.loss_report(loss_sum, tokens)


# ============================================================================================
# The job


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


def initial_adapters(config, cfg: ModelConfig, mesh, rules) -> dict:
    """Fresh adapters, or those of an existing PEFT adapter folder (lora.init_from), sharded."""
    if not config.lora.init_from:
        return sharding.init_adapters_sharded(cfg, jax.random.key(config.train.seed + 1), mesh, rules)
    adapters, saved = peft_io.load_peft_adapter(config.lora.init_from, cfg.replace(lora=None))
    if (saved.rank, saved.alpha, saved.targets, saved.rslora) != (cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.rslora):
        raise config_lib.ConfigError(
            f"lora.init_from={config.lora.init_from}: the adapter has rank {saved.rank}, alpha {saved.alpha}, targets "
            f"{','.join(saved.targets)}, rslora {saved.rslora}; set the same --config.lora.* values to continue it")
    shardings = sharding.param_shardings(adapters, mesh, rules)
    # each process copies only the shards its own devices hold (device_put cannot reach other hosts)
    return jax.tree_util.tree_map(lambda x, sh: jax.make_array_from_callback(
        x.shape, sh, lambda index: np.asarray(x)[index]), adapters, shardings)


def storage_config(cfg: ModelConfig, full_finetune: bool) -> ModelConfig:
    """The config the base weights load with. Full fine-tuning trains every weight, and trained weights
    are float32 master weights whatever model.dtype: they load straight in float32 (never rounded to
    model.dtype first). A LoRA run's frozen base keeps model.dtype."""
    return cfg.replace(param_dtype="float32") if full_finetune else cfg


def as_master_weights(trainable: dict) -> dict:
    """The trainable subtree as float32 master weights, each leaf kept in its sharding.

    Adam's update of a weight is about lr (1e-5 .. 1e-4): below bfloat16's resolution for most
    weights, so a bfloat16 trained leaf (or its moments, which optax keeps in the param dtype) would
    quietly stop moving. The forward casts every param to model.compute_dtype where it is used."""
    if all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(trainable)):
        return trainable
    to_float32 = functools.partial(jax.tree_util.tree_map, lambda leaf: leaf.astype(jnp.float32))
    return sharding.create_sharded(to_float32, jax.tree_util.tree_map(lambda leaf: leaf.sharding, trainable),
                                   trainable)


def task_scores(config, cfg: ModelConfig, tokenizer, folder, trainable, frozen, task_examples) -> dict | None:
    if not task_examples:
        return None
    base_cfg = cfg.replace(lora=None)
    model = LoadedModel(base_cfg, params_lib.merge_trees(frozen, trainable), tokenizer, folder)
    return evaluate.task_accuracy(model, config.train.task, task_examples, params=model.params, lora=cfg.lora,
                                  max_new_tokens=config.train.task_max_new_tokens, template=config.data.template)


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> RunResult:
    # ---- Config: validate everything before any compute -------------------------------------
    config_lib.validate(config, jax.device_count())
    config = config_lib.resolve_auto(config)  # data.eval / train.task `auto` -> data.train's task or none
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    full_finetune = not config.lora.enabled
    mesh = sharding.make_mesh(config.mesh.shape)
    rules = sharding.make_rules(config.mesh.rules)
    distributed.check_batch_layout(mesh, rules, config.train.batch_size)  # each process feeds its own rows
    log.info("mesh: %s", sharding.describe_mesh(mesh))

    # ---- Model folder and tokenizer ---------------------------------------------------------
    folder = hf.resolve_model_dir(config.model.path, config.model.revision or None)
    cfg = model_config(config, folder)
    tokenizer = load_tokenizer(folder)
    if config.train.task:  # the task's prompts are rendered as training renders conversations
        evaluate.prompt_template(tokenizer, config.data.template, f"train.task={config.train.task}",
                                 "set data.template=none (raw text) or a Jinja chat template, or train.task='' "
                                 "to score no task")
    vocab_ext = vocab.extend_tokenizer(tokenizer, config.data.add_tokens, cfg.vocab_size)  # data.add_tokens
    train_embeddings = vocab_ext.changed and not full_finetune  # LoRA: the new token rows train too

    # ---- Data ------------------------------------------------------------------------------
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

    def eval_set():
        batches = data_lib.eval_batches(datasets.eval, config.train.batch_size, config.data.max_len, datasets.pad_id,
                                        packing=config.data.packing, process_index=jax.process_index(),
                                        process_count=jax.process_count())
        limit = config.train.eval_batches or None
        for i, batch in enumerate(batches):
            if limit is not None and i >= limit:
                return
            yield sharding.device_batch(batch, mesh, rules)

    # ---- Model params: base weights + adapters, each leaf placed in its sharding -------------
    base = hf.load_params(folder, storage_config(cfg, full_finetune), allow_pickle=config.model.allow_pickle,
                          place=sharding.place_fn(mesh, rules))
    if vocab_ext.changed:  # embedding (and untied head) resized for the added tokens, new rows = mean row
        base = vocab.resize_params(base, vocab_ext, sharding_for=lambda path, shape: jax.sharding.NamedSharding(
            mesh, sharding.spec_for(path, shape, mesh, rules)[0]))
        cfg = cfg.replace(vocab_size=vocab_ext.new_size)
    params = base if cfg.lora is None else params_lib.merge_trees(base, initial_adapters(config, cfg, mesh, rules))
    trainable, frozen = lora.split_trainable(params, full_finetune, train_embeddings)
    trainable = as_master_weights(trainable)
    log.info("params: %s trainable of %s (%s)", f"{params_lib.count_params(trainable):,}",
             f"{params_lib.count_params(params):,}", "full fine-tuning" if full_finetune else f"LoRA r={cfg.lora.rank}")

    # ---- State: optimizer, shardings, resume -------------------------------------------------
    tx = optim.optimizer(config.optim, num_steps, full_finetune, train_embeddings)
    if train_embeddings:  # only the new tokens' rows move; the old ones stay bit-identical
        tx = vocab.train_new_rows(tx, vocab_ext)
    trainable_sh = sharding.param_shardings(trainable, mesh, rules)
    frozen_sh = sharding.param_shardings(frozen, mesh, rules)
    opt_state = sharding.init_opt_state_sharded(tx, trainable, trainable_sh, mesh)
    replicated = sharding.replicated(mesh)
    seed = config.train.seed  # created under jit: a host value cannot be device_put onto other hosts' devices
    state = {"step": sharding.create_sharded(lambda: jnp.zeros((), jnp.int32), replicated), "params": trainable,
             "opt_state": opt_state, "rng": sharding.create_sharded(lambda: jax.random.key(seed), replicated)}
    state_sh = {"step": replicated, "params": trainable_sh, "rng": replicated,
                "opt_state": sharding.state_shardings(opt_state, trainable_sh, mesh)}
    keep_best = config.checkpoint.keep_best and bool(datasets.eval)  # no eval set: the last K only
    checkpointer = checkpoint.Checkpointer(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
                                           keep_best=keep_best, async_save=config.checkpoint.async_save)
    fingerprint = checkpoint.config_fingerprint(config.model.path, cfg, full_finetune, trainable)
    restored = checkpointer.restore_latest_valid(checkpoint.abstract_like(state), fingerprint)
    if restored is not None:
        state = restored.state
        batcher.restore(restored.meta["data"])
        log.info("resumed from checkpoint step %d in %s", restored.step, checkpointer.directory)
    if is_main:
        (workdir / "config.json").write_text(config_lib.to_json(config))
        if vocab_ext.changed:  # the extended tokenizer, read back by jaxtune.export
            tokenizer.save_pretrained(str(workdir / "tokenizer"))
    start_step = int(state["step"])

    # ---- Step ------------------------------------------------------------------------------
    lr_at = optim.schedule(config.optim, num_steps)
    batch_sh = sharding.batch_sharding(mesh, rules)
    batch_shardings = {key: batch_sh for key in step.BATCH_KEYS}
    train_fn = jax.jit(functools.partial(step.train_step, cfg=cfg, tx=tx, grad_accum=config.optim.grad_accum),
                       in_shardings=(state_sh, frozen_sh, batch_shardings), out_shardings=(state_sh, replicated),
                       donate_argnums=0)
    eval_fn = jax.jit(functools.partial(step.eval_step, cfg=cfg), in_shardings=(trainable_sh, frozen_sh, batch_shardings),
                      out_shardings=replicated)
    if is_main:
        report = sharding.memory_report(params_lib.merge_trees(frozen, state["params"]), state["opt_state"], mesh, cfg=cfg,
                                        trainable=state["params"],
                                        batch_size=config.train.batch_size // config.optim.grad_accum,
                                        seq_len=config.data.max_len)
        log.info("%s", report["text"])

    # ---- Loop ------------------------------------------------------------------------------
    metrics_log = MetricsLog(workdir, is_main)
    fresh = start_step == 0
    if fresh:
        eval_before = evaluate_loss(eval_fn, state["params"], frozen, eval_set()) if datasets.eval else None
        task_before = task_scores(config, cfg, tokenizer, folder, state["params"], frozen, task_examples)
    else:  # resumed: the "before" figures were measured by the first attempt
        eval_before, task_before = metrics_at(workdir, "eval", 0), metrics_at(workdir, "task", 0)
    if eval_before and fresh:
        log.info("eval before training: loss %.4f, perplexity %.2f", eval_before["loss"], eval_before["perplexity"])
        metrics_log.write("eval", 0, eval_before)
    if task_before and fresh:
        log.info("task %s before training: accuracy %.3f", config.train.task, task_before["accuracy"])
        metrics_log.write("task", 0, {k: v for k, v in task_before.items() if isinstance(v, (int, float))})

    progress = _progress_bar(num_steps, start_step, enabled=is_main and config.train.progress)
    window_tokens, window_start, last_loss = 0.0, time.perf_counter(), None
    eval_metrics = None
    for step_num in range(start_step + 1, num_steps + 1):
        host_batch = next(batcher)
        state, metrics = train_fn(state, frozen, sharding.device_batch(host_batch, mesh, rules))
        window_tokens += float(np.sum(host_batch["segment_ids"] > 0)) * jax.process_count()
        due_for_save = checkpointer.due(step_num, final=step_num == num_steps)
        if step_num % config.train.log_every == 0 or step_num == num_steps or due_for_save:
            loss = float(metrics["loss"])  # checked before every save too: a diverged state is never saved
            if not (math.isfinite(loss) and bool(metrics["params_finite"])):
                checkpointer.close()
                what = f"loss is {loss}" if not math.isfinite(loss) else "the updated weights are not finite"
                raise TrainingError(
                    f"{what} at step {step_num}: training diverged. Lower optim.lr "
                    f"(now {config.optim.lr}), keep optim.clip_norm > 0, or use model.compute_dtype=float32. "
                    f"Checkpoints saved before this step are intact in {checkpointer.directory}.")
        if step_num % config.train.log_every == 0 or step_num == num_steps:
            elapsed = time.perf_counter() - window_start
            values = {"loss": loss, "lr": float(lr_at(step_num - 1)), "grad_norm": float(metrics["grad_norm"]),
                      "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
            metrics_log.write("train", step_num, values)
            progress.update(step_num, values)
            window_tokens, window_start, last_loss = 0.0, time.perf_counter(), loss
        final = step_num == num_steps
        eval_metrics = None
        if datasets.eval and (final or (config.train.eval_every and step_num % config.train.eval_every == 0)):
            eval_metrics = evaluate_loss(eval_fn, state["params"], frozen, eval_set())
            metrics_log.write("eval", step_num, eval_metrics)
        meta = {"data": batcher.state(), "config_fingerprint": fingerprint, "model": config.model.path}
        checkpointer.save(step_num, state, meta, {"eval_loss": eval_metrics["loss"]} if eval_metrics else None,
                          final=final)
    progress.close()
    checkpointer.close()

    # ---- Artifacts -------------------------------------------------------------------------
    eval_after = eval_metrics
    if datasets.eval and eval_after is None:  # resumed a finished run: evaluate what is there
        eval_after = evaluate_loss(eval_fn, state["params"], frozen, eval_set())
    if eval_after:
        log.info("eval after training: loss %.4f, perplexity %.2f", eval_after["loss"], eval_after["perplexity"])
    task_after = task_scores(config, cfg, tokenizer, folder, state["params"], frozen, task_examples)
    if task_after:
        log.info("task %s after training: accuracy %.3f", config.train.task, task_after["accuracy"])
        metrics_log.write("task", num_steps, {k: v for k, v in task_after.items() if isinstance(v, (int, float))})
    metrics_log.close()
    result = RunResult(workdir, num_steps, last_loss, eval_before, eval_after, task_before, task_after,
                       state["params"], frozen, cfg)
    if is_main:
        write_summary(result, config)
    return result


def write_summary(result: RunResult, config) -> None:
    """reports/summary.json + a before/after table on stdout."""
    summary = {"final_step": result.final_step, "train_loss": result.train_loss,
               "eval_before": result.eval_before, "eval_after": result.eval_after,
               "task": config.train.task or None,
               "task_before": {k: v for k, v in (result.task_before or {}).items() if k != "predictions"} or None,
               "task_after": {k: v for k, v in (result.task_after or {}).items() if k != "predictions"} or None}
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
        print(f"\nrun directory: {result.workdir}  (metrics.jsonl, tb/, checkpoints/, reports/)")


class _progress_bar:
    """tqdm bar with loss, lr, tokens/s and ETA (a no-op when disabled)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
        self.position = start

    def update(self, step_num: int, values: dict):
        if self.bar is not None:
            self.bar.update(step_num - self.position)
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                                 tok_s=f"{values['tokens_per_s']:.0f}", refresh=False)
        self.position = step_num

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ============================================================================================
# Command line


def default_workdir(config_path: str) -> str:
    return str(pathlib.Path("runs") / pathlib.Path(config_path.split(":")[0]).stem)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with one clear error (exit 2) for an unknown or ill-typed --config.KEY override."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        problems = [config_lib.unknown_key_problem(arg[len("--config."):].split("=", 1)[0], arg)
                    for arg in argv[1:] if arg.startswith("--config.")]
        problems = [p for p in problems if p]
        message = "\n".join(problems) or f"bad command line: {str(e).strip(chr(39))}"
        print(f"error: {message}\nSee configs/*.py and jaxtune/config.py for every key.", file=sys.stderr)
        sys.exit(2)


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
