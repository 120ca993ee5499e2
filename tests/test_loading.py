"""jaxtune.loading: a base model, plus a PEFT adapter folder or a run's checkpoint, for inference; the
errors for folders that are neither."""

import json

import numpy as np
import pytest

from conftest import leaves_equal, random_adapters, write_run
from jaxtune import loading, lora
from jaxtune import params as params_lib
from jaxtune import peft as peft_io
from jaxtune.models.llama import abstract_params

LORA = lora.lora_config(4, 8.0, 0.0, "q_proj,v_proj,down_proj", rslora=False)


@pytest.fixture(scope="module")
def base(tiny_chat_model):
    """The tiny base model (real SmolLM2 tokenizer), loaded once."""
    return loading.load(str(tiny_chat_model))


def test_load_reads_config_params_and_tokenizer(tiny_chat_model, base):
    assert base.folder == tiny_chat_model and base.cfg.lora is None
    assert base.cfg.vocab_size == 49152 and base.cfg.num_layers == 3
    assert params_lib.shapes(base.params) == params_lib.shapes(abstract_params(base.cfg))
    assert base.tokenizer.eos_token == "<|im_end|>"
    without = loading.load(str(tiny_chat_model), param_dtype="bfloat16", with_tokenizer=False)
    assert without.tokenizer is None
    assert {str(x.dtype) for x in params_lib.flat(without.params).values()} == {"bfloat16"}


def test_a_peft_folder_loads_over_its_base_model(tiny_chat_model, base, tmp_path):
    cfg = base.cfg.replace(lora=LORA)
    adapters = random_adapters(cfg, seed=4)
    adapter_dir = peft_io.save_peft_adapter(adapters, cfg, tmp_path / "adapter", str(tiny_chat_model))
    info = loading.load_with_info(None, adapter_dir)  # the base model named in adapter_config.json
    assert info["adapter_kind"] == "peft" and info["step"] is None and info["model_path"] == str(tiny_chat_model)
    assert info["lora"] == LORA and info["model"].cfg.lora is None
    assert leaves_equal(info["params"], params_lib.merge_trees(base.params, adapters))


def test_a_run_workdir_loads_its_best_or_last_checkpoint(tiny_chat_model, base, tmp_path):
    cfg = base.cfg.replace(lora=LORA)
    best, last = random_adapters(cfg, seed=1), random_adapters(cfg, seed=2)
    run = write_run(tmp_path / "run", tiny_chat_model, LORA, {3: (best, 0.5), 6: (last, 0.9)})
    info = loading.load_with_info(None, run)
    assert (info["adapter_kind"], info["step"], info["lora"]) == ("workdir", 6, LORA)
    assert leaves_equal(info["params"], params_lib.merge_trees(base.params, last))
    model, params, lora_cfg = loading.load_for_inference(None, run, step="best")
    assert lora_cfg == LORA and leaves_equal(params, params_lib.merge_trees(base.params, best))
    assert leaves_equal(model.params, base.params)  # the returned model is the base


def test_a_run_that_added_tokens_extends_the_base_vocabulary(tiny_chat_model, base, tmp_path):
    vocab = base.cfg.vocab_size + 2
    cfg = base.cfg.replace(lora=LORA)
    embedding = np.concatenate([np.asarray(base.params["model"]["embed_tokens"]["embedding"]),
                                np.full((2, base.cfg.hidden_size), 0.25, np.float32)])
    trained = params_lib.merge_trees(random_adapters(cfg, seed=5), {"model": {"embed_tokens": {"embedding": embedding}}})
    run = write_run(tmp_path / "run", tiny_chat_model, LORA, {1: (trained, 1.0)},
                    {"data": {"add_tokens": "<tool>,</tool>"}})
    model, params, _ = loading.load_for_inference(None, run)
    assert model.cfg.vocab_size == vocab and len(model.tokenizer) == vocab
    assert model.tokenizer.convert_tokens_to_ids("<tool>") == vocab - 2
    np.testing.assert_array_equal(np.asarray(params["model"]["embed_tokens"]["embedding"]), embedding)


def test_extend_vocab_appends_the_trained_rows_and_head_columns():
    base = {"model": {"embed_tokens": {"embedding": np.zeros((3, 2), np.float32)}},
            "lm_head": {"kernel": np.zeros((2, 3), np.float32)}}
    trained = {"model": {"embed_tokens": {"embedding": np.arange(10, dtype=np.float32).reshape(5, 2)}},
               "lm_head": {"kernel": np.arange(10, dtype=np.float32).reshape(2, 5)}}
    out = loading.extend_vocab(base, trained, 5)
    np.testing.assert_array_equal(out["model"]["embed_tokens"]["embedding"][3:], [[6, 7], [8, 9]])
    np.testing.assert_array_equal(out["model"]["embed_tokens"]["embedding"][:3], 0)
    np.testing.assert_array_equal(out["lm_head"]["kernel"][:, 3:], [[3, 4], [8, 9]])
    assert base["model"]["embed_tokens"]["embedding"].shape == (3, 2)  # the base is not changed
    assert loading.extend_vocab(base, trained, 3)["lm_head"]["kernel"].shape == (2, 3)


def test_folders_that_are_neither_a_run_nor_an_adapter_are_refused(tmp_path):
    with pytest.raises(loading.InferenceError, match="neither a jaxtune workdir .* nor a PEFT adapter"):
        loading.adapter_kind(tmp_path)
    with pytest.raises(loading.InferenceError, match="give --model"):
        loading.base_model_path(None, None)
    (tmp_path / peft_io.ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(loading.InferenceError, match="names no base_model_name_or_path: give --model"):
        loading.base_model_path(None, tmp_path)
    with pytest.raises(loading.InferenceError, match="dtype 'float8'"):
        loading.load_with_info("unused", None, dtype="float8")
