"""The run being planned: what a run config trains, and its train state as shapes (nothing allocated).

`model_config(config, folder)` is the one mapping from a run config to the `ModelConfig` it trains
(jaxtune.train builds its model with it too). `abstract_train_state(run, mesh)` is `jaxtune.state.build`
itself, run under `jax.eval_shape` over the parameter shapes placed as training places them: the
trainable / frozen split, the float32 master weights, the optimizer of the run's config and every
sharding are the training code's, so the planner can neither drift from it nor re-implement it.
`mesh` may be a real mesh (to compile) or a `jax.sharding.AbstractMesh` (analytic targets, no devices).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib

import jax
import ml_collections

from jaxtune import config as config_lib
from jaxtune import hf, lora, sharding, state, vocab
from jaxtune.data import make_batch
from jaxtune.models.llama import ModelConfig, abstract_params

MESH_AXES = sharding.MESH_AXES


def model_config(config: ml_collections.ConfigDict, folder: str | pathlib.Path) -> ModelConfig:
    """The ModelConfig a run of `config` trains from the model folder (its vocabulary before data.add_tokens)."""
    adapter = None
    if config.lora.enabled:
        lo = config.lora
        adapter = lora.lora_config(lo.rank, lo.alpha, lo.dropout, lo.targets, lo.rslora, lo.dora)
    return hf.model_config_from_hf(folder, param_dtype=config.model.dtype, compute_dtype=config.model.compute_dtype,
                                   remat=config.model.remat, lora=adapter, quant=config_lib.quant_config(config.model))


def planned_vocab_extension(config: ml_collections.ConfigDict, vocab_size: int) -> vocab.VocabExtension:
    """data.add_tokens as the planner sees it: every listed token new (a tokenizer that already has some
    of them adds fewer, so the plan is an upper bound), rows appended after `vocab_size`."""
    added = vocab.parse_tokens(config.data.add_tokens)
    return vocab.VocabExtension(added=added, new_ids=tuple(range(vocab_size, vocab_size + len(added))),
                                old_size=vocab_size, new_size=vocab_size + len(added), base_rows=vocab_size)


@dataclasses.dataclass(frozen=True)
class Run:
    """A run config and the ModelConfig it trains (vocabulary after data.add_tokens)."""

    config: ml_collections.ConfigDict
    cfg: ModelConfig
    vocab_ext: vocab.VocabExtension

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, cfg: ModelConfig | None = None,
                    vocab_ext: vocab.VocabExtension | None = None) -> "Run":
        """The run of `config`; `cfg` / `vocab_ext` when the caller has them already (jaxtune.train),
        else read from model.path (a folder, hub id, alias or `arch:NAME`: config.json only)."""
        config = ml_collections.ConfigDict(config.to_dict())
        if cfg is None:
            folder = hf.resolve_model_dir(config.model.path, config.model.revision or None, config_only=True)
            cfg = model_config(config, folder)
            vocab_ext = planned_vocab_extension(config, cfg.vocab_size)
            cfg = cfg.replace(vocab_size=vocab_ext.new_size)
        return cls(config, cfg, vocab_ext or planned_vocab_extension(config, cfg.vocab_size))

    @property
    def full_finetune(self) -> bool:
        return not self.config.lora.enabled

    @property
    def batch_size(self) -> int:  # rows per optimizer step, all devices and micro-batches together
        return int(self.config.train.batch_size)

    @property
    def grad_accum(self) -> int:
        return int(self.config.optim.grad_accum)

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def seq_len(self) -> int:
        return int(self.config.data.max_len)

    @property
    def rules(self):
        return sharding.make_rules(self.config.mesh.rules)

    def trains_embeddings(self) -> bool:
        return state.trains_new_rows(self.config, self.vocab_ext)

    def replace(self, *, batch_size: int | None = None, remat: str | None = None) -> "Run":
        config = ml_collections.ConfigDict(self.config.to_dict())
        if batch_size is not None:
            config.train.batch_size = int(batch_size)
        if remat is not None:
            config.model.remat = remat
        return Run(config, self.cfg.replace(remat=config.model.remat), self.vocab_ext)


def mesh_sizes(run: Run, num_devices: int) -> dict[str, int]:
    return dict(zip(MESH_AXES, sharding.resolve_mesh_shape(run.config.mesh.shape, num_devices)))


def abstract_mesh(run: Run, num_devices: int) -> jax.sharding.AbstractMesh:
    """The run's mesh for `num_devices` without devices (analytic targets)."""
    sizes = sharding.resolve_mesh_shape(run.config.mesh.shape, num_devices)
    return jax.sharding.AbstractMesh(sizes, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def placed_abstract_params(run: Run, mesh) -> dict:
    """The parameter tree as jaxtune.train loads it (ShapeDtypeStructs in their shardings): the base in
    model.dtype (full fine-tuning: float32, as train loads it), adapters float32."""
    cfg = run.cfg if not run.full_finetune else run.cfg.replace(param_dtype="float32")
    params = abstract_params(cfg)
    shardings = sharding.param_shardings(params, mesh, run.rules)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def abstract_train_state(run: Run, mesh) -> state.TrainState:
    """`jaxtune.state.build` of the run under jax.eval_shape: `state` and `frozen` hold ShapeDtypeStructs
    carrying their shardings; `shardings`, `frozen_shardings` and `tx` are the ones training uses."""
    built: list[state.TrainState] = []

    def build(params):
        train_state = state.build(run.config, params, mesh, run.rules, int(run.config.train.steps), run.vocab_ext)
        built.append(train_state)
        return train_state.state, train_state.frozen

    with _quiet(state.__name__):
        shapes, frozen_shapes = jax.eval_shape(build, placed_abstract_params(run, mesh))
    [train_state] = built

    def placed(tree, shardings):
        return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    return dataclasses.replace(train_state, state=placed(shapes, train_state.shardings),
                               frozen=placed(frozen_shapes, train_state.frozen_shardings))


def abstract_batch(run: Run, mesh) -> dict:
    """One global batch (the batch contract's keys and dtypes, from jaxtune.data) as ShapeDtypeStructs."""
    batch_sh = sharding.batch_sharding(mesh, run.rules)
    dtypes = {key: value.dtype for key, value in make_batch([()], 1, 0).items()}
    return {key: jax.ShapeDtypeStruct((run.batch_size, run.seq_len), dtype, sharding=batch_sh)
            for key, dtype in dtypes.items()}
