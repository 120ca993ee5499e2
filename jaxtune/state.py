"""The train state: its layout, and building it once, each leaf born in its sharding.

    state = {"step": int32 [], "params": trainable subtree, "opt_state": optax state, "rng": PRNG key}

This module owns that layout (`init`) and `build`, which turns a model's params into what the train
loop runs on (a `TrainState`): the trainable / frozen split (`lora.split_trainable`), the trainable
leaves as float32 master weights (`as_master_weights`), the optimizer (`optim.optimizer`, wrapped in
`vocab.train_new_rows` when a LoRA run trains the rows of data.add_tokens), the shardings of the
state and of the frozen weights, and the fresh state created under jit directly in those shardings
(the optimizer state is never gathered on one device; the step counter and the rng are created
under jit too, since a host value cannot be put onto other hosts' devices). `jaxtune.train` and
`benchmarks/bench_train.py` both build their state here; `jaxtune.step.train_step` consumes it and
`jaxtune.checkpoint` saves and restores it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from jaxtune import lora, optim, sharding, vocab
from jaxtune import params as params_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainState:
    """What the train loop runs on: the state, the frozen weights, their shardings, the optimizer."""

    state: dict  # {"step", "params" (trainable, float32), "opt_state", "rng"}, each leaf in its sharding
    frozen: dict  # the weights that do not train (a LoRA run's base; {} for full fine-tuning)
    shardings: dict  # NamedSharding tree of `state`
    frozen_shardings: dict  # NamedSharding tree of `frozen`
    tx: optax.GradientTransformation


def init(trainable, tx: optax.GradientTransformation, seed: int) -> dict:
    """A fresh state of `trainable` (the one definition of the layout; unsharded unless run under jit)."""
    return {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": tx.init(trainable),
            "rng": jax.random.key(seed)}


def as_master_weights(trainable: dict) -> dict:
    """The trainable subtree as float32 master weights, each leaf kept in its sharding.

    Adam's update of a weight is about lr (1e-5 .. 1e-4): below bfloat16's resolution for most
    weights, so a bfloat16 trained leaf (or its moments, which optax keeps in the param dtype) would
    quietly stop moving. The forward casts every param to model.compute_dtype where it is used."""
    leaves = jax.tree_util.tree_leaves(trainable)
    if all(leaf.dtype == jnp.float32 for leaf in leaves):
        return trainable
    to_float32 = functools.partial(jax.tree_util.tree_map, lambda leaf: leaf.astype(jnp.float32))
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):  # traced (jaxtune.plan's eval_shape): no placing
        return to_float32(trainable)
    return sharding.create_sharded(to_float32, jax.tree_util.tree_map(lambda leaf: leaf.sharding, trainable),
                                   trainable)


def optimizer(config: ml_collections.ConfigDict, num_steps: int,
              vocab_ext: vocab.VocabExtension | None = None) -> optax.GradientTransformation:
    """AdamW of config.optim over the trainable leaves; a LoRA run with added tokens moves only their rows."""
    full_finetune = not config.lora.enabled
    tx = optim.optimizer(config.optim, num_steps, full_finetune, trains_new_rows(config, vocab_ext),
                         plus_ratio=config.lora.plus_ratio, plus_lr_embedding=config.lora.plus_lr_embedding)
    if trains_new_rows(config, vocab_ext):  # only the new tokens' rows move; the old ones stay bit-identical
        tx = vocab.train_new_rows(tx, vocab_ext)
    return tx


def trains_new_rows(config: ml_collections.ConfigDict, vocab_ext: vocab.VocabExtension | None) -> bool:
    """A LoRA run whose data.add_tokens added tokens trains the embedding rows of those tokens too.
    (Full fine-tuning trains every row anyway.)"""
    return vocab_ext is not None and vocab_ext.changed and bool(config.lora.enabled)


def shardings(abstract_state: dict, trainable_shardings, mesh: Mesh) -> dict:
    """NamedSharding tree of a state: params as `trainable_shardings`, Adam's moments mirror them,
    the step, the rng and every other optimizer leaf replicated (see sharding.state_shardings)."""
    replicated = sharding.replicated(mesh)
    return {"step": replicated, "params": trainable_shardings, "rng": replicated,
            "opt_state": sharding.state_shardings(abstract_state["opt_state"], trainable_shardings, mesh)}


def build(config: ml_collections.ConfigDict, params: dict, mesh: Mesh, rules, num_steps: int,
          vocab_ext: vocab.VocabExtension | None = None) -> TrainState:
    """The fresh train state of `params` (the whole tree: base weights + adapters, each leaf sharded).

    Reads config.lora.enabled (False: full fine-tuning), config.optim and config.train.seed (the rng
    of dropout). `num_steps` sizes the lr schedule; `vocab_ext` (data.add_tokens) makes a LoRA run
    train the added tokens' rows."""
    full_finetune = not config.lora.enabled
    trainable, frozen = lora.split_trainable(params, full_finetune, trains_new_rows(config, vocab_ext))
    trainable = as_master_weights(trainable)
    log.info("params: %s trainable of %s (%s)", f"{params_lib.count_params(trainable):,}",
             f"{params_lib.count_params(params):,}",
             "full fine-tuning" if full_finetune else f"LoRA r={config.lora.rank}")
    tx = optimizer(config, num_steps, vocab_ext)
    trainable_sh = sharding.param_shardings(trainable, mesh, rules)
    frozen_sh = sharding.param_shardings(frozen, mesh, rules)
    fresh = functools.partial(init, tx=tx, seed=config.train.seed)
    state_sh = shardings(jax.eval_shape(fresh, trainable), trainable_sh, mesh)
    # Everything but the params is created under jit in its sharding; the params are placed already
    # (returning them from the jit would copy every trainable weight).
    born_sh = {key: value for key, value in state_sh.items() if key != "params"}

    def born(trainable):
        state = fresh(trainable)
        return {key: state[key] for key in born_sh}

    state = {**sharding.create_sharded(born, born_sh, trainable), "params": trainable}
    return TrainState(state=state, frozen=frozen, shardings=state_sh, frozen_shardings=frozen_sh, tx=tx)
