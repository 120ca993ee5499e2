"""Pure train and eval steps. The loss is token-normalised over the whole (accumulated) batch.

    loss = sum over every micro-batch of CE(target) * loss_mask  /  sum of loss_mask over them all

Gradient accumulation scans over micro-batches, summing un-normalised gradients and target-token
counts, and divides once at the end: k micro-batches give the same update as one batch k times
larger. Only the trainable subtree is differentiated: frozen weights are a constant argument and
have neither gradients nor optimizer buffers. The trainable leaves are float32 master weights
(jaxtune.state), so gradients are accumulated, and Adam's moments kept, in float32 whatever
model.dtype; the forward casts every param to model.compute_dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxtune.params import merge_trees
from jaxtune.models.kernels import head_cross_entropy_sum
from jaxtune.models.llama import Llama, ModelConfig, lm_head

BATCH_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


# Cross-entropy runs over chunks of sequence positions of about this many logits ([B, c, V] f32:
# 64 MiB): its logits and softmax gradient exist one chunk at a time, and the head's gradients are
# formed in the same pass (jaxtune.models.kernels.head_cross_entropy_sum).
LOSS_CHUNK_LOGITS = 16 * 2**20


def summed_loss(trainable, frozen, batch, cfg: ModelConfig, rng, deterministic: bool):
    """(sum of masked CE, number of target tokens) for one micro-batch of [B, T] arrays."""
    params = merge_trees(trainable, frozen)
    h_BxTxD, h_dropped_BxTxD = Llama(cfg, deterministic=deterministic).apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"], hidden_only=True,
        rngs={"dropout": rng})
    mask_BxT = batch["loss_mask"].astype(jnp.float32)
    B, T = mask_BxT.shape
    chunk = max(1, min(T, LOSS_CHUNK_LOGITS // (B * cfg.vocab_size)))
    kernel, lora_a, lora_b, spec = lm_head(params, cfg)
    ce_sum = head_cross_entropy_sum(h_BxTxD, h_dropped_BxTxD, kernel, lora_a, lora_b, batch["targets"], mask_BxT,
                                    spec=spec, chunk=chunk)
    return ce_sum, jnp.sum(mask_BxT)


def split_micro_batches(batch, num_micro: int):
    """[B, T] -> [num_micro, B / num_micro, T] (rows strided so each micro-batch spans all shards)."""
    return jax.tree_util.tree_map(
        lambda x: x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(state, frozen, batch, *, cfg: ModelConfig, tx: optax.GradientTransformation, grad_accum: int):
    """One optimizer step. state = {step, params (trainable), opt_state, rng} (jaxtune.state); returns (state, metrics)."""
    rng, step_rng = jax.random.split(state["rng"])
    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)
    micro = split_micro_batches(batch, grad_accum)
    micro_rngs = jax.random.split(step_rng, grad_accum)

    def accumulate(carry, xs):
        grads_sum, loss_sum, tokens = carry
        micro_batch, micro_rng = xs
        (loss, n), grads = grad_fn(state["params"], frozen, micro_batch, cfg, micro_rng, False)
        grads_sum = jax.tree_util.tree_map(jnp.add, grads_sum, grads)
        return (grads_sum, loss_sum + loss, tokens + n), None

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state["params"])
    (grads_sum, loss_sum, tokens), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), (micro, micro_rngs))
    denominator = jnp.maximum(tokens, 1.0)
    grads = jax.tree_util.tree_map(lambda g, p: (g / denominator).astype(p.dtype), grads_sum, state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # An update can overflow while the loss it was computed from is still finite: check the weights.
    params_finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(params)]))
    metrics = {"loss": loss_sum / denominator, "target_tokens": tokens, "grad_norm": optax.tree.norm(grads),
               "params_finite": params_finite}
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": rng}
    return new_state, metrics


def eval_step(trainable, frozen, batch, *, cfg: ModelConfig):
    """(sum of masked CE, target tokens) of one eval batch, dropout off."""
    return summed_loss(trainable, frozen, batch, cfg, jax.random.key(0), True)

