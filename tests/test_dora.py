"""DoRA (lora.dora): the math of jaxtune.models.dora against PEFT's DoraLinearLayer and against jax.grad
of the plain formula (norm detached), fresh adapters that leave the model unchanged, PEFT use_dora
adapters out and in (logits equal PeftModel's), merged exports (logits equal transformers'), lora.init_from
a PEFT DoRA folder, the sharded init, the config refusals; slow: a DoRA + LoRA+ run end to end, and the real
SmolLM2 through PEFT."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import random_adapters, require_reference, save_random_peft_adapter, tiny_config, write_chat_jsonl
from jaxtune import api, config as config_lib, hf, loading, lora, optim, sharding, train
from jaxtune import params as params_lib
from jaxtune import peft as peft_io
from jaxtune.hf import ExportError
from jaxtune.models import dora

from test_export import TOKENS, fresh_hf_model, torch_logits

peft = require_reference("peft")
torch = require_reference("torch")


def trained_dora_adapters(model, lora_cfg, seed=0):
    """DoRA adapters as after training: random a, b and magnitudes 10 % off the adapted weight's norms
    (so both the direction and the magnitude change the output)."""
    cfg = model.cfg.replace(lora=lora_cfg)
    adapters = lora.with_dora_magnitudes(random_adapters(cfg, seed=seed), model.params, cfg)
    noise = random_adapters(cfg, seed=seed + 100, scale=1.0)

    def jitter(key_path, leaf, n):
        return leaf * (1 + 0.1 * n) if params_lib.path_of(key_path)[-1] == "lora_magnitude" else leaf

    return jax.tree_util.tree_map_with_path(jitter, adapters, noise)


def jaxtune_logits(model, adapters, lora_cfg):
    return api.logits(model, TOKENS, params=params_lib.merge_trees(model.params, adapters), lora=lora_cfg)


# ============================================================================================
# The math


def plain_dora(x, w, bias, a, b, m, xd, s):
    """PEFT's DoraLinearLayer.forward + the base result, written out in jnp (our [in, out] layout)."""
    norm = jax.lax.stop_gradient(jnp.linalg.norm(w + s * a @ b, axis=0))
    g = m / norm
    return x @ w + bias + (g - 1) * (xd @ w) + g * s * ((xd @ a) @ b)


@pytest.mark.parametrize("with_dropout", [False, True])
def test_dora_dense_and_its_gradient_equal_the_plain_math_with_the_norm_detached(with_dropout):
    ks = jax.random.split(jax.random.key(0), 7)
    x = jax.random.normal(ks[0], (2, 5, 16))
    w = jax.random.normal(ks[1], (16, 12)) * 0.3
    bias = jax.random.normal(ks[2], (12,))
    a = jax.random.normal(ks[3], (16, 4)) * 0.3
    b = jax.random.normal(ks[4], (4, 12)) * 0.3
    m = dora.weight_norm(w, a, b, 2.0) * (1 + 0.2 * jax.random.normal(ks[5], (12,)))
    mask = jax.random.bernoulli(ks[6], 0.7, x.shape) / 0.7

    def ours(x, a, b, m):
        xd = x * mask if with_dropout else None
        return dora.dora_dense(x, w, bias, a, b, m, xd, scaling=2.0, dtype=jnp.float32)

    def reference(x, a, b, m):
        return plain_dora(x, w, bias, a, b, m, x * mask if with_dropout else x, 2.0)

    cotangent = jax.random.normal(jax.random.key(9), (2, 5, 12))
    np.testing.assert_allclose(ours(x, a, b, m), reference(x, a, b, m), rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda *args: jnp.sum(ours(*args) * cotangent), argnums=(0, 1, 2, 3))(x, a, b, m)
    expected = jax.grad(lambda *args: jnp.sum(reference(*args) * cotangent), argnums=(0, 1, 2, 3))(x, a, b, m)
    for name, got, want in zip("x a b m".split(), grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)

    # The detached norm matters: differentiating through it gives other gradients for a and b.
    def through_norm(a, b):
        norm = jnp.linalg.norm(w + 2.0 * a @ b, axis=0)
        xd = x * mask if with_dropout else x
        g = m / norm
        return jnp.sum((x @ w + bias + (g - 1) * (xd @ w) + g * 2.0 * ((xd @ a) @ b)) * cotangent)
    undetached = jax.grad(through_norm, argnums=(0, 1))(a, b)
    assert np.abs(undetached[0] - grads[1]).max() > 1e-2


@pytest.mark.parametrize("bias", [False, True])
def test_dora_dense_with_dropout_equals_peft_dora_linear_in_training_mode(bias):
    """PEFT computes the base result on x and the DoRA term on dropout(x): with one fixed mask for both
    (PEFT's dropout module swapped for it), jaxtune's output equals peft's lora.Linear's."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12, bias=bias)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, use_dora=True)
    layer = peft.tuners.lora.Linear(base, "default", config, r=4, lora_alpha=8, lora_dropout=0.3, use_dora=True)
    with torch.no_grad():
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.copy_(0.3 * torch.randn_like(p))
        layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.2 * torch.randn(12))
    x = torch.randn(2, 5, 16)
    mask = (torch.rand_like(x) > 0.3).float() / 0.7

    class FixedMask(torch.nn.Module):
        def forward(self, x):
            return x * mask

    layer.lora_dropout["default"] = FixedMask()
    layer.train()
    with torch.no_grad():
        want = layer(x).numpy()
    t = lambda p: jnp.asarray(p.detach().numpy())  # noqa: E731
    got = dora.dora_dense(t(x), t(base.weight).T, t(base.bias) if bias else None, t(layer.lora_A["default"].weight).T,
                          t(layer.lora_B["default"].weight).T, t(layer.lora_magnitude_vector["default"].weight),
                          t(x * mask), scaling=2.0, dtype=jnp.float32)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_merged_kernel_is_the_dora_weight():
    ks = jax.random.split(jax.random.key(1), 4)
    w, a, b = (jax.random.normal(k, s) for k, s in zip(ks, [(3, 16, 12), (3, 16, 4), (3, 4, 12)]))
    m = jax.random.uniform(ks[3], (3, 12), minval=0.5, maxval=2.0)
    merged = dora.merged_kernel(w, a, b, m, 0.5)
    np.testing.assert_allclose(jnp.linalg.norm(merged, axis=1), m, rtol=1e-5)  # every column has norm m
    x = jax.random.normal(ks[0], (5, 16))
    np.testing.assert_allclose(x @ merged[1], dora.dora_dense(x, w[1], None, a[1], b[1], m[1], scaling=0.5,
                                                              dtype=jnp.float32), rtol=1e-4, atol=1e-4)


# ============================================================================================
# Model, init, sharding


def test_fresh_dora_adapters_leave_the_model_unchanged_and_train_the_magnitude(tiny_models):
    folder, _ = tiny_models("llama-attn-bias")
    model = api.load(str(folder), with_tokenizer=False)
    lora_cfg = lora.lora_config(4, 8.0, 0.0, "all-linear", False, dora=True)
    cfg = model.cfg.replace(lora=lora_cfg)
    adapters = lora.init_adapters(cfg, jax.random.key(0), model.params)
    magnitude = adapters["model"]["layers"]["mlp"]["up_proj"]["lora_magnitude"]
    kernel = model.params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert magnitude.shape == (cfg.num_layers, cfg.intermediate_size) and magnitude.dtype == jnp.float32
    np.testing.assert_allclose(magnitude, np.linalg.norm(np.asarray(kernel), axis=1), rtol=1e-6)
    np.testing.assert_allclose(jaxtune_logits(model, adapters, lora_cfg), api.logits(model, TOKENS), atol=1e-5)

    assert lora.is_trainable(("model", "layers", "mlp", "up_proj", "lora_magnitude"), full_finetune=False)
    labels = optim.labels(adapters, full_finetune=False)
    assert labels["model"]["layers"]["mlp"]["up_proj"]["lora_magnitude"] == "no_decay"
    with pytest.raises(ValueError, match="pass the base params"):
        lora.init_adapters(cfg, jax.random.key(0))


def test_sharded_dora_init_puts_the_magnitude_on_the_kernels_output_axis(tiny_models):
    folder, _ = tiny_models("llama2")
    model = api.load(str(folder), with_tokenizer=False)
    cfg = model.cfg.replace(lora=lora.lora_config(4, 8.0, 0.0, "all-linear", False, dora=True))
    mesh = sharding.make_mesh("1,2,4")
    rules = sharding.make_rules("")
    sharded = sharding.init_adapters_sharded(cfg, jax.random.key(0), mesh, rules, base=model.params)
    plain = lora.init_adapters(cfg, jax.random.key(0), model.params)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), sharded, plain)
    for target, module in (("q_proj", "self_attn"), ("down_proj", "mlp")):
        magnitude_spec = sharded["model"]["layers"][module][target]["lora_magnitude"].sharding.spec
        b_spec = sharded["model"]["layers"][module][target]["lora_b"].sharding.spec
        assert tuple(magnitude_spec) == (b_spec[0], b_spec[2])  # layers, out: as lora_b's out axis


# ============================================================================================
# PEFT interop


@pytest.mark.parametrize("family,rslora", [("llama-attn-bias", False), ("qwen2", True), ("smollm2", False)])
def test_peft_loads_our_dora_adapter_with_the_same_logits(tiny_models, tmp_path, family, rslora):
    folder, _ = tiny_models(family)
    model = api.load(str(folder), with_tokenizer=False)
    lora_cfg = lora.lora_config(4, 8.0, 0.0, "all-linear", rslora, dora=True)
    adapters = trained_dora_adapters(model, lora_cfg)
    ours = jaxtune_logits(model, adapters, lora_cfg)
    plain_lora = lora.lora_config(4, 8.0, 0.0, "all-linear", rslora)
    without_magnitude = params_lib.filter_tree(adapters, lambda path: path[-1] != "lora_magnitude")
    assert np.abs(ours - jaxtune_logits(model, without_magnitude, plain_lora)).max() > 1e-2  # DoRA matters

    out = peft_io.save_peft_adapter(adapters, model.cfg.replace(lora=lora_cfg), tmp_path / "adapter", str(folder))
    config = json.loads((out / peft_io.ADAPTER_CONFIG).read_text())
    assert config["use_dora"] is True and config["use_rslora"] is rslora
    peft_model = peft.PeftModel.from_pretrained(fresh_hf_model(folder), str(out)).eval()
    np.testing.assert_allclose(torch_logits(peft_model), ours, atol=1e-4)

    loaded, loaded_cfg = peft_io.load_peft_adapter(out, model.cfg)
    assert loaded_cfg == lora_cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, adapters)


def peft_saved_dora_adapter(folder, out_dir, targets, seed=0):
    """A DoRA adapter made and saved by peft itself: random A, B, magnitudes off their initial norms."""
    return save_random_peft_adapter(folder, out_dir, 4, 8, targets, seed=seed, dora=True)


@pytest.mark.parametrize("family", ["llama-attn-bias", "qwen3"])
def test_jaxtune_loads_a_dora_adapter_saved_by_peft(tiny_models, tmp_path, family):
    folder, _ = tiny_models(family)
    model = api.load(str(folder), with_tokenizer=False)
    peft_model = peft_saved_dora_adapter(folder, tmp_path / "adapter", ["q_proj", "v_proj", "down_proj"])
    adapters, lora_cfg = peft_io.load_peft_adapter(tmp_path / "adapter", model.cfg)
    assert lora_cfg.dora and lora_cfg.targets == ("q_proj", "v_proj", "down_proj")
    np.testing.assert_allclose(jaxtune_logits(model, adapters, lora_cfg), torch_logits(peft_model), atol=1e-4)


def test_init_from_continues_a_peft_dora_adapter_and_refuses_a_plain_lora_run(tiny_models, tmp_path):
    folder, _ = tiny_models("llama2")
    model = api.load(str(folder), with_tokenizer=False)
    peft_saved_dora_adapter(folder, tmp_path / "adapter", ["q_proj", "v_proj"])
    saved, _ = peft_io.load_peft_adapter(tmp_path / "adapter", model.cfg)
    config = ml_collections.ConfigDict({"lora": {"init_from": str(tmp_path / "adapter")}, "train": {"seed": 0}})
    mesh, rules = sharding.make_mesh("1,-1,1"), sharding.make_rules("")
    dora_cfg = model.cfg.replace(lora=lora.lora_config(4, 8.0, 0.0, "q,v", False, dora=True))
    adapters = train.initial_adapters(config, dora_cfg, mesh, rules, model.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, adapters, saved)
    with pytest.raises(config_lib.ConfigError, match="dora True"):
        train.initial_adapters(config, model.cfg.replace(lora=lora.lora_config(4, 8.0, 0.0, "q,v", False)),
                               mesh, rules, model.params)


def test_dora_on_vocabulary_targets_is_refused_on_import(tiny_models, tmp_path):
    folder, _ = tiny_models("qwen2")
    model = api.load(str(folder), with_tokenizer=False)
    peft_saved_dora_adapter(folder, tmp_path / "adapter", ["q_proj", "lm_head"])
    with pytest.raises(ExportError, match="use_dora=true on lm_head"):
        peft_io.load_peft_adapter(tmp_path / "adapter", model.cfg)


@pytest.mark.parametrize("family", ["smollm2", "llama-attn-bias"])
def test_merged_dora_export_loads_in_transformers_with_the_adapter_models_logits(tiny_models, tmp_path, family):
    folder, _ = tiny_models(family)
    model = api.load(str(folder), with_tokenizer=False)
    lora_cfg = lora.lora_config(4, 8.0, 0.0, "all-linear", False, dora=True)
    adapters = trained_dora_adapters(model, lora_cfg, seed=3)
    cfg = model.cfg.replace(lora=lora_cfg)
    out = hf.save_merged_model(params_lib.merge_trees(model.params, adapters), cfg, tmp_path / "merged",
                               source_folder=folder)
    np.testing.assert_allclose(torch_logits(fresh_hf_model(out)), jaxtune_logits(model, adapters, lora_cfg), atol=1e-4)
    # and peft's own DoRA merge of the same adapter gives the same model
    adapter_dir = peft_io.save_peft_adapter(adapters, cfg, tmp_path / "adapter", str(folder))
    peft_merged = peft.PeftModel.from_pretrained(fresh_hf_model(folder), str(adapter_dir)).merge_and_unload()
    np.testing.assert_allclose(torch_logits(fresh_hf_model(out)), torch_logits(peft_merged), atol=1e-4)


# ============================================================================================
# Config


@pytest.mark.parametrize("overrides,named", [
    ({"lora.enabled": False, "lora.dora": True}, "lora.dora=True with lora.enabled=False"),
    ({"lora.enabled": False, "lora.plus_ratio": 16.0}, "lora.plus_ratio=16.0 with lora.enabled=False"),
    ({"lora.dora": True, "lora.targets": "all"}, "drop embed_tokens, lm_head from lora.targets"),
    ({"lora.dora": True, "lora.targets": "q,head"}, "drop lm_head from lora.targets"),
    ({"lora.plus_ratio": -1.0}, "lora.plus_ratio=-1.0: must be >= 0"),
    ({"lora.plus_lr_embedding": 0.0}, "lora.plus_lr_embedding=0.0: must be > 0"),
])
def test_unsupported_combinations_are_refused_by_name(overrides, named):
    config = tiny_config(**{"data.train": "x.jsonl", **overrides})
    with pytest.raises(config_lib.ConfigError, match=named.replace("(", r"\(").replace("+", r"\+")):
        config_lib.validate(config)


def test_supported_combinations_pass():
    for overrides in ({"lora.dora": True, "lora.rslora": True, "lora.targets": "all-linear", "lora.dropout": 0.1},
                      {"lora.dora": True, "lora.plus_ratio": 16.0, "lora.targets": "all-linear"},
                      {"lora.plus_ratio": 16.0, "lora.targets": "all"}):
        config_lib.validate(tiny_config(**{"data.train": "x.jsonl", **overrides}))


# ============================================================================================
# End to end (slow)


@pytest.mark.slow
def test_a_dora_lora_plus_run_learns_and_exports_to_peft_and_merged(tiny_chat_model, tmp_path):
    """train.run with lora.dora and lora.plus_ratio (dropout on): the loss falls, the magnitudes move,
    and the PEFT export (PeftModel) and the merged export (transformers) give the run's logits."""
    data = write_chat_jsonl(tmp_path / "train.jsonl")
    config = tiny_config(**{"model.path": str(tiny_chat_model), "data.train": str(data), "lora.dora": True,
                            "lora.plus_ratio": 16.0, "lora.targets": "all-linear", "lora.dropout": 0.05,
                            "data.eval": str(data), "train.eval_every": 16, "optim.lr": 1e-2, "train.steps": 16})
    result = train.run(config, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["loss"]) for r in records if r["kind"] == "eval"]
    # held-out loss on the training file (deterministic): a random tiny model with frozen head and
    # embedding moves slowly from ln(49152) = 10.8, but it must move
    assert [step for step, _ in evals] == [0, 16] and evals[1][1] < evals[0][1] - 0.2, evals
    model = api.load(str(tiny_chat_model), with_tokenizer=False)
    start = lora.init_adapters(result.cfg, jax.random.key(0), model.params)
    moved = result.params["model"]["layers"]["mlp"]["up_proj"]["lora_magnitude"]
    assert np.abs(moved - start["model"]["layers"]["mlp"]["up_proj"]["lora_magnitude"]).max() > 1e-4
    ours = api.logits(model, TOKENS, params=params_lib.merge_trees(model.params, result.params), lora=result.cfg.lora)
    assert np.abs(ours - api.logits(model, TOKENS)).max() > 1e-2
    loaded_model, loaded_params, loaded_lora = loading.load_for_inference(None, tmp_path / "run")
    assert loaded_lora == result.cfg.lora
    np.testing.assert_allclose(api.logits(loaded_model, TOKENS, params=loaded_params, lora=loaded_lora), ours,
                               atol=1e-5)
    from test_train import export_cli

    adapter_dir = export_cli(tmp_path / "run", "peft", tmp_path / "adapter")
    assert json.loads((adapter_dir / peft_io.ADAPTER_CONFIG).read_text())["use_dora"] is True
    peft_model = peft.PeftModel.from_pretrained(fresh_hf_model(tiny_chat_model), str(adapter_dir)).eval()
    np.testing.assert_allclose(torch_logits(peft_model), ours, atol=1e-4)
    merged_dir = export_cli(tmp_path / "run", "merged", tmp_path / "merged")
    np.testing.assert_allclose(torch_logits(fresh_hf_model(merged_dir)), ours, atol=1e-4)


@pytest.mark.slow
def test_real_smollm2_dora_adapter_matches_peft_both_ways(smollm2_folder, tmp_path):
    model = api.load(str(smollm2_folder), with_tokenizer=False)
    lora_cfg = lora.lora_config(8, 16.0, 0.0, "all-linear", False, dora=True)
    adapters = trained_dora_adapters(model, lora_cfg)
    tokens = np.array([[1, 504, 3458, 282, 4649, 314, 2114, 47]], np.int32)
    ours = api.logits(model, tokens, params=params_lib.merge_trees(model.params, adapters), lora=lora_cfg)
    out = peft_io.save_peft_adapter(adapters, model.cfg.replace(lora=lora_cfg), tmp_path / "ours", str(smollm2_folder))
    peft_model = peft.PeftModel.from_pretrained(fresh_hf_model(smollm2_folder), str(out)).eval()
    peft_logits = torch_logits(peft_model, tokens)
    with torch.no_grad():  # the exact answer, up to float64 round-off
        exact = peft_model.double()(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    # 30 layers x 7 DoRA targets, adapters that move the logits by ~25: each float32 side is within
    # 1e-4 of the float64 result (measured 6e-5 both), so the two sides within 2e-4 of each other
    # (measured 1.02e-4; the base models alone differ by 7e-5 here).
    assert np.abs(ours - exact).max() < 1e-4 and np.abs(peft_logits - exact).max() < 1e-4
    np.testing.assert_allclose(peft_logits, ours, atol=2e-4)

    theirs = peft_saved_dora_adapter(smollm2_folder, tmp_path / "theirs", ["q_proj", "v_proj", "up_proj"])
    loaded, loaded_cfg = peft_io.load_peft_adapter(tmp_path / "theirs", model.cfg)
    np.testing.assert_allclose(api.logits(model, tokens, params=params_lib.merge_trees(model.params, loaded),
                                          lora=loaded_cfg), torch_logits(theirs, tokens), atol=1e-4)


def test_bfloat16_compute_keeps_small_magnitude_changes():
    """In bfloat16 compute, g = m / ||V|| is applied in float32: a 1 % magnitude change scales the
    outputs by 1 % on average over their roundings (g = 1.01 in bfloat16 would be 1.0078)."""
    ks = jax.random.split(jax.random.key(2), 4)
    x, w = jax.random.normal(ks[0], (512, 16)), jax.random.normal(ks[1], (16, 12))
    a, b = jax.random.normal(ks[2], (16, 4)) * 0.1, jnp.zeros((4, 12))
    m = dora.weight_norm(w, a, b, 1.0)

    def total(magnitude):
        y = dora.dora_dense(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), None, a, b, magnitude, scaling=1.0,
                            dtype=jnp.bfloat16)
        return float(jnp.sum(jnp.abs(y.astype(jnp.float32))))
    assert abs(total(m * 1.01) / total(m) - 1.01) < 1e-3
