"""Learning-rate schedules and the optimizer: AdamW under optax.multi_transform.

Labels come from the one trainable predicate (jaxtune.lora.is_trainable): frozen leaves get
`set_to_zero` (no optimizer buffers at all); trainable matrices get AdamW with decoupled weight
decay; trainable vectors (norm scales, biases, DoRA magnitudes) and embeddings get AdamW without
decay. Train steps hand the optimizer only the trainable subtree, so for LoRA runs the 'frozen' group
is empty.

LoRA+ (`plus_ratio` > 0, config lora.plus_ratio; the LoRA+ paper, PEFT's `create_loraplus_optimizer`):
every `lora_b` and every DoRA `lora_magnitude` (PEFT puts `lora_B` and every 1-D trainable param in
its B group) learns at plus_ratio x the lr, in a `*_plus` label group; the adapters of the
embedding (PEFT's lora_embedding_A and _B) learn at `plus_lr_embedding` (PEFT's
`loraplus_lr_embedding`, default 1e-6), in a `*_embedding` group. Every group follows the same
schedule shape (warmup, decay), scaled to its own peak; weight decay stays as without LoRA+
(matrices only, optim.weight_decay).
"""

from __future__ import annotations

import jax
import ml_collections
import optax

from jaxtune.lora import LORA_LEAVES, is_trainable
from jaxtune.params import path_of

PLUS_B_LEAVES = ("lora_b", "lora_magnitude")  # LoRA+'s fast group (PEFT: lora_B and the 1-D DoRA magnitudes)
EMBEDDING_ADAPTER_MODULE = ("model", "embed_tokens")


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


def lora_plus_suffix(path: tuple[str, ...]) -> str:
    """'' (the base lr), '_plus' (ratio x lr: lora_b, lora_magnitude) or '_embedding' (embedding adapters)."""
    if path[-1] not in LORA_LEAVES:
        return ""
    if tuple(path[:-1]) == EMBEDDING_ADAPTER_MODULE:
        return "_embedding"
    return "_plus" if path[-1] in PLUS_B_LEAVES else ""


def param_group(path: tuple[str, ...], ndim_without_layers: int, full_finetune: bool,
                train_embeddings: bool = False, lora_plus: bool = False) -> str:
    if not is_trainable(path, full_finetune, train_embeddings):
        return "frozen"
    group = "decay" if path[-1] in ("kernel", "lora_a", "lora_b") and ndim_without_layers >= 2 else "no_decay"
    return group + (lora_plus_suffix(path) if lora_plus else "")  # no_decay: norm scales, biases, embedding tables


def labels(params, full_finetune: bool, train_embeddings: bool = False, lora_plus: bool = False):
    def label(key_path, leaf):
        path = path_of(key_path)
        ndim = leaf.ndim - (1 if path[:2] == ("model", "layers") else 0)
        return param_group(path, ndim, full_finetune, train_embeddings, lora_plus)

    return jax.tree_util.tree_map_with_path(label, params)


def optimizer(optim: ml_collections.ConfigDict, total_steps: int, full_finetune: bool,
              train_embeddings: bool = False, plus_ratio: float = 0.0,
              plus_lr_embedding: float = 1e-6) -> optax.GradientTransformation:
    """AdamW groups under multi_transform; `plus_ratio` > 0 turns on LoRA+ (module docstring)."""
    lr = schedule(optim, total_steps)
    rates: dict[str, optax.Schedule] = {"": lr}
    if plus_ratio > 0:
        rates["_plus"] = lambda step: plus_ratio * lr(step)
        rates["_embedding"] = lambda step: (plus_lr_embedding / optim.lr) * lr(step)

    def adamw(rate, weight_decay):
        return optax.adamw(rate, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=weight_decay)

    transforms = {group + suffix: adamw(rate, weight_decay)
                  for group, weight_decay in (("decay", optim.weight_decay), ("no_decay", 0.0))
                  for suffix, rate in rates.items()}
    groups = optax.multi_transform(
        {**transforms, "frozen": optax.set_to_zero()},
        lambda params: labels(params, full_finetune, train_embeddings, lora_plus=plus_ratio > 0),
    )
    if optim.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.clip_norm), groups)
    return groups
