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
