"""jaxtune.optim: parameter groups from the trainable predicate, the learning-rate schedule, and
AdamW's decoupled weight decay applied to matrices only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import config as config_lib
from jaxtune import optim

PARAMS = {
    "model": {
        "embed_tokens": {"embedding": jnp.ones((10, 4))},
        "layers": {"self_attn": {"q_proj": {"kernel": jnp.ones((2, 4, 4)), "bias": jnp.ones((2, 4)),
                                            "lora_a": jnp.ones((2, 4, 2)), "lora_b": jnp.ones((2, 2, 4))}},
                   "input_layernorm": {"scale": jnp.ones((2, 4))}},
        "norm": {"scale": jnp.ones((4,))},
    },
    "lm_head": {"kernel": jnp.ones((4, 10))},
}


def optim_config(**overrides):
    config = config_lib.base_config().optim
    for key, value in overrides.items():
        config[key] = value
    return config


def flat_labels(params, **kwargs):
    labels = optim.labels(params, **kwargs)
    return {"/".join(k.key for k in path): label
            for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]}


def test_labels_full_finetuning_decay_matrices_only():
    labels = flat_labels(PARAMS, full_finetune=True)
    assert labels["model/layers/self_attn/q_proj/kernel"] == "decay"
    assert labels["lm_head/kernel"] == "decay"
    assert labels["model/layers/self_attn/q_proj/bias"] == "no_decay"  # [L, n]: a vector per layer
    assert labels["model/layers/input_layernorm/scale"] == "no_decay"
    assert labels["model/norm/scale"] == "no_decay"


def test_labels_lora_trains_adapters_and_optionally_the_vocabulary():
    labels = flat_labels(PARAMS, full_finetune=False)
    assert {path for path, label in labels.items() if label != "frozen"} == {
        "model/layers/self_attn/q_proj/lora_a", "model/layers/self_attn/q_proj/lora_b"}
    assert labels["model/layers/self_attn/q_proj/lora_a"] == "decay"
    labels = flat_labels(PARAMS, full_finetune=False, train_embeddings=True)
    assert labels["model/embed_tokens/embedding"] == "no_decay" and labels["lm_head/kernel"] == "decay"
    assert labels["model/layers/self_attn/q_proj/kernel"] == "frozen"


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays_to_the_floor(kind):
    lr = optim.schedule(optim_config(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, schedule=kind), total_steps=110)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(lr(110)), 1e-3 if kind == "constant" else 1e-4, rtol=1e-5)
    if kind == "linear":
        np.testing.assert_allclose(float(lr(60)), 5.5e-4, rtol=1e-5)
    if kind == "cosine":
        np.testing.assert_allclose(float(lr(60)), 1e-4 + 0.5 * 9e-4, rtol=1e-5)


def test_weight_decay_shrinks_only_the_decay_group():
    config = optim_config(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, clip_norm=0.0)
    tx = optim.optimizer(config, total_steps=10, full_finetune=True)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
    # zero gradients: AdamW's step is -lr * weight_decay * param for the decay group, nothing elsewhere
    np.testing.assert_allclose(updates["lm_head"]["kernel"], -0.05, rtol=1e-6)
    np.testing.assert_allclose(updates["model"]["layers"]["self_attn"]["q_proj"]["kernel"], -0.05, rtol=1e-6)
    np.testing.assert_array_equal(updates["model"]["norm"]["scale"], 0.0)
    np.testing.assert_array_equal(updates["model"]["embed_tokens"]["embedding"], 0.0)
    np.testing.assert_array_equal(updates["model"]["layers"]["self_attn"]["q_proj"]["bias"], 0.0)


def test_frozen_leaves_get_no_update_and_no_optimizer_state():
    config = optim_config(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5)
    tx = optim.optimizer(config, total_steps=10, full_finetune=False)
    state = tx.init(PARAMS)
    grads = jax.tree_util.tree_map(jnp.ones_like, PARAMS)
    updates, _ = tx.update(grads, state, PARAMS)
    np.testing.assert_array_equal(updates["model"]["layers"]["self_attn"]["q_proj"]["kernel"], 0.0)
    assert np.all(np.asarray(updates["model"]["layers"]["self_attn"]["q_proj"]["lora_a"]) < 0)
    state_sizes = sum(np.size(x) for x in jax.tree_util.tree_leaves(state))
    adapter_size = 2 * 4 * 2 + 2 * 2 * 4
    assert state_sizes <= 2 * adapter_size + 8  # mu and nu of the adapters, plus step counts


# --------------------------------------------------------------------------------------------
# LoRA+ (lora.plus_ratio)

LORA_PLUS_PARAMS = {
    "model": {
        "embed_tokens": {"embedding": jnp.ones((10, 4)), "lora_a": jnp.ones((10, 2)), "lora_b": jnp.ones((2, 4))},
        "layers": {"mlp": {"up_proj": {"kernel": jnp.ones((2, 4, 6)), "lora_a": jnp.ones((2, 4, 2)),
                                       "lora_b": jnp.ones((2, 2, 6)), "lora_magnitude": jnp.ones((2, 6))}}},
    },
    "lm_head": {"kernel": jnp.ones((4, 10)), "lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 10))},
}


def test_lora_plus_labels_follow_peft_groups():
    labels = flat_labels(LORA_PLUS_PARAMS, full_finetune=False, lora_plus=True)
    assert labels == {
        "model/embed_tokens/embedding": "frozen", "model/embed_tokens/lora_a": "decay_embedding",
        "model/embed_tokens/lora_b": "decay_embedding", "model/layers/mlp/up_proj/kernel": "frozen",
        "model/layers/mlp/up_proj/lora_a": "decay", "model/layers/mlp/up_proj/lora_b": "decay_plus",
        "model/layers/mlp/up_proj/lora_magnitude": "no_decay_plus", "lm_head/kernel": "frozen",
        "lm_head/lora_a": "decay", "lm_head/lora_b": "decay_plus"}


def test_lora_plus_steps_b_ratio_times_a_at_every_step_of_the_schedule():
    """Same gradients through a LoRA+ optimizer (ratio 16) and a plain one: every lora_b / magnitude
    update is exactly 16x the plain one and every lora_a update equals it, step after step (Adam's
    update is linear in the lr whatever the gradients, so random gradients over a warmup + cosine
    schedule with weight decay pin the ratio; a ratio applied to a, or not at all, fails). Embedding
    adapters get PEFT's loraplus_lr_embedding, under the same schedule."""
    config = optim_config(lr=1e-3, warmup_steps=2, schedule="cosine", weight_decay=0.1, clip_norm=0.0)
    plain = optim.optimizer(config, total_steps=6, full_finetune=False)
    plus = optim.optimizer(config, total_steps=6, full_finetune=False, plus_ratio=16.0, plus_lr_embedding=2e-5)
    params = jax.tree_util.tree_map(lambda x: x * 0.5, LORA_PLUS_PARAMS)
    plain_state, plus_state = plain.init(params), plus.init(params)
    flat = lambda tree: {"/".join(k.key for k in p): np.asarray(v)  # noqa: E731
                         for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    factors = {"model/embed_tokens/lora_a": 2e-5 / 1e-3, "model/embed_tokens/lora_b": 2e-5 / 1e-3,
               "model/layers/mlp/up_proj/lora_a": 1.0, "model/layers/mlp/up_proj/lora_b": 16.0,
               "model/layers/mlp/up_proj/lora_magnitude": 16.0, "lm_head/lora_a": 1.0, "lm_head/lora_b": 16.0}
    for step in range(5):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.key(step), len(leaves))
        grads = jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
        plain_updates, plain_state = plain.update(grads, plain_state, params)
        plus_updates, plus_state = plus.update(grads, plus_state, params)
        plain_flat, plus_flat = flat(plain_updates), flat(plus_updates)
        for path, factor in factors.items():
            if step > 0:  # step 0 is warmup's lr 0: no update at all
                assert np.abs(plain_flat[path]).min() > 0, path
            np.testing.assert_allclose(plus_flat[path], factor * plain_flat[path], rtol=1e-5, atol=1e-12,
                                       err_msg=f"{path} at step {step}")
        for path in ("model/embed_tokens/embedding", "lm_head/kernel", "model/layers/mlp/up_proj/kernel"):
            np.testing.assert_array_equal(plus_flat[path], 0.0)
