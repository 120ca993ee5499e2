"""LoRA adapters: init semantics, targets, merge exactness (tied and untied heads)."""

import jax
import numpy as np
import pytest

from jaxtune import api, checkpoint, lora, sharding, train
from jaxtune import params as params_lib
from jaxtune import peft as peft_io
from jaxtune.config import ConfigError
from jaxtune.models.llama import ALL_TARGETS, LINEAR_TARGETS


def randomize_b(adapters, seed=0):
    """Adapters whose b (and embedding a) are non-zero, so that the delta is visible."""
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def test_parse_targets():
    assert lora.parse_targets("q,v") == ("q_proj", "v_proj")
    # Targets are a set: one canonical (ALL_TARGETS) order whatever the order or spelling typed.
    assert lora.parse_targets("v,q") == lora.parse_targets("q_proj,v_proj") == lora.parse_targets(["v_proj", "q", "v"])
    assert lora.parse_targets("head,embed,down,q") == ("q_proj", "down_proj", "embed_tokens", "lm_head")
    assert lora.parse_targets("lm_head,all-linear") == LINEAR_TARGETS + ("lm_head",)
    assert lora.parse_targets("all-linear") == LINEAR_TARGETS
    assert lora.parse_targets(("all",)) == ALL_TARGETS
    with pytest.raises(ValueError, match="unknown module 'qq'"):
        lora.parse_targets("qq")
    with pytest.raises(ValueError, match="empty"):
        lora.parse_targets(" , ")
    with pytest.raises(ValueError, match="rank"):
        lora.lora_config(0, 16, 0.0, "q", False)


@pytest.mark.parametrize("family", ["smollm2", "qwen2"])  # tied and untied heads
def test_fresh_adapters_leave_the_model_unchanged_and_merge_is_exact(tiny_models, family):
    folder, _ = tiny_models(family)
    model = api.load(str(folder), with_tokenizer=False)
    cfg = lora.lora_config(4, 8.0, 0.0, "all", rslora=family == "qwen2")
    adapters = lora.init_adapters(model.cfg.replace(lora=cfg), jax.random.key(1))
    tokens = [[5, 9, 12, 200, 3], [7, 7, 1]]
    base = api.logits(model, tokens)
    fresh = api.logits(model, tokens, params=params_lib.merge_trees(model.params, adapters), lora=cfg)
    np.testing.assert_allclose(fresh, base, atol=1e-6)  # b = 0 (linear) and a = 0 (embedding)

    trained = randomize_b(adapters)
    with_adapters = api.logits(model, tokens, params=params_lib.merge_trees(model.params, trained), lora=cfg)
    assert np.abs(with_adapters - base).max() > 1e-2
    merged, merged_cfg = lora.merge_adapters(params_lib.merge_trees(model.params, trained), model.cfg.replace(lora=cfg))
    assert not merged_cfg.tie_word_embeddings and "kernel" in merged["lm_head"]
    merged_model = api.LoadedModel(merged_cfg, merged, None, folder)
    np.testing.assert_allclose(api.logits(merged_model, tokens), with_adapters, atol=1e-4)


def test_split_and_predicate(tiny_models):
    model = api.load(str(tiny_models("llama2")[0]), with_tokenizer=False)
    cfg = model.cfg.replace(lora=lora.lora_config(2, 4, 0.0, "q,v", False))
    params = params_lib.merge_trees(model.params, lora.init_adapters(cfg, jax.random.key(0)))
    trainable, frozen = lora.split_trainable(params, full_finetune=False)
    assert set(trainable["model"]["layers"]["self_attn"]) == {"q_proj", "v_proj"}
    assert params_lib.count_params(trainable) == 3 * (64 * 2 + 2 * 64 + 64 * 2 + 2 * 32)
    assert params_lib.count_params(frozen) == params_lib.count_params(model.params)
    all_trainable, none_frozen = lora.split_trainable(params, full_finetune=True)
    assert none_frozen == {} and params_lib.count_params(all_trainable) == params_lib.count_params(params)


def test_init_from_accepts_an_adapter_saved_with_the_targets_in_another_order(tiny_models, tmp_path):
    """lora.targets=v,q continues an adapter saved with target_modules q_proj,v_proj (train.initial_adapters)."""
    import ml_collections

    folder, _ = tiny_models("llama2")
    model = api.load(str(folder), with_tokenizer=False)
    saved_cfg = model.cfg.replace(lora=lora.lora_config(4, 8.0, 0.0, "q_proj,v_proj", False))
    saved = randomize_b(lora.init_adapters(saved_cfg, jax.random.key(0)))
    adapter_dir = peft_io.save_peft_adapter(saved, saved_cfg, tmp_path / "adapter", str(folder))
    config = ml_collections.ConfigDict({"lora": {"init_from": str(adapter_dir)}, "train": {"seed": 0}})
    cfg = model.cfg.replace(lora=lora.lora_config(4, 8.0, 0.0, "v,q", False))
    mesh = sharding.make_mesh("1,-1,1")
    adapters = train.initial_adapters(config, cfg, mesh, sharding.make_rules(""))
    jax.tree_util.tree_map(np.testing.assert_array_equal, adapters, saved)

    with pytest.raises(ConfigError, match="targets q_proj,v_proj"):  # a different set is still refused
        train.initial_adapters(config, model.cfg.replace(lora=lora.lora_config(4, 8.0, 0.0, "q,k,v", False)),
                               mesh, sharding.make_rules(""))


def test_resume_accepts_the_targets_in_another_order(tiny_models):
    """The checkpoint fingerprint of a q,v run matches a v,q run (and one saved before targets were
    put in canonical order, which holds them as typed); another set of targets is still refused."""
    import json

    model = api.load(str(tiny_models("llama2")[0]), with_tokenizer=False)

    def fingerprint(targets):
        cfg = model.cfg.replace(lora=lora.lora_config(4, 8.0, 0.0, targets, False))
        return checkpoint.config_fingerprint("m", cfg, False, lora.adapter_shapes(cfg))

    saved = json.loads(json.dumps(fingerprint("q,v")))  # as it comes back from a checkpoint's meta
    assert fingerprint("v,q") == saved
    checkpoint.check_compatible({"config_fingerprint": saved}, fingerprint("v_proj,q_proj"))
    typed_order = {**saved, "lora": {**saved["lora"], "targets": ["v_proj", "q_proj"]}}
    checkpoint.check_compatible({"config_fingerprint": typed_order}, fingerprint("q,v"))
    with pytest.raises(checkpoint.CheckpointError, match="lora.targets"):
        checkpoint.check_compatible({"config_fingerprint": saved}, fingerprint("q,k,v"))
