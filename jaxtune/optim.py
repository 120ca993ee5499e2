"""Learning-rate schedules and the optimizer: AdamW under optax.multi_transform.

Labels come from the one trainable predicate (jaxtune.lora.is_trainable): frozen leaves get
`set_to_zero` (no optimizer buffers at all); trainable matrices get AdamW with decoupled weight
decay; trainable vectors (norm scales, biases) and embeddings get AdamW without decay. Train steps
hand the optimizer only the trainable subtree, so for LoRA runs the 'frozen' group is empty.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

from jaxtune.lora import is_trainable
from jaxtune.params import path_of


def schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr, then cosine / linear decay to lr * min_lr_ratio, or constant."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    end_lr = optim.lr * optim.min_lr_ratio
    if optim.schedule == "constant":
        decay = optax.constant_schedule(optim.lr)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(optim.lr, end_lr, max(total_steps - warmup, 1))
    else:
        decay = optax.cosine_decay_schedule(optim.lr, max(total_steps - warmup, 1), alpha=optim.min_lr_ratio)
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def param_group(path: tuple[str, ...], ndim_without_layers: int, full_finetune: bool,
                train_embeddings: bool = False) -> str:
    if not is_trainable(path, full_finetune, train_embeddings):
        return "frozen"
    if path[-1] in ("kernel", "lora_a", "lora_b") and ndim_without_layers >= 2:
        return "decay"
    return "no_decay"  # norm scales, biases, embedding tables


def labels(params, full_finetune: bool, train_embeddings: bool = False):
    def label(key_path, leaf):
        path = path_of(key_path)
        ndim = leaf.ndim - (1 if path[:2] == ("model", "layers") else 0)
        return param_group(path, ndim, full_finetune, train_embeddings)

    return jax.tree_util.tree_map_with_path(label, params)


def optimizer(optim: ml_collections.ConfigDict, total_steps: int, full_finetune: bool,
              train_embeddings: bool = False) -> optax.GradientTransformation:
    lr = schedule(optim, total_steps)

    def adamw(weight_decay):
        return optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=weight_decay)

    groups = optax.multi_transform(
        {"decay": adamw(optim.weight_decay), "no_decay": adamw(0.0), "frozen": optax.set_to_zero()},
        lambda params: labels(params, full_finetune, train_embeddings),
    )
    if optim.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.clip_norm), groups)
    return groups
