"""Loading errors read well: missing / unexpected / mis-shaped tensors, unknown architectures, pickles."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxtune import api, hf


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_tensor_is_named(tiny_models, tmp_path):
    folder = copy_model(tiny_models("llama2")[0], tmp_path / "m")
    rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(hf.WeightsError) as e:
        api.load(str(folder), with_tokenizer=False)
    assert "missing (1): model.layers.N.mlp.up_proj.weight for layers [1]" in str(e.value)


def test_every_problem_is_listed_in_one_error(tiny_models, tmp_path):
    folder = copy_model(tiny_models("llama2")[0], tmp_path / "m")

    def edit(t):
        t.pop("model.norm.weight")
        t["model.layers.0.self_attn.q_proj.weight"] = np.zeros((64, 32), np.float32)
        t["model.layers.0.self_attn.extra.weight"] = np.zeros((2,), np.float32)

    rewrite_weights(folder, edit)
    with pytest.raises(hf.WeightsError) as e:
        api.load(str(folder), with_tokenizer=False)
    message = str(e.value)
    assert "missing (1): model.norm.weight" in message
    assert "unexpected (1): model.layers.0.self_attn.extra.weight" in message
    assert "wrong shape (1): model.layers.0.self_attn.q_proj.weight: file (64, 32), model expects (64, 64)" in message


def test_weights_of_another_config_are_refused(tiny_models, tmp_path):
    folder = copy_model(tiny_models("llama2")[0], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.WeightsError, match=r"for layers \[3\]"):
        api.load(str(folder), with_tokenizer=False)


def test_unknown_architecture(tiny_models, tmp_path):
    folder = copy_model(tiny_models("llama2")[0], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.ModelError, match="architecture 'GPT2LMHeadModel' is not supported; jaxtune ports"):
        hf.model_config_from_hf(folder)


def test_pickled_weights_are_refused_unless_allowed(tiny_models, tmp_path):
    import torch

    folder = copy_model(tiny_models("llama2")[0], tmp_path / "m")
    tensors = {k: torch.from_numpy(v.copy()) for k, v in load_file(folder / "model.safetensors").items()}
    torch.save(tensors, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(hf.WeightsError, match=r"pickled PyTorch weights .*--config.model.allow_pickle=True"):
        api.load(str(folder), with_tokenizer=False)
    reference = api.load(str(tiny_models("llama2")[0]), with_tokenizer=False)
    allowed = api.load(str(folder), with_tokenizer=False, allow_pickle=True)
    np.testing.assert_array_equal(allowed.params["model"]["norm"]["scale"], reference.params["model"]["norm"]["scale"])


def test_sharded_index_and_bfloat16_files_load(tiny_models, tmp_path):
    """A sharded checkpoint (index.json) in bfloat16 loads and casts to the param dtype."""
    import torch

    import copy

    bf16_model = copy.deepcopy(tiny_models("qwen2")[1]).to(torch.bfloat16)  # the fixture's model stays float32
    folder = tmp_path / "sharded"
    bf16_model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").exists()
    model = api.load(str(folder), with_tokenizer=False)
    expected = bf16_model.model.layers[2].mlp.down_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(model.params["model"]["layers"]["mlp"]["down_proj"]["kernel"][2]), expected)


def test_paths_that_are_not_models(tmp_path):
    with pytest.raises(hf.ModelError, match="has no config.json"):
        hf.resolve_model_dir(str(tmp_path))
    with pytest.raises(hf.ModelError, match="is not a folder"):
        hf.resolve_model_dir(str(tmp_path / "nope"))


def test_hub_ids_go_through_huggingface_hub(monkeypatch, tmp_path):
    """The real hub path: snapshot_download with safetensors-only patterns; offline errors read well."""
    import huggingface_hub

    calls = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert hf.resolve_model_dir("meta-llama/Llama-3.2-1B", revision="main") == tmp_path
    assert calls["repo_id"] == "meta-llama/Llama-3.2-1B" and "*.safetensors" in calls["allow_patterns"]
    assert not any(p.endswith(".bin") or p.endswith(".py") for p in calls["allow_patterns"])

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(hf.ModelError, match="could not fetch 'org/model'.*Offline"):
        hf.resolve_model_dir("org/model")
