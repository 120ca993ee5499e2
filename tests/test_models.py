"""Model ports against HF transformers' PyTorch models built from the same random weights."""

import numpy as np
import pytest
import torch

from conftest import FAMILIES
from jaxtune import api, hf
from jaxtune.api import pad_rows, positions_from_mask

ATOL = 1e-4


def hf_logits(model, tokens, mask):
    positions = positions_from_mask(mask)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def ragged_rows(seed, vocab, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("padding", ["right", "left"])
def test_logits_match_hf(tiny_models, family, padding):
    folder, torch_model = tiny_models(family)
    model = api.load(str(folder), with_tokenizer=False)
    rows = ragged_rows(1, 256, [12, 7, 1, 10])
    tokens, mask = pad_rows(rows, pad_id=0, left=padding == "left")
    ours = api.logits(model, tokens, attention_mask=mask)
    theirs = hf_logits(torch_model, tokens, mask)
    diff = np.abs(ours - theirs)[mask]
    assert diff.max() <= ATOL, f"{family} {padding}-padded: max |dlogit| {diff.max():.2e}"


def test_config_mapping_reads_family_options(tiny_models):
    cfg = hf.model_config_from_hf(tiny_models("qwen3")[0])
    assert cfg.qk_norm and cfg.head_dim == 24 and cfg.tie_word_embeddings and not cfg.qkv_bias
    cfg = hf.model_config_from_hf(tiny_models("qwen2")[0])
    assert cfg.qkv_bias and not cfg.o_bias and not cfg.tie_word_embeddings
    cfg = hf.model_config_from_hf(tiny_models("llama3.1")[0])
    assert dict(cfg.rope_scaling)["rope_type"] == "llama3" and cfg.rope_theta == 500000.0
    assert hf.model_config_from_hf(tiny_models("mistral")[0]).sliding_window == 5


def test_bfloat16_params_and_compute_stay_close(tiny_models):
    folder, torch_model = tiny_models("llama2")
    model = api.load(str(folder), param_dtype="bfloat16", compute_dtype="bfloat16", with_tokenizer=False)
    assert all(leaf.dtype == np.dtype("bfloat16") for leaf in __import__("jax").tree_util.tree_leaves(model.params))
    tokens, mask = pad_rows(ragged_rows(2, 256, [9, 9]))
    ours = api.logits(model, tokens, attention_mask=mask)
    theirs = hf_logits(torch_model, tokens, mask)
    assert np.abs(ours - theirs).max() < 0.1  # bf16 rounding, not a wrong mapping
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.8
