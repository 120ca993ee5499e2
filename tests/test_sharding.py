"""Mesh parsing, logical axes of every param, shardings of params/adapters/optimizer state/batches."""

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import FAMILIES
from jaxtune import hf, lora, sharding
from jaxtune import params as params_lib
from jaxtune import state as state_lib
from jaxtune.models.llama import ModelConfig, abstract_params
from jaxtune.plan import measured
from jaxtune.plan.compiled import compiled_figures


def family_cfg(tiny_models, family, lora_targets="all"):
    cfg = hf.model_config_from_hf(tiny_models(family)[0])
    return cfg.replace(lora=lora.lora_config(4, 8.0, 0.0, lora_targets, False)) if lora_targets else cfg


def flat(tree, is_leaf=None):
    return {params_lib.path_of(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def test_mesh_shapes_and_clear_errors():
    assert sharding.resolve_mesh_shape("1,-1,1", 8) == (1, 8, 1)
    assert sharding.resolve_mesh_shape([2, -1, 2], 8) == (2, 2, 2)
    assert sharding.resolve_mesh_shape("(1, 2, 4)", 8) == (1, 2, 4)
    mesh = sharding.make_mesh("2,2,2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2} and mesh.size == jax.device_count() == 8
    assert dict(sharding.make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    for bad, message in [("1,-1,-1", "at most one"), ("3,-1,1", "do not divide"), ("2,2,1", "needs 4 devices"),
                         ("1,2", "three sizes"), ("a,b,c", "three integers"), ("0,8,1", ">= 1")]:
        with pytest.raises(sharding.ShardingError, match=message) as error:
            sharding.make_mesh(bad)
        if message not in ("three sizes", "three integers"):
            assert "8 devices: try --config.mesh.shape=1,8,1" in str(error.value)
    assert issubclass(sharding.ShardingError, ValueError)


def test_rules_parse_and_validate():
    rules = dict(sharding.make_rules())
    assert rules["embed"] == ("fsdp",) and rules["batch"] == ("data", "fsdp") and rules["layers"] == ()
    assert all(rules[name] == ("tensor",) for name in ("heads", "kv", "mlp", "vocab"))
    custom = dict(sharding.make_rules("mlp=none, vocab=fsdp,batch=data+fsdp"))
    assert custom["mlp"] == () and custom["vocab"] == ("fsdp",) and custom["embed"] == ("fsdp",)
    assert dict(sharding.make_rules((("heads", None), ("kv", ("tensor",)))))["heads"] == ()
    assert sharding.make_rules(sharding.make_rules("mlp=none")) == sharding.make_rules("mlp=none")
    for bad, message in [("mlp=model", "unknown mesh axis"), ("hidden=fsdp", "unknown logical axis"),
                         ("layers=fsdp", "cannot be sharded"), ("mlp", "LOGICAL=MESH_AXES"),
                         ("batch=data+data", "repeats")]:
        with pytest.raises(sharding.ShardingError, match=message):
            sharding.make_rules(bad)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_param_of_every_family_has_logical_axes(tiny_models, family):
    cfg = family_cfg(tiny_models, family)
    params = abstract_params(cfg)
    axes = flat(sharding.logical_axes_tree(params), is_leaf=lambda x: isinstance(x, tuple))
    shapes = {path: leaf.shape for path, leaf in flat(params).items()}
    for path, names in axes.items():
        assert len(names) == len(shapes[path]), path
        assert all(name is None or name in sharding.LOGICAL_AXES for name in names), path
        assert (names[0] == "layers") == (path[:2] == ("model", "layers")), path
    layer = ("model", "layers")
    assert axes[layer + ("self_attn", "q_proj", "kernel")] == ("layers", "embed", "heads")
    assert axes[layer + ("self_attn", "k_proj", "lora_a")] == ("layers", "embed", None)
    assert axes[layer + ("self_attn", "v_proj", "lora_b")] == ("layers", None, "kv")
    assert axes[layer + ("mlp", "down_proj", "kernel")] == ("layers", "mlp", "embed")
    assert axes[("model", "embed_tokens", "embedding")] == ("vocab", "embed")
    assert axes[("model", "embed_tokens", "lora_a")] == ("vocab", None)
    assert axes[("model", "embed_tokens", "lora_b")] == (None, "embed")
    assert axes[("lm_head", "lora_a")] == ("embed", None) and axes[("lm_head", "lora_b")] == (None, "vocab")
    if cfg.qk_norm:
        assert axes[layer + ("self_attn", "q_norm", "scale")] == ("layers", "head_dim")
    if cfg.qkv_bias:
        assert axes[layer + ("self_attn", "k_proj", "bias")] == ("layers", "kv")
    # Every param gets a sharding of its rank on a mesh using all three axes.
    shardings = flat(sharding.param_shardings(params, sharding.make_mesh("2,2,2")))
    assert all(len(s.spec) == len(shapes[path]) for path, s in shardings.items())
    with pytest.raises(sharding.ShardingError, match="no logical axes known"):
        sharding.logical_axes(("model", "mystery", "kernel"), 2)


@pytest.mark.parametrize("shape", ["1,8,1", "2,2,2", "1,2,4"])
def test_place_fn_loads_sharded_equal_to_unsharded(tiny_models, shape):
    folder = tiny_models("llama2")[0]
    cfg = hf.model_config_from_hf(folder)
    mesh = sharding.make_mesh(shape)
    reference = flat(hf.load_params(folder, cfg))
    loaded = hf.load_params(folder, cfg, place=sharding.place_fn(mesh))
    expected = flat(sharding.param_shardings(abstract_params(cfg), mesh, strict=True))
    for path, array in flat(loaded).items():
        assert array.sharding.is_equivalent_to(expected[path], array.ndim), path
        np.testing.assert_array_equal(np.asarray(array), np.asarray(reference[path]))
    if shape == "1,8,1":
        # FSDP over embed: every base weight has a hidden dim of 64, so each device holds 1/8.
        total = sum(a.nbytes for a in reference.values())
        per_device = measured.bytes_per_device(loaded)
        assert len(per_device) == 8
        for device_bytes in per_device.values():
            assert abs(device_bytes - total / 8) <= 0.05 * total / 8
        assert flat(loaded)[("model", "layers", "mlp", "up_proj", "kernel")].sharding.spec == P(None, "fsdp", "tensor")


@pytest.mark.parametrize("shape", ["1,2,4", "2,2,2"])
def test_lora_adapters_follow_their_base_kernel(tiny_models, shape):
    cfg = family_cfg(tiny_models, "qwen2")
    mesh = sharding.make_mesh(shape)
    base = flat(sharding.param_shardings(abstract_params(cfg.replace(lora=None)), mesh))
    rng = jax.random.key(3)
    adapters = sharding.init_adapters_sharded(cfg, rng, mesh)
    unsharded = flat(lora.init_adapters(cfg, rng))
    assert len(unsharded) == 2 * 9
    for path, array in flat(adapters).items():
        base_path = path[:-1] + ("embedding" if path[-2] == "embed_tokens" else "kernel",)
        if base_path not in base:  # tied head: the kernel is the embedding, transposed
            base_spec = P(*reversed(base[("model", "embed_tokens", "embedding")].spec))
        else:
            base_spec = base[base_path].spec
        spec = array.sharding.spec
        if path[-1] == "lora_a":  # [.., in, r]
            assert tuple(spec) == tuple(base_spec[:-1]) + (None,), (path, spec, base_spec)
        else:  # [.., r, out]
            assert tuple(spec) == tuple(base_spec[:-2]) + (None, base_spec[-1]), (path, spec, base_spec)
        np.testing.assert_array_equal(np.asarray(array), np.asarray(unsharded[path]))
    q_a = flat(adapters)[("model", "layers", "self_attn", "q_proj", "lora_a")]
    assert q_a.sharding.spec == P(None, "fsdp", None)
    assert q_a.addressable_shards[0].data.shape == (3, 64 // mesh.shape["fsdp"], 4)


def test_non_dividing_dims_fall_back_with_one_warning_or_raise(caplog):
    cfg = ModelConfig(vocab_size=250, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    mesh = sharding.make_mesh("1,2,4")
    with caplog.at_level(logging.WARNING, logger="jaxtune.sharding"):
        shardings = flat(sharding.param_shardings(abstract_params(cfg), mesh))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "model/embed_tokens/embedding" in warnings[0].getMessage() and "lm_head/kernel" in warnings[0].getMessage()
    assert "250 not divisible by tensor=4" in warnings[0].getMessage()
    assert shardings[("model", "embed_tokens", "embedding")].spec == P(None, "fsdp")
    assert shardings[("lm_head", "kernel")].spec == P("fsdp", None)
    assert shardings[("model", "layers", "mlp", "up_proj", "kernel")].spec == P(None, "fsdp", "tensor")
    with pytest.raises(sharding.ShardingError, match="lm_head/kernel .* dim 1 \\(vocab\\)"):
        sharding.param_shardings(abstract_params(cfg), mesh, strict=True)

    # A multi-axis rule keeps the longest prefix that divides; a mesh axis used twice is dropped.
    rules = sharding.make_rules("embed=fsdp+tensor,vocab=fsdp")
    spec, notes = sharding.spec_for(("model", "embed_tokens", "embedding"), (250, 64), sharding.make_mesh("1,4,2"), rules)
    assert spec == P(None, ("fsdp", "tensor")) and len(notes) == 1
    spec, notes = sharding.spec_for(("model", "embed_tokens", "embedding"), (256, 64), sharding.make_mesh("1,4,2"), rules)
    assert spec == P("fsdp", "tensor") and "already used" in notes[0]
    spec, _ = sharding.spec_for(("model", "norm", "scale"), (12,), sharding.make_mesh("1,4,2"), "embed=fsdp+tensor")
    assert spec == P("fsdp")


def test_optimizer_state_follows_params_and_its_bytes(tiny_models):
    cfg = family_cfg(tiny_models, "llama2", lora_targets="q,v")
    mesh = sharding.make_mesh("1,4,2")
    params = jax.tree_util.tree_map(jnp.zeros_like, abstract_params(cfg))  # small: fine unsharded
    params = jax.device_put(params, sharding.param_shardings(params, mesh))
    trainable, frozen = lora.split_trainable(params, full_finetune=True)
    labels = jax.tree_util.tree_map_with_path(
        lambda kp, x: "decay" if x.ndim >= 2 else "no_decay", trainable)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
        {"decay": optax.adamw(1e-3, weight_decay=0.1), "no_decay": optax.adamw(1e-3)}, labels))
    train_shardings = sharding.param_shardings(trainable, mesh)
    # As state.build creates it: the state's layout (state.init) under jit, in state.shardings' shardings.
    fresh = functools.partial(state_lib.init, tx=tx, seed=0)
    opt_state_sh = state_lib.shardings(jax.eval_shape(fresh, trainable), train_shardings, mesh)["opt_state"]
    opt_state = sharding.create_sharded(lambda t: fresh(t)["opt_state"], opt_state_sh, trainable)
    by_path = flat(train_shardings)
    mirrored = 0
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        param_path = params_lib.trailing_dict_path(key_path)
        if leaf.ndim == 0:
            assert leaf.sharding.is_fully_replicated, key_path
        else:
            assert leaf.sharding.is_equivalent_to(by_path[param_path], leaf.ndim), key_path
            mirrored += 1
    assert mirrored == 2 * len(by_path)  # mu and nu of every trainable param

    params_bytes, opt_state_bytes = measured.bytes_per_device(params), measured.bytes_per_device(opt_state)
    for device, held in params_bytes.items():
        assert opt_state_bytes[device] == pytest.approx(2 * held, rel=0.01)

    compiled = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: 2 * x, p)).lower(params).compile()
    memory = compiled_figures(compiled)
    assert memory["argument"] > 0 and memory["output"] == pytest.approx(memory["argument"], rel=0.01)
    assert memory["argument"] == pytest.approx(max(params_bytes.values()), rel=0.01)


def test_batch_sharding_and_device_batch():
    mesh = sharding.make_mesh("2,2,2")
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    host = {"tokens": np.arange(8 * 16, dtype=np.int32).reshape(8, 16), "loss_mask": np.ones((8, 16), np.float32)}
    batch = sharding.device_batch(host, mesh)
    for key, array in batch.items():
        np.testing.assert_array_equal(np.asarray(array), host[key])
        assert {shard.data.shape for shard in array.addressable_shards} == {(2, 16)}
    assert sharding.batch_sharding(mesh, "batch=data").spec == P("data")
    assert math.prod(sharding.make_mesh("1,-1,1").devices.shape) == 8
