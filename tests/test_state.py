"""The train state built once (jaxtune.state.build), as jaxtune.train and the benchmark use it: float32
trainable leaves and moments over a bfloat16 base, every leaf in the sharding the mesh gives it, no
optimizer buffers for frozen weights, and the same values as the unsharded `state.init`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from jaxtune import api, lora, sharding, vocab
from jaxtune import params as params_lib
from jaxtune import state as state_lib

MESH_SHAPE = "1,4,2"  # fsdp and tensor both shard (8 simulated devices)


def placed_params(tiny_models, mesh, *, dtype="bfloat16", lora_targets=None, family="llama2"):
    """(the tiny model's params on `mesh`, + sharded adapters when `lora_targets`, its ModelConfig)."""
    model = api.load(str(tiny_models(family)[0]), param_dtype=dtype, with_tokenizer=False)
    params = jax.device_put(model.params, sharding.param_shardings(model.params, mesh))
    cfg = model.cfg
    if lora_targets:
        cfg = cfg.replace(lora=lora.lora_config(4, 8.0, 0.0, lora_targets, False))
        params = params_lib.merge_trees(params, sharding.init_adapters_sharded(cfg, jax.random.key(1), mesh))
    return params, cfg


def run_config(full_finetune: bool):
    config = tiny_config()
    config.lora.enabled = not full_finetune
    return config


def float_dtypes(tree) -> set[str]:
    return {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}


@pytest.mark.parametrize("full_finetune", [False, True])
def test_trainable_leaves_and_moments_are_float32_over_a_bfloat16_base(tiny_models, full_finetune):
    mesh = sharding.make_mesh(MESH_SHAPE)
    params, _ = placed_params(tiny_models, mesh, lora_targets=None if full_finetune else "q,v")
    built = state_lib.build(run_config(full_finetune), params, mesh, sharding.make_rules(""), 10)
    assert float_dtypes(built.state["params"]) == float_dtypes(built.state["opt_state"]) == {"float32"}
    if full_finetune:
        assert built.frozen == {}
        assert params_lib.count_params(built.state["params"]) == params_lib.count_params(params)
    else:
        assert float_dtypes(built.frozen) == {"bfloat16"}  # the frozen base keeps model.dtype
    assert int(built.state["step"]) == 0


def test_every_leaf_is_in_the_sharding_the_mesh_gives_it(tiny_models):
    mesh = sharding.make_mesh(MESH_SHAPE)
    params, _ = placed_params(tiny_models, mesh, dtype="float32", lora_targets="all-linear")
    built = state_lib.build(run_config(False), params, mesh, sharding.make_rules(""), 10)
    expected_params = sharding.param_shardings(built.state["params"], mesh)
    assert built.shardings["params"] == expected_params
    assert built.frozen_shardings == sharding.param_shardings(built.frozen, mesh)
    assert any(not s.is_fully_replicated for s in jax.tree_util.tree_leaves(expected_params))  # a real test
    # The arrays are where the shardings say, the state's as the frozen weights'.
    for tree, shardings in ((built.state, built.shardings), (built.frozen, built.frozen_shardings)):
        for (path, leaf), expected in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                                          jax.tree_util.tree_leaves(shardings)):
            assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), jax.tree_util.keystr(path)
    assert built.state["step"].sharding.is_fully_replicated and built.state["rng"].sharding.is_fully_replicated
    # Adam's moments mirror their parameter's sharding.
    by_path = params_lib.flat(expected_params)
    mirrored = 0
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(built.state["opt_state"])[0]:
        param_sharding = by_path.get(params_lib.trailing_dict_path(key_path))
        if param_sharding is not None and leaf.ndim:
            assert leaf.sharding.is_equivalent_to(param_sharding, leaf.ndim), jax.tree_util.keystr(key_path)
            mirrored += 1
    assert mirrored == 2 * len(by_path)  # mu and nu of every adapter


def test_lora_state_holds_no_optimizer_buffers_for_frozen_weights(tiny_models):
    mesh = sharding.make_mesh(MESH_SHAPE)
    params, _ = placed_params(tiny_models, mesh, lora_targets="q,v")
    built = state_lib.build(run_config(False), params, mesh, sharding.make_rules(""), 10)
    trainable_paths = set(params_lib.flat(built.state["params"]))
    assert trainable_paths and all(path[-1] in ("lora_a", "lora_b") for path in trainable_paths)
    assert not any(path[-1] in ("lora_a", "lora_b") for path in params_lib.flat(built.frozen))
    buffer_paths = {params_lib.trailing_dict_path(kp) for kp, leaf in
                    jax.tree_util.tree_flatten_with_path(built.state["opt_state"])[0] if leaf.ndim}
    assert buffer_paths == trainable_paths
    opt_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(built.state["opt_state"]))
    assert opt_bytes < 0.1 * sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(built.frozen))


def test_added_token_rows_train_in_a_lora_run(tiny_models):
    """data.add_tokens: the embedding becomes a trainable float32 leaf of the LoRA state."""
    mesh = sharding.make_mesh(MESH_SHAPE)
    params, _ = placed_params(tiny_models, mesh, lora_targets="q,v", family="smollm2")
    ext = vocab.VocabExtension(("<a>",), (256,), 256, 257, 256)
    params = vocab.resize_params(params, ext)
    built = state_lib.build(run_config(False), params, mesh, sharding.make_rules(""), 10, ext)
    embedding = built.state["params"]["model"]["embed_tokens"]["embedding"]
    assert embedding.shape == (257, 64) and embedding.dtype == jnp.float32
    assert "embed_tokens" not in built.frozen["model"]  # the tied table is its only leaf
    no_ext = state_lib.build(run_config(False), params, mesh, sharding.make_rules(""), 10)
    assert "embedding" in no_ext.frozen["model"]["embed_tokens"]


def test_built_state_has_the_values_of_the_unsharded_init(tiny_models):
    mesh = sharding.make_mesh(MESH_SHAPE)
    params, _ = placed_params(tiny_models, mesh, dtype="float32", lora_targets="q,v")
    config = run_config(False)
    config.train.seed = 7
    built = state_lib.build(config, params, mesh, sharding.make_rules(""), 10)
    unsharded = state_lib.init(jax.tree_util.tree_map(np.asarray, built.state["params"]), built.tx, seed=7)
    stored = jax.tree_util.tree_map(lambda leaf: np.asarray(jax.random.key_data(leaf))
                                    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else np.asarray(leaf),
                                    (built.state, unsharded))
    assert jax.tree_util.tree_structure(stored[0]) == jax.tree_util.tree_structure(stored[1])
    for a, b in zip(*map(jax.tree_util.tree_leaves, stored)):
        np.testing.assert_array_equal(a, b)


def test_master_weights_are_float32_copies_in_the_same_sharding():
    """The path a LoRA run with data.add_tokens takes over a bfloat16 base: its trained embedding table
    becomes a float32 master weight, sharded as it was; float32 trees pass through uncast."""
    mesh = sharding.make_mesh("1,-1,1")
    place = sharding.place_fn(mesh)
    embedding = np.random.default_rng(0).normal(size=(64, 16)).astype(jnp.bfloat16)
    trainable = {"model": {"embed_tokens": {"embedding": place(("model", "embed_tokens", "embedding"), embedding)},
                           "norm": {"scale": place(("model", "norm", "scale"), np.ones(16, np.float32))}}}
    master = state_lib.as_master_weights(trainable)
    for path in (("embed_tokens", "embedding"), ("norm", "scale")):
        before, after = trainable["model"][path[0]][path[1]], master["model"][path[0]][path[1]]
        assert after.dtype == jnp.float32 and after.sharding == before.sharding, path
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before).astype(np.float32))
    assert state_lib.as_master_weights(master) is master
