"""jaxtune.api, the one-call Python API: load, logits (ragged rows, masks, adapter overrides),
generate_text, checked against HF transformers' PyTorch models on the same weights."""

import numpy as np
import pytest
import torch

from conftest import random_adapters
from jaxtune import api, generate, lora
from jaxtune import params as params_lib

ATOL = 1e-4


def test_pad_rows_and_positions():
    tokens, mask = api.pad_rows([[5, 6, 7], [8]], pad_id=0)
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [8, 0, 0]])
    np.testing.assert_array_equal(mask, [[True, True, True], [True, False, False]])
    tokens, mask = api.pad_rows([[5, 6, 7], [8]], pad_id=9, left=True)
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [9, 9, 8]])
    np.testing.assert_array_equal(api.positions_from_mask(mask), [[0, 1, 2], [0, 0, 0]])
    np.testing.assert_array_equal(api.positions_from_mask(np.array([[False, True, True, True]])), [[0, 0, 1, 2]])


def test_logits_of_ragged_rows_match_hf_row_by_row(tiny_models):
    folder, torch_model = tiny_models("llama2")
    model = api.load(str(folder), with_tokenizer=False)
    rows = [[3, 17, 42, 9, 100], [7, 8]]
    ours = api.logits(model, rows)
    assert ours.shape == (2, 5, 256) and ours.dtype == np.float32
    for i, row in enumerate(rows):
        with torch.no_grad():
            theirs = torch_model(input_ids=torch.tensor([row])).logits[0].numpy()
        np.testing.assert_allclose(ours[i, :len(row)], theirs, atol=ATOL)
    # The same rows as a left-padded array with a mask give the same logits at real tokens.
    tokens, mask = api.pad_rows(rows, left=True)
    left = api.logits(model, tokens, attention_mask=mask)
    np.testing.assert_allclose(left[1, -2:], ours[1, :2], atol=ATOL)


def test_logits_take_params_and_lora_overrides(tiny_models):
    folder, _ = tiny_models("llama2")
    model = api.load(str(folder), with_tokenizer=False)
    lora_cfg = lora.lora_config(4, 8.0, 0.0, "q,v", rslora=False)
    adapters = random_adapters(model.cfg.replace(lora=lora_cfg), seed=2, scale=0.3)
    with_adapters = api.logits(model, [[1, 2, 3]], params=params_lib.merge_trees(model.params, adapters),
                               lora=lora_cfg)
    merged, merged_cfg = lora.merge_adapters(params_lib.merge_trees(model.params, adapters),
                                             model.cfg.replace(lora=lora_cfg))
    np.testing.assert_allclose(with_adapters, api.logits(api.LoadedModel(merged_cfg, merged, None, folder), [[1, 2, 3]]),
                               atol=ATOL)
    assert np.abs(with_adapters - api.logits(model, [[1, 2, 3]])).max() > 1e-3  # the adapters do change them


def test_generate_text_is_hf_greedy(tiny_chat_model):
    import transformers

    model = api.load(str(tiny_chat_model))
    prompt = "The sea is"
    [text] = api.generate_text(model, [prompt], max_new_tokens=6, template="none")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval()
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()
    eos = generate.default_eos_ids(model)
    stop = next((i for i, token in enumerate(out) if token in eos), len(out))
    assert text == model.tokenizer.decode(out[:stop], skip_special_tokens=True)


def test_generate_text_needs_the_tokenizer(tiny_models):
    model = api.load(str(tiny_models("llama2")[0]), with_tokenizer=False)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        api.generate_text(model, ["hi"], max_new_tokens=2)
