"""PEFT adapter and merged-model export, PEFT adapter import: checked against peft and transformers.

Every test compares logits with the real libraries on tiny random models: tied (smollm2 family)
and untied (qwen2, llama2) heads, adapters on all linear layers, embed_tokens and lm_head, with
and without rsLoRA.
"""

import json

import jax
import numpy as np
import pytest

from conftest import random_adapters, require_reference, save_random_peft_adapter, write_run
from jaxtune import api, export, hf, lora
from jaxtune import params as params_lib
from jaxtune import peft as peft_io
from jaxtune.models.llama import ALL_TARGETS

peft = require_reference("peft")
torch = require_reference("torch")
transformers = require_reference("transformers")

TOKENS = np.array([[5, 9, 12, 200, 3, 255, 17, 0], [7, 7, 1, 254, 128, 64, 33, 2]], np.int32)


def torch_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def fresh_hf_model(folder):
    """A new torch model per use: peft wraps (mutates) the model it is given."""
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def jaxtune_adapter_logits(model, adapters, lora_cfg, tokens=TOKENS):
    return api.logits(model, tokens, params=params_lib.merge_trees(model.params, adapters), lora=lora_cfg)


def adapter_tensor_names(adapter_dir) -> set[str]:
    from jaxtune.hf import read_safetensors

    return {name for name, _ in read_safetensors(adapter_dir / peft_io.ADAPTER_WEIGHTS)}


# The full matrices peft's save_embedding_layers writes when embed_tokens and lm_head carry adapters.
EMBEDDING_LAYER_KEYS = {"base_model.model.model.embed_tokens.base_layer.weight",
                        "base_model.model.lm_head.base_layer.weight"}


# --------------------------------------------------------------------------------------------
# Our adapter -> peft


@pytest.mark.parametrize("family,rslora", [("smollm2", False), ("smollm2", True), ("qwen2", True), ("llama2", False)])
def test_peft_loads_our_adapter_with_the_same_logits(tiny_models, tmp_path, family, rslora):
    folder, _ = tiny_models(family)
    model = api.load(str(folder), with_tokenizer=False)
    lora_cfg = lora.lora_config(4, 8.0, 0.0, "all", rslora=rslora)
    cfg = model.cfg.replace(lora=lora_cfg)
    adapters = random_adapters(cfg)
    ours = jaxtune_adapter_logits(model, adapters, lora_cfg)
    assert np.abs(ours - api.logits(model, TOKENS)).max() > 1e-2  # the adapters matter

    out = peft_io.save_peft_adapter(adapters, cfg, tmp_path / "adapter", str(folder))
    peft_model = peft.PeftModel.from_pretrained(fresh_hf_model(folder), str(out)).eval()
    np.testing.assert_allclose(torch_logits(peft_model), ours, atol=1e-4)

    # And back: our own export reads into the same tree.
    loaded, loaded_cfg = peft_io.load_peft_adapter(out, model.cfg)
    assert loaded_cfg == lora_cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, adapters)


def peft_saved_adapter(folder, out_dir, targets, rslora, seed=0, alpha=8):
    """An adapter made and saved by peft itself, with random non-zero A and B everywhere (rank 4)."""
    return save_random_peft_adapter(folder, out_dir, 4, alpha, targets, rslora=rslora, seed=seed)


def test_our_adapter_files_match_what_peft_writes(tiny_models, tmp_path):
    folder, _ = tiny_models("smollm2")
    model = api.load(str(folder), with_tokenizer=False)
    peft_saved_adapter(folder, tmp_path / "peft", list(ALL_TARGETS), rslora=True)
    cfg = model.cfg.replace(lora=lora.lora_config(4, 8, 0.0, "all", rslora=True))
    ours = peft_io.save_peft_adapter(random_adapters(cfg), cfg, tmp_path / "ours", str(folder),
                                    embedding_layers=model.params)

    theirs_config = json.loads((tmp_path / "peft" / peft_io.ADAPTER_CONFIG).read_text())
    ours_config = json.loads((ours / peft_io.ADAPTER_CONFIG).read_text())
    assert set(ours_config) == set(theirs_config) - {"peft_version"}
    for key in set(ours_config) - {"base_model_name_or_path", "target_modules"}:
        assert ours_config[key] == theirs_config[key], key
    assert sorted(ours_config["target_modules"]) == sorted(theirs_config["target_modules"])
    assert ours_config["base_model_name_or_path"] == str(folder)

    def shapes(directory):
        from jaxtune.hf import read_safetensors

        return {name: (tensor.shape, tensor.dtype) for name, tensor in
                read_safetensors(directory / peft_io.ADAPTER_WEIGHTS)}

    # Same keys (incl. embed_tokens.lora_embedding_A without `.weight` and the tied head's
    # base_layer written under both names), same shapes and dtypes.
    assert shapes(ours) == shapes(tmp_path / "peft")


# --------------------------------------------------------------------------------------------
# peft's adapter -> jaxtune


@pytest.mark.parametrize("family,targets,rslora", [
    ("smollm2", list(ALL_TARGETS), True),  # tied head with its own adapter, embedding adapter
    ("qwen2", ["q_proj", "v_proj", "lm_head", "embed_tokens"], False),
    ("llama2", r"model\.layers\.\d+\.(self_attn\.(q|k)_proj|mlp\.down_proj)", False),  # a regex
    ("llama2", "all-linear", True),
])
def test_jaxtune_loads_an_adapter_saved_by_peft(tiny_models, tmp_path, family, targets, rslora):
    folder, _ = tiny_models(family)
    peft_model = peft_saved_adapter(folder, tmp_path / "peft", targets, rslora, alpha=16)
    model = api.load(str(folder), with_tokenizer=False)
    adapters, lora_cfg = peft_io.load_peft_adapter(tmp_path / "peft", model.cfg)
    assert lora_cfg.rank == 4 and lora_cfg.alpha == 16 and lora_cfg.rslora == rslora
    ours = jaxtune_adapter_logits(model, adapters, lora_cfg)
    assert np.abs(ours - api.logits(model, TOKENS)).max() > 1e-2
    np.testing.assert_allclose(ours, torch_logits(peft_model), atol=1e-4)


# --------------------------------------------------------------------------------------------
# Merged HF model


@pytest.mark.parametrize("family", ["smollm2", "qwen2"])
def test_merged_export_loads_in_transformers_with_the_same_logits(tiny_models, tmp_path, family):
    folder, _ = tiny_models(family)
    model = api.load(str(folder), with_tokenizer=False)
    lora_cfg = lora.lora_config(4, 8.0, 0.0, "all", rslora=family == "qwen2")
    cfg = model.cfg.replace(lora=lora_cfg)
    adapters = random_adapters(cfg, seed=3)
    ours = jaxtune_adapter_logits(model, adapters, lora_cfg)

    # A small shard limit forces several shards and the index.
    out = hf.save_merged_model(params_lib.merge_trees(model.params, adapters), cfg, tmp_path / "merged",
                                   source_folder=folder, max_shard_bytes=200_000)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["dtype"] == "float32"
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    merged_hf = fresh_hf_model(out)
    np.testing.assert_allclose(torch_logits(merged_hf), ours, atol=1e-4)

    if model.cfg.tie_word_embeddings:
        # peft's own merge keeps the head tied and cannot hold both merged matrices (peft #2777).
        adapter_dir = peft_io.save_peft_adapter(adapters, cfg, tmp_path / "adapter", str(folder))
        peft_model = peft.PeftModel.from_pretrained(fresh_hf_model(folder), str(adapter_dir))
        peft_merged = peft_model.merge_and_unload()
        assert np.abs(torch_logits(peft_merged) - ours).max() > 1e-2


VOCABULARY_TARGET_SETS = ["embed_tokens", "all-linear,embed_tokens", "lm_head", "embed_tokens,lm_head"]


@pytest.mark.parametrize("family", ["smollm2", "qwen2"])  # tied and untied heads
@pytest.mark.parametrize("targets", VOCABULARY_TARGET_SETS)
def test_merged_export_equals_the_peft_adapter_for_vocabulary_targets(tiny_models, tmp_path, family, targets):
    """A tied model with any vocabulary adapter is untied on merge: the head stays the base E (plus
    its own lm_head delta), the embedding becomes E + dE, as in training and in peft."""
    folder, _ = tiny_models(family)
    model = api.load(str(folder), with_tokenizer=False)
    lora_cfg = lora.lora_config(4, 8.0, 0.0, targets, rslora=False)
    cfg = model.cfg.replace(lora=lora_cfg)
    adapters = random_adapters(cfg, seed=11, scale=0.2)
    ours = jaxtune_adapter_logits(model, adapters, lora_cfg)
    assert np.abs(ours - api.logits(model, TOKENS)).max() > 1e-2  # the adapters matter

    adapter_dir = peft_io.save_peft_adapter(adapters, cfg, tmp_path / "adapter", str(folder))
    peft_logits = torch_logits(peft.PeftModel.from_pretrained(fresh_hf_model(folder), str(adapter_dir)).eval())
    np.testing.assert_allclose(peft_logits, ours, atol=1e-4)

    out = hf.save_merged_model(params_lib.merge_trees(model.params, adapters), cfg, tmp_path / "merged",
                                   source_folder=folder)
    merged = fresh_hf_model(out)
    np.testing.assert_allclose(torch_logits(merged), peft_logits, atol=1e-4)
    assert merged.config.tie_word_embeddings is False


def test_merged_export_of_linear_adapters_stays_tied_and_casts(tiny_models, tmp_path):
    folder, _ = tiny_models("smollm2")
    model = api.load(str(folder), with_tokenizer=False)
    lora_cfg = lora.lora_config(4, 8.0, 0.0, "all-linear", rslora=False)
    cfg = model.cfg.replace(lora=lora_cfg)
    adapters = random_adapters(cfg, seed=5)
    ours = jaxtune_adapter_logits(model, adapters, lora_cfg)
    params = params_lib.merge_trees(model.params, adapters)

    out = hf.save_merged_model(params, cfg, tmp_path / "f32", source_folder=folder)
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    np.testing.assert_allclose(torch_logits(fresh_hf_model(out)), ours, atol=1e-4)

    out16 = hf.save_merged_model(params, cfg, tmp_path / "bf16", source_folder=folder, dtype="bfloat16")
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(out16)
    assert next(hf16.parameters()).dtype == torch.bfloat16
    assert np.abs(torch_logits(hf16) - ours).max() < 0.1

    with pytest.raises(export.ExportError, match="not empty"):
        hf.save_merged_model(params, cfg, out, source_folder=folder)
    hf.save_merged_model(params, cfg, out, source_folder=folder, overwrite=True)
    with pytest.raises(export.ExportError, match="source model folder"):
        hf.save_merged_model(params, cfg, folder, source_folder=folder, overwrite=True)


# --------------------------------------------------------------------------------------------
# Extended vocabulary (new token rows)


@pytest.mark.parametrize("family", ["smollm2", "qwen2"])
def test_extended_vocabulary_travels_in_the_adapter(tiny_models, tmp_path, family):
    folder, _ = tiny_models(family)
    model = api.load(str(folder), with_tokenizer=False)
    new_rows = 8
    vocab = model.cfg.vocab_size + new_rows
    rng = np.random.default_rng(0)
    embedding = np.concatenate([np.asarray(model.params["model"]["embed_tokens"]["embedding"]),
                                0.02 * rng.standard_normal((new_rows, model.cfg.hidden_size), np.float32)])
    params = {**model.params, "model": {**model.params["model"], "embed_tokens": {"embedding": embedding}}}
    if not model.cfg.tie_word_embeddings:
        head = np.asarray(model.params["lm_head"]["kernel"])
        params["lm_head"] = {"kernel": np.concatenate(
            [head, 0.02 * rng.standard_normal((model.cfg.hidden_size, new_rows), np.float32)], axis=1)}
    big = api.LoadedModel(model.cfg.replace(vocab_size=vocab), params, None, folder)
    lora_cfg = lora.lora_config(4, 8.0, 0.0, "q,v,embed", rslora=False)
    cfg = big.cfg.replace(lora=lora_cfg)
    adapters = random_adapters(cfg, seed=7)
    tokens = np.array([[5, 9, vocab - 1, 200, vocab - 8, 3]], np.int32)
    ours = jaxtune_adapter_logits(big, adapters, lora_cfg, tokens)

    embedding_layers = {"model": {"embed_tokens": params["model"]["embed_tokens"]}}
    if "lm_head" in params:
        embedding_layers["lm_head"] = params["lm_head"]
    out = peft_io.save_peft_adapter(adapters, cfg, tmp_path / "adapter", str(folder), embedding_layers=embedding_layers)
    hf_model = fresh_hf_model(folder)
    hf_model.resize_token_embeddings(vocab)
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(out)).eval()
    np.testing.assert_allclose(torch_logits(peft_model, tokens), ours, atol=1e-4)

    with pytest.raises(export.ExportError, match=f"vocabulary of {vocab} tokens"):
        peft_io.load_peft_adapter(out, model.cfg)
    loaded, _ = peft_io.load_peft_adapter(out, big.cfg)
    embedding_rows = peft_io.load_peft_embedding_layers(out, big.cfg)
    rest = {"model": {k: v for k, v in model.params["model"].items() if k != "embed_tokens"}}
    back = api.LoadedModel(big.cfg, params_lib.merge_trees(rest, embedding_rows), None, folder)
    np.testing.assert_allclose(jaxtune_adapter_logits(back, loaded, lora_cfg, tokens), ours, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("change,named", [
    ({"use_dora": True, "target_modules": ["q_proj", "v_proj", "lm_head"]}, "use_dora=true on lm_head"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 32}}, "alpha_pattern"),
    ({"bias": "lora_only"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"layers_to_transform": [0, 1]}, "layers_to_transform"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"target_modules": r"model\.layers\.0\.self_attn\.q_proj"}, "only some layers"),
    ({"target_modules": ["c_attn"]}, "matches no module"),
])
def test_unsupported_adapter_features_are_refused_by_name(tiny_models, tmp_path, change, named):
    folder, _ = tiny_models("llama2")
    model = api.load(str(folder), with_tokenizer=False)
    cfg = model.cfg.replace(lora=lora.lora_config(4, 8, 0.0, "q,v", False))
    out = peft_io.save_peft_adapter(random_adapters(cfg), cfg, tmp_path / "adapter", str(folder))
    config_file = out / peft_io.ADAPTER_CONFIG
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    with pytest.raises(export.ExportError, match=named):
        peft_io.load_peft_adapter(out, model.cfg)


def test_mismatched_adapter_tensors_are_listed(tiny_models, tmp_path):
    folder, _ = tiny_models("llama2")
    model = api.load(str(folder), with_tokenizer=False)
    cfg = model.cfg.replace(lora=lora.lora_config(4, 8, 0.0, "q,v", False))
    out = peft_io.save_peft_adapter(random_adapters(cfg), cfg, tmp_path / "adapter", str(folder))
    config_file = out / peft_io.ADAPTER_CONFIG
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "target_modules": ["q_proj", "k_proj"]}))
    with pytest.raises(export.ExportError, match=r"missing \(6\).*k_proj.*\n.*unexpected \(6\).*v_proj"):
        peft_io.load_peft_adapter(out, model.cfg)


# --------------------------------------------------------------------------------------------
# Command line: a training run's workdir -> export


def with_tokenizer(folder, out):
    """A copy of a tiny model folder with a word-level tokenizer of its vocabulary."""
    import shutil

    import tokenizers

    shutil.copytree(folder, out)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(out)
    return out


def test_cli_exports_a_lora_run_as_peft_and_merged(tiny_models, tmp_path):
    folder = with_tokenizer(tiny_models("smollm2")[0], tmp_path / "base")
    model = api.load(str(folder), with_tokenizer=False)
    lora_cfg = lora.lora_config(4, 8.0, 0.05, "all", rslora=True)
    cfg = model.cfg.replace(lora=lora_cfg)
    best, last = random_adapters(cfg, seed=1), random_adapters(cfg, seed=2)
    write_run(tmp_path / "run", folder, lora_cfg, {10: (best, 1.5), 20: (last, 2.5)})

    assert export.main(["--workdir", str(tmp_path / "run"), "--format=peft", "--step=best"]) == 0
    adapter_dir = tmp_path / "run" / "exports" / "peft-step10"
    assert (adapter_dir / "tokenizer.json").exists()
    assert json.loads((adapter_dir / peft_io.ADAPTER_CONFIG).read_text())["lora_dropout"] == 0.05
    peft_model = peft.PeftModel.from_pretrained(fresh_hf_model(folder), str(adapter_dir)).eval()
    np.testing.assert_allclose(torch_logits(peft_model), jaxtune_adapter_logits(model, best, lora_cfg), atol=1e-4)

    assert export.main([f"--workdir={tmp_path / 'run'}", "--format=merged", f"--out={tmp_path / 'merged'}"]) == 0
    merged = fresh_hf_model(tmp_path / "merged")
    assert merged.config.tie_word_embeddings is False
    np.testing.assert_allclose(torch_logits(merged), jaxtune_adapter_logits(model, last, lora_cfg), atol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "merged").convert_tokens_to_ids("w7") == 7

    # Refusals: an unknown step, an existing output folder.
    with pytest.raises(export.ExportError, match="choose last, best or one of the saved steps 10, 20"):
        export.export_run(tmp_path / "run", "peft", step="15")
    assert export.main([f"--workdir={tmp_path / 'run'}", "--format=merged", f"--out={tmp_path / 'merged'}"]) == 2


@pytest.mark.parametrize("family", ["smollm2", "qwen2"])  # tied and untied heads
def test_peft_export_of_a_run_without_new_tokens_leaves_the_base_embedding_out(tiny_models, tmp_path, family):
    """embed_tokens / lm_head adapters without data.add_tokens: the adapter holds only LoRA tensors
    (peft's "auto" would add the whole base embedding) and peft loads it over the base model with
    jaxtune's logits; --save_embedding_layers writes the full matrices as peft does."""
    folder = tiny_models(family)[0]
    model = api.load(str(folder), with_tokenizer=False)
    lora_cfg = lora.lora_config(4, 8.0, 0.0, "all", rslora=False)
    cfg = model.cfg.replace(lora=lora_cfg)
    adapters = random_adapters(cfg, seed=6)
    write_run(tmp_path / "run", folder, lora_cfg, {4: (adapters, 1.0)})
    ours = jaxtune_adapter_logits(model, adapters, lora_cfg)

    lean = export.export_run(tmp_path / "run", "peft")
    assert adapter_tensor_names(lean) == {name for name, _, _ in peft_io.peft_tensor_names(cfg)}
    peft_model = peft.PeftModel.from_pretrained(fresh_hf_model(folder), str(lean)).eval()
    np.testing.assert_allclose(torch_logits(peft_model), ours, atol=1e-4)
    loaded, _ = peft_io.load_peft_adapter(lean, model.cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, adapters)

    forced = tmp_path / "forced"
    assert export.main([f"--workdir={tmp_path / 'run'}", "--format=peft", f"--out={forced}",
                        "--save_embedding_layers"]) == 0
    assert adapter_tensor_names(forced) - adapter_tensor_names(lean) == EMBEDDING_LAYER_KEYS
    peft_model = peft.PeftModel.from_pretrained(fresh_hf_model(folder), str(forced)).eval()
    np.testing.assert_allclose(torch_logits(peft_model), ours, atol=1e-4)
    with pytest.raises(export.ExportError, match="--save_embedding_layers applies to --format=peft"):
        export.export_run(tmp_path / "run", "merged", save_embedding_layers=True)


def test_peft_export_keeps_float32_adapters_unless_dtype_asks(tiny_models, tmp_path):
    """Adapters train in float32 whatever model.dtype: the PEFT export writes them so (as peft saves);
    --dtype=bfloat16 halves the file, and peft still loads it."""
    from safetensors import safe_open

    folder = tiny_models("smollm2")[0]
    model = api.load(str(folder), with_tokenizer=False)
    lora_cfg = lora.lora_config(4, 8.0, 0.0, "all-linear", rslora=False)
    adapters = random_adapters(model.cfg.replace(lora=lora_cfg), seed=8)
    write_run(tmp_path / "run", folder, lora_cfg, {3: (adapters, 1.0)}, {"model": {"dtype": "bfloat16"}})

    def tensor_dtypes(adapter_dir):
        with safe_open(str(adapter_dir / peft_io.ADAPTER_WEIGHTS), "np") as f:
            return {str(f.get_tensor(name).dtype) for name in f.keys()}

    assert tensor_dtypes(export.export_run(tmp_path / "run", "peft")) == {"float32"}
    half = export.export_run(tmp_path / "run", "peft", out=tmp_path / "bf16", dtype="bfloat16")
    with safe_open(str(half / peft_io.ADAPTER_WEIGHTS), "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}
    peft_model = peft.PeftModel.from_pretrained(fresh_hf_model(folder), str(half)).eval()
    np.testing.assert_allclose(torch_logits(peft_model), jaxtune_adapter_logits(model, adapters, lora_cfg), atol=2e-2)


def test_peft_export_writes_new_token_rows_when_the_table_kept_its_size(tiny_models, tmp_path):
    """data.add_tokens decides, not the table size: a model with spare rows (Qwen) gives new tokens
    rows it already had, and those trained rows must travel in the adapter."""
    folder = tiny_models("smollm2")[0]
    model = api.load(str(folder), with_tokenizer=False)
    lora_cfg = lora.lora_config(4, 8.0, 0.0, "q,v", rslora=False)
    cfg = model.cfg.replace(lora=lora_cfg)
    embedding = np.array(model.params["model"]["embed_tokens"]["embedding"])
    embedding[-2:] = 0.5 * np.random.default_rng(2).standard_normal((2, model.cfg.hidden_size))  # trained rows
    adapters = random_adapters(cfg, seed=8)
    trained = params_lib.merge_trees(adapters, {"model": {"embed_tokens": {"embedding": embedding}}})
    write_run(tmp_path / "run", folder, lora_cfg, {2: (trained, 1.0)})
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())
    run_config["data"]["add_tokens"] = "<tool>,</tool>"
    (tmp_path / "run" / "config.json").write_text(json.dumps(run_config))

    out = export.export_run(tmp_path / "run", "peft")
    # embed_tokens carries no adapter: peft's names without .base_layer (both, the model being tied)
    full_matrices = {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}
    assert full_matrices <= adapter_tensor_names(out)
    rest = {"model": {k: v for k, v in model.params["model"].items() if k != "embed_tokens"}}
    trained_model = api.LoadedModel(model.cfg, params_lib.merge_trees(rest, {"model": {"embed_tokens": {
        "embedding": embedding}}}), None, folder)
    tokens = np.array([[5, 254, 9, 255, 3]], np.int32)
    ours = jaxtune_adapter_logits(trained_model, adapters, lora_cfg, tokens)
    assert np.abs(ours - jaxtune_adapter_logits(model, adapters, lora_cfg, tokens)).max() > 1e-2  # the rows matter
    peft_model = peft.PeftModel.from_pretrained(fresh_hf_model(folder), str(out)).eval()
    np.testing.assert_allclose(torch_logits(peft_model, tokens), ours, atol=1e-4)


def test_cli_exports_a_full_finetuning_run_merged_and_refuses_peft(tiny_models, tmp_path, caplog):
    folder = tiny_models("qwen2")[0]
    model = api.load(str(folder), with_tokenizer=False)
    leaves, treedef = jax.tree_util.tree_flatten(model.params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    trained = jax.tree_util.tree_unflatten(treedef, [x + 0.01 * jax.random.normal(k, x.shape)
                                                     for k, x in zip(keys, leaves)])
    write_run(tmp_path / "run", folder, None, {5: (trained, 1.0)})

    assert export.main([f"--workdir={tmp_path / 'run'}", "--format=peft"]) == 2
    assert "full fine-tuning run" in caplog.text and "--format=merged" in caplog.text
    out = export.export_run(tmp_path / "run", "merged", dtype="float32")
    assert out == tmp_path / "run" / "exports" / "merged-step5"
    ours = api.logits(model, TOKENS, params=trained)
    assert np.abs(ours - api.logits(model, TOKENS)).max() > 1e-2
    np.testing.assert_allclose(torch_logits(fresh_hf_model(out)), ours, atol=1e-4)


def test_cli_exports_a_run_that_extended_the_vocabulary(tiny_models, tmp_path):
    folder = with_tokenizer(tiny_models("smollm2")[0], tmp_path / "base")
    model = api.load(str(folder), with_tokenizer=False)
    vocab = model.cfg.vocab_size + 2
    lora_cfg = lora.lora_config(4, 8.0, 0.0, "q,v,embed,head", rslora=False)
    cfg = model.cfg.replace(vocab_size=vocab, lora=lora_cfg)
    new_rows = 0.02 * np.random.default_rng(1).standard_normal((2, model.cfg.hidden_size), np.float32)
    embedding = np.concatenate([np.asarray(model.params["model"]["embed_tokens"]["embedding"]), new_rows])
    trained = params_lib.merge_trees(random_adapters(cfg, seed=9), {"model": {"embed_tokens": {"embedding": embedding}}})
    write_run(tmp_path / "run", folder, lora_cfg, {3: (trained, 1.0)})
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())
    run_config["data"]["add_tokens"] = "<tool>,</tool>"
    (tmp_path / "run" / "config.json").write_text(json.dumps(run_config))

    out = export.export_run(tmp_path / "run", "peft")
    assert EMBEDDING_LAYER_KEYS <= adapter_tensor_names(out)  # the new rows travel in the adapter
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids(["<tool>", "</tool>"]) == [vocab - 2, vocab - 1]
    base_rest = {"model": {k: v for k, v in model.params["model"].items() if k != "embed_tokens"}}
    big = api.LoadedModel(cfg.replace(lora=None), params_lib.merge_trees(base_rest, {"model": {"embed_tokens": {
        "embedding": embedding}}}), None, folder)
    tokens = np.array([[5, vocab - 2, 9, vocab - 1, 3]], np.int32)
    adapters, _ = lora.split_trainable(trained, full_finetune=False)
    ours = jaxtune_adapter_logits(big, adapters, lora_cfg, tokens)
    hf_model = fresh_hf_model(folder)
    hf_model.resize_token_embeddings(len(tokenizer))
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(out)).eval()
    np.testing.assert_allclose(torch_logits(peft_model, tokens), ours, atol=1e-4)

    merged = fresh_hf_model(export.export_run(tmp_path / "run", "merged"))
    assert merged.config.vocab_size == vocab
    np.testing.assert_allclose(torch_logits(merged, tokens), ours, atol=1e-4)
