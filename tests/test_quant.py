"""NF4 (jaxtune/models/quant.py) and QLoRA: codes and bytes against bitsandbytes and qwix, the model over
a quantised base against the float model over the de-quantised weights, LoRA gradients, memory, config
validation, loading a QLoRA run, and the merged export's two bases against transformers."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import random_adapters, require_reference, tiny_config, write_chat_jsonl, write_run
from jaxtune import checkpoint, export, generate, hf, loading, lora, sharding, state, step, train, workdir
from jaxtune import config as config_lib
from jaxtune import params as params_lib
from jaxtune.models import quant
from jaxtune.models.llama import LINEAR_TARGETS, Llama
from jaxtune.plan.compiled import compiled_figures

SHAPES = [(192, 576), (1536, 576), (576, 1536), (7, 320)]  # SmolLM2's k/v, gate/up, down; a short last block
TOKENS = np.array([[5, 17, 99, 3, 64, 200, 31, 8]], dtype=np.int32)


def weight(shape, seed=0, zero_block=True):
    w = (0.02 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)
    if zero_block:
        w[0, :64] = 0.0  # an all-zero block: absmax 0, every code the exact zero
    return w


# --------------------------------------------------------------------------------------------
# The NF4 codes against independent implementations


@pytest.mark.parametrize("shape", SHAPES)
def test_codes_bytes_and_values_equal_bitsandbytes(shape):
    torch = require_reference("torch")
    bnb = require_reference("bitsandbytes.functional")
    w = weight(shape)
    packed, state_ = bnb.quantize_4bit(torch.from_numpy(w), quant_type="nf4", blocksize=64)
    leaves = quant.quantize(jnp.asarray(w))
    assert leaves["nf4"].dtype == jnp.uint8 and leaves["nf4"].shape == (shape[0], shape[1] // 2)
    np.testing.assert_array_equal(np.asarray(leaves["nf4"]).reshape(-1), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(leaves["absmax"]).reshape(-1), state_.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(quant.dequantize(leaves)), bnb.dequantize_4bit(packed, state_).numpy())
    np.testing.assert_array_equal(quant.NF4_CODE, state_.code.numpy())


def test_codes_equal_qwix():
    numerics = require_reference("qwix._src.core.numerics")
    w = weight((64, 256), seed=1, zero_block=False)
    packed, absmax = quant.quantize_nf4(jnp.asarray(w))
    scaled = w.reshape(64, 4, 64) / np.asarray(absmax)[..., None]
    expected = np.asarray(numerics.fp_to_nf4(jnp.asarray(scaled))).astype(np.uint8).reshape(64, 256)
    np.testing.assert_array_equal(np.asarray(quant.unpack(packed)), expected)
    np.testing.assert_array_equal(quant.NF4_CODE, np.asarray(numerics.get_nf4_buckets(), np.float32))


def test_pack_unpack_round_trip_and_nibble_order():
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 16, (3, 128)), jnp.uint8)
    packed = quant.pack(codes)
    np.testing.assert_array_equal(np.asarray(quant.unpack(packed)), np.asarray(codes))
    assert int(packed[0, 0]) == int(codes[0, 0]) * 16 + int(codes[0, 1])


def test_quantisation_error_per_block_is_the_nf4_grid():
    """Every value comes back as the NF4 code nearest to value / absmax, times absmax: its error is at
    most half the gap between the two codes around it, times absmax, and no other code is closer."""
    w = weight((64, 512), seed=2)
    leaves = quant.quantize(jnp.asarray(w))
    back = np.asarray(quant.dequantize(leaves))
    absmax = np.repeat(np.asarray(leaves["absmax"]), 64, axis=1)
    codes = np.asarray(quant.unpack(leaves["nf4"]))
    np.testing.assert_array_equal(back, quant.NF4_CODE[codes] * absmax)
    scaled = np.divide(w, absmax, out=np.zeros_like(w), where=absmax > 0)
    distance_to_every_code = np.abs(scaled[..., None] - quant.NF4_CODE)
    np.testing.assert_array_equal(distance_to_every_code.argmin(-1), codes)  # nearest (no ties in random data)
    gaps = np.diff(quant.NF4_CODE)
    half_gap = np.maximum(np.concatenate([[0], gaps]), np.concatenate([gaps, [0]]))[codes] / 2
    assert np.all(np.abs(back - w) <= half_gap * absmax * (1 + 1e-6) + 1e-12)
    blocks = np.abs(w).reshape(64, 8, 64).max(-1)
    np.testing.assert_array_equal(np.abs(back).reshape(64, 8, 64).max(-1), blocks)  # the block max is exact


@pytest.mark.parametrize("shape", SHAPES)
def test_double_quantisation_follows_bitsandbytes(shape):
    """Dynamic 8-bit code, offset (the mean), 256-blocks and their float32 scales equal bitsandbytes'
    compress_statistics=True. The codes are the nearest of the dynamic code: bitsandbytes' CPU
    search returns the nearest too except for a few values, where ours is the closer one."""
    torch = require_reference("torch")
    bnb = require_reference("bitsandbytes.functional")
    np.testing.assert_array_equal(quant.DYNAMIC_CODE, bnb.create_dynamic_map(signed=True).numpy())
    w = weight(shape, seed=3)
    leaves = quant.quantize(jnp.asarray(w), double=True)
    single = quant.quantize(jnp.asarray(w))
    _, nested = bnb.quantize_4bit(torch.from_numpy(w), quant_type="nf4", blocksize=64, compress_statistics=True)
    np.testing.assert_allclose(float(leaves["absmax_offset"]), float(nested.offset), rtol=1e-6)
    centred = np.asarray(single["absmax"]).reshape(-1) - np.float32(leaves["absmax_offset"])
    bnb_codes, bnb_state = bnb.quantize_blockwise(torch.from_numpy(centred), blocksize=256)
    np.testing.assert_array_equal(np.asarray(leaves["absmax_scale"]), bnb_state.absmax.numpy())
    ours, theirs = np.asarray(leaves["absmax_code"]).reshape(-1), bnb_codes.numpy()
    x = centred / np.repeat(bnb_state.absmax.numpy(), 256)[:centred.size]
    assert np.all(np.abs(x - quant.DYNAMIC_CODE[ours]) <= np.abs(x - quant.DYNAMIC_CODE[theirs]))
    assert np.mean(ours == theirs) > 0.98
    absmax = quant.dequantize_absmax(leaves["absmax_code"], leaves["absmax_scale"], leaves["absmax_offset"])
    np.testing.assert_array_equal(np.asarray(quant.dequantize(leaves)),
                                  np.asarray(quant.dequantize_nf4(leaves["nf4"], absmax)))
    assert np.abs(np.asarray(absmax) - np.asarray(single["absmax"])).max() <= 0.01 * np.abs(single["absmax"]).max()


def test_stacked_leaves_equal_per_layer_leaves():
    w = np.stack([weight((128, 256), seed=s) for s in range(3)])
    stacked = quant.quantize(jnp.asarray(w), double=True, stacked=True)
    for i in range(3):
        one = quant.quantize(jnp.asarray(w[i]), double=True)
        for name, leaf in one.items():
            np.testing.assert_array_equal(np.asarray(stacked[name][i]), np.asarray(leaf))
    np.testing.assert_array_equal(np.asarray(quant.dequantize(stacked)[1]), np.asarray(quant.dequantize(
        {name: leaf[1] for name, leaf in stacked.items()})))


def test_a_dimension_that_is_not_a_multiple_of_64_is_refused():
    with pytest.raises(ValueError, match="multiple of 64"):
        quant.quantize(jnp.zeros((4, 96)))


# --------------------------------------------------------------------------------------------
# The model over a quantised base


@pytest.fixture(scope="module")
def qmodel_folder(tmp_path_factory, chatml):
    """A tiny untied Llama whose every kernel dimension is a multiple of 64 (quantisable), with a tokenizer."""
    torch = require_reference("torch")
    transformers = require_reference("transformers")
    folder = tmp_path_factory.mktemp("qlora_llama")
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    chatml.save_pretrained(folder)
    return folder


def quant_cfg(double=False, targets=LINEAR_TARGETS):
    return quant.QuantConfig(targets=tuple(targets), double=double)


def float_twin(params):
    """The float model's params: every NF4 module de-quantised to a float32 kernel."""
    return jax.tree_util.tree_map(jnp.asarray, hf.dequantized_params(params))


@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("targets", [LINEAR_TARGETS, LINEAR_TARGETS + ("lm_head",)])
def test_quantised_model_logits_equal_the_float_model_over_dequantised_weights(qmodel_folder, double, targets):
    model = loading.load(str(qmodel_folder), with_tokenizer=False, quant=quant_cfg(double, targets))
    layers = model.params["model"]["layers"]
    assert "kernel" not in layers["mlp"]["down_proj"] and layers["mlp"]["down_proj"]["nf4"].dtype == jnp.uint8
    assert ("nf4" in model.params["lm_head"]) == ("lm_head" in targets)
    float_model = loading.load(str(qmodel_folder), with_tokenizer=False)
    lora_cfg = lora.lora_config(4, 8.0, 0.0, "all-linear", False)
    adapters = random_adapters(model.cfg.replace(lora=lora_cfg), seed=1)
    positions = np.arange(TOKENS.shape[1])[None]
    ours, _ = Llama(model.cfg.replace(lora=lora_cfg)).apply(
        {"params": params_lib.merge_trees(model.params, adapters)}, TOKENS, positions, np.ones_like(TOKENS))
    twin, _ = Llama(float_model.cfg.replace(lora=lora_cfg)).apply(
        {"params": params_lib.merge_trees(float_twin(model.params), adapters)}, TOKENS, positions, np.ones_like(TOKENS))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(twin), atol=1e-5, rtol=1e-5)
    original, _ = Llama(float_model.cfg).apply({"params": float_model.params}, TOKENS, positions, np.ones_like(TOKENS))
    base, _ = Llama(model.cfg).apply({"params": model.params}, TOKENS, positions, np.ones_like(TOKENS))
    assert 1e-4 < np.abs(np.asarray(base) - np.asarray(original)).max() < 0.5  # NF4 is close, not equal


def train_setup(folder, double=False, remat="none"):
    config = tiny_config(**{"model.path": str(folder), "model.quantize": "nf4", "model.quantize_double": double,
                            "model.remat": remat, "lora.dropout": 0.0, "lora.rank": 4})
    cfg = hf.model_config_from_hf(folder, remat=remat, quant=config_lib.quant_config(config.model),
                                  lora=lora.lora_config(4, 8.0, 0.0, "all-linear", False))
    base = hf.load_params(folder, cfg)
    params = params_lib.merge_trees(base, random_adapters(cfg, seed=2))
    batch = {"tokens": np.tile(TOKENS, (2, 1)), "targets": np.roll(np.tile(TOKENS, (2, 1)), -1, axis=1),
             "loss_mask": np.ones((2, 8), np.float32), "positions": np.tile(np.arange(8), (2, 1)).astype(np.int32),
             "segment_ids": np.ones((2, 8), np.int32)}
    return config, cfg, params, batch


def test_lora_gradients_over_the_quantised_base_equal_those_over_the_dequantised_weights(qmodel_folder):
    config, cfg, params, batch = train_setup(qmodel_folder, double=True)
    trainable, frozen = lora.split_trainable(params, full_finetune=False)
    loss = lambda t, f, c: step.summed_loss(t, f, batch, c, jax.random.key(0), True)[0]  # noqa: E731
    grads = jax.grad(loss)(trainable, frozen, cfg)
    twin_grads = jax.grad(loss)(trainable, float_twin(frozen), cfg.replace(quant=None))
    for (path, g), (_, t) in zip(params_lib.flat(grads).items(), params_lib.flat(twin_grads).items()):
        assert np.abs(np.asarray(g)).max() > 0, path
        np.testing.assert_allclose(np.asarray(g), np.asarray(t), atol=2e-5, rtol=1e-4, err_msg=str(path))


def test_a_lora_train_step_runs_and_leaves_the_nf4_base_untouched(qmodel_folder):
    config, cfg, params, batch = train_setup(qmodel_folder)
    mesh = sharding.make_mesh("1,-1,1", jax.devices()[:2])
    rules = sharding.make_rules("")
    params = jax.device_put(params, sharding.param_shardings(params, mesh, rules))
    built = state.build(config, params, mesh, rules, num_steps=3)
    frozen_before = jax.tree_util.tree_map(np.asarray, built.frozen)
    train = jax.jit(lambda s, f, b: step.train_step(s, f, b, cfg=cfg, tx=built.tx, grad_accum=1))
    batch = sharding.device_batch(batch, mesh, rules)
    losses = []
    current = built.state
    for _ in range(3):
        current, metrics = train(current, built.frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    for before, after in zip(jax.tree_util.tree_leaves(frozen_before), jax.tree_util.tree_leaves(built.frozen)):
        np.testing.assert_array_equal(before, np.asarray(after))


def test_frozen_weights_take_under_a_third_of_their_float32_bytes(qmodel_folder):
    """Param tree bytes, and the compiled train step's argument bytes; the step's temporaries do not
    hold a float copy of every layer's kernels (the backward recomputes them from the NF4 leaves)."""
    def kernel_bytes(tree):
        flat = params_lib.flat(tree)
        return sum(leaf.nbytes for path, leaf in flat.items() if path[-2] in LINEAR_TARGETS and path[-1] != "bias"
                   and path[-1] not in lora.LORA_LEAVES)

    results = {}
    for name in ("float", "nf4", "nf4-double"):
        config, cfg, params, batch = train_setup(qmodel_folder, double=name == "nf4-double")
        if name == "float":
            params = params_lib.merge_trees(float_twin(lora.split_trainable(params, False)[1]),
                                            lora.split_trainable(params, False)[0])
            cfg = cfg.replace(quant=None)
        trainable, frozen = lora.split_trainable(params, full_finetune=False)
        if name == "nf4-double":  # its param bytes only: the step is the same program as nf4's
            results[name] = (kernel_bytes(frozen), None)
            continue
        tx = state.optimizer(config, 3)
        st = state.init(trainable, tx, 0)
        compiled = jax.jit(lambda s, f, b, c=cfg: step.train_step(s, f, b, cfg=c, tx=tx, grad_accum=1)).lower(
            st, frozen, batch).compile()
        results[name] = (kernel_bytes(frozen), compiled_figures(compiled))
    float_bytes = results["float"][0]
    assert results["nf4"][0] <= 0.3 * float_bytes  # 4 bits + a float32 absmax per 64: 0.156x
    assert results["nf4-double"][0] < results["nf4"][0]
    saved = results["float"][1]["argument"] - results["nf4"][1]["argument"]
    assert saved >= 0.7 * float_bytes
    # No float copy of the layers' kernels kept for the backward (it was, before the layers' remat
    # policy: the float step's temporaries plus all the kernels in float).
    # A float copy would add ~float_bytes of temporaries; dequantising per layer adds a few per cent.
    extra = results["nf4"][1]["temp"] - results["float"][1]["temp"]
    assert extra <= 0.25 * float_bytes, (extra, float_bytes)


def test_sharded_leaves_carry_the_kernels_axes(qmodel_folder):
    cfg = hf.model_config_from_hf(qmodel_folder, quant=quant_cfg(double=True, targets=LINEAR_TARGETS + ("lm_head",)))
    params = hf.load_params(qmodel_folder, cfg)
    mesh = sharding.make_mesh("1,2,2", jax.devices()[:4])
    shardings = params_lib.flat(sharding.param_shardings(params, mesh, sharding.make_rules("")))
    layers = ("model", "layers")
    assert shardings[(*layers, "mlp", "gate_proj", "nf4")].spec == P(None, "tensor", "fsdp")  # [L, out=mlp, in=embed]
    assert shardings[(*layers, "mlp", "down_proj", "absmax_code")].spec == P(None, "fsdp", None)  # in/64 = 3: no split
    assert shardings[(*layers, "self_attn", "q_proj", "absmax_scale")].spec == P(None, None)
    assert shardings[(*layers, "self_attn", "q_proj", "absmax_offset")].spec == P(None)
    assert shardings[("lm_head", "nf4")].spec == P("tensor", "fsdp")


@pytest.mark.slow  # two short train.run calls: ~5 min on a loaded 2-core machine
def test_a_qlora_training_run_checkpoints_adapters_only_and_resumes_to_the_same_adapters(qmodel_folder, tmp_path):
    """train.run over an NF4 base, FSDP over the 8 simulated devices (packed kernels sharded), a
    checkpoint every 2 of 4 steps; a rerun after losing step 4 resumes from step 2 to the same adapters."""
    config = tiny_config(**{"model.path": str(qmodel_folder), "data.train": str(write_chat_jsonl(tmp_path / "t.jsonl")),
                            "model.quantize": "nf4", "model.quantize_double": True, "lora.targets": "all-linear",
                            "mesh.shape": "1,-1,1", "train.steps": 4, "checkpoint.every": 2, "checkpoint.keep": 5})
    result = train.run(config, tmp_path / "run")
    assert result.train_loss is not None and np.isfinite(result.train_loss)
    saved = workdir.load_trained_params(tmp_path / "run", 4)
    assert {path[-1] for path in params_lib.flat(saved)} == {"lora_a", "lora_b"}  # the NF4 base is not saved
    assert any(path[-1] == "nf4" for path in params_lib.flat(result.frozen))
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    train.run(config, tmp_path / "resumed")
    assert sorted(checkpoint.step_dirs(tmp_path / "resumed" / "checkpoints")) == [2, 4]
    resumed = workdir.load_trained_params(tmp_path / "resumed", 4)
    for path, leaf in params_lib.flat(saved).items():
        np.testing.assert_array_equal(params_lib.flat(resumed)[path], leaf, err_msg=str(path))


# --------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("change, named", [
    ({"lora.enabled": False}, "cannot be fully fine-tuned"),
    ({"model.quantize": "int4"}, "model.quantize='int4'"),
    ({"model.quantize_targets": "all"}, "embed_tokens cannot be quantised"),
    ({"model.quantize_targets": "q,bogus"}, "model.quantize_targets: unknown module 'bogus'"),
    ({"model.quantize_targets": "lm_head", "data.add_tokens": "<x>"}, "leave lm_head out"),
])
def test_unsupported_quantisation_combinations_are_refused_by_name(change, named):
    config = tiny_config(**{"model.quantize": "nf4", **change})
    with pytest.raises(config_lib.ConfigError, match=named):
        config_lib.validate(config)


def test_a_qlora_config_validates_and_builds_its_quant_config():
    config = tiny_config(**{"model.quantize": "nf4", "model.quantize_targets": "q,v,lm_head",
                            "model.quantize_double": True, "data.train": "task:viggo"})
    config_lib.validate(config)
    assert config_lib.quant_config(config.model) == quant.QuantConfig("nf4", ("q_proj", "v_proj", "lm_head"), True)
    assert config_lib.quant_config(tiny_config().model) is None


def test_a_tied_model_refuses_a_quantised_lm_head(tiny_models):
    folder, _ = tiny_models("smollm2")
    with pytest.raises(hf.ModelError, match="leave lm_head out"):
        hf.model_config_from_hf(folder, quant=quant_cfg(targets=("lm_head",)))


# --------------------------------------------------------------------------------------------
# A QLoRA run: loading and export


@pytest.fixture(scope="module")
def qlora_run(qmodel_folder, tmp_path_factory):
    cfg = hf.model_config_from_hf(qmodel_folder)
    lora_cfg = lora.lora_config(4, 8.0, 0.0, "all-linear", False)
    adapters = jax.tree_util.tree_map(np.asarray, random_adapters(cfg.replace(lora=lora_cfg), seed=4, scale=0.2))
    workdir = write_run(tmp_path_factory.mktemp("runs") / "qlora", qmodel_folder, lora_cfg, {3: (adapters, 1.0)},
                        {"model": {"quantize": "nf4", "quantize_targets": "all-linear", "quantize_double": True}})
    return workdir, adapters, lora_cfg


def test_loading_a_qlora_run_quantises_its_base_as_training_did(qlora_run, qmodel_folder):
    workdir, adapters, lora_cfg = qlora_run
    model, params, loaded_lora = loading.load_for_inference(None, workdir)
    assert model.cfg.quant == quant_cfg(double=True) and loaded_lora == lora_cfg
    trained = hf.load_params(qmodel_folder, model.cfg)
    assert params_lib.flat(params)[("model", "layers", "self_attn", "o_proj", "absmax_code")].dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(params["model"]["layers"]["mlp"]["up_proj"]["nf4"]),
                                  np.asarray(trained["model"]["layers"]["mlp"]["up_proj"]["nf4"]))


def test_greedy_generation_of_a_qlora_run_equals_the_float_model_over_its_dequantised_base(qlora_run):
    workdir, _, _ = qlora_run
    model, params, lora_cfg = loading.load_for_inference(None, workdir)
    prompts = [[5, 17, 99], [64, 200, 31, 8, 3]]
    ours = generate.generate(model, prompts, 6, eos_ids=[], params=params, lora=lora_cfg)
    twin = loading.LoadedModel(model.cfg.replace(quant=None), float_twin(params), model.tokenizer, model.folder)
    assert ours == generate.generate(twin, prompts, 6, eos_ids=[], lora=lora_cfg)
    assert all(len(row) == 6 for row in ours)


def torch_logits(folder, adapter_dir=None):
    torch = require_reference("torch")
    transformers = require_reference("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = require_reference("peft").PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(torch.as_tensor(TOKENS, dtype=torch.long)).logits.numpy()


def test_merged_exports_match_the_trained_model_or_the_original_base(qlora_run, qmodel_folder, tmp_path):
    workdir, adapters, lora_cfg = qlora_run
    model, params, loaded_lora = loading.load_for_inference(None, workdir)
    positions = np.arange(TOKENS.shape[1])[None]
    trained_logits, _ = Llama(model.cfg.replace(lora=loaded_lora)).apply(
        {"params": params}, TOKENS, positions, np.ones_like(TOKENS))
    trained_logits = np.asarray(trained_logits)

    dequantized = export.export_run(workdir, "merged", tmp_path / "dequantized")
    np.testing.assert_allclose(torch_logits(dequantized), trained_logits, atol=1e-4)
    original = export.export_run(workdir, "merged", tmp_path / "original", merge_base="original")
    adapter = export.export_run(workdir, "peft", tmp_path / "adapter")
    np.testing.assert_allclose(torch_logits(original), torch_logits(qmodel_folder, adapter), atol=1e-4)
    assert np.abs(torch_logits(original) - trained_logits).max() > 1e-3  # the quantisation error: not the same model
    assert json.loads((dequantized / "config.json").read_text())["tie_word_embeddings"] is False


def test_merge_base_is_checked_against_the_run(qlora_run, tmp_path, tiny_models):
    workdir, _, _ = qlora_run
    with pytest.raises(hf.ExportError, match="applies to --format=merged"):
        export.export_run(workdir, "peft", tmp_path / "a", merge_base="original")
    with pytest.raises(hf.ExportError, match="did not quantise"):
        export.merge_base_of(config_lib.base_config(), "merged", "dequantized")
    assert export.merge_base_of(config_lib.base_config(), "merged", None) == "original"
