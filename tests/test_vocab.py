"""data.add_tokens: tokenizer extension, mean-initialised rows, only new rows train (LoRA), and the run's
checkpoint, tokenizer and PEFT / merged exports all carry the new vocabulary."""

import functools
import json

import jax
import numpy as np

from conftest import require_reference, tiny_config, write_jsonl
from jaxtune import api, config as config_lib, export, lora, optim, step, vocab
from jaxtune import params as params_lib
from jaxtune import state as state_lib

TOKENS = "<|extract|>,<|done|>"


def test_parse_tokens_strips_and_dedupes():
    assert vocab.parse_tokens(" <a>, <b>,,<a> ") == ("<a>", "<b>")
    assert vocab.parse_tokens("") == ()


def test_resize_rows_keeps_old_rows_and_sets_new_ones_to_the_mean():
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    grown = np.asarray(vocab.resize_rows(table, 6, (4, 5), base_rows=4))
    np.testing.assert_array_equal(grown[:4], table)
    np.testing.assert_allclose(grown[4:], np.broadcast_to(table.mean(0), (2, 3)))
    # a padded table (spare rows past the tokenizer) is cut to the tokenizer's length
    cut = np.asarray(vocab.resize_rows(table, 3, (2,), base_rows=2))
    np.testing.assert_array_equal(cut[:2], table[:2])
    np.testing.assert_allclose(cut[2], table[:2].mean(0))


def test_only_rows_zeroes_every_other_row_of_both_vocabulary_leaves():
    updates = {"model": {"embed_tokens": {"embedding": np.ones((5, 2), np.float32)}},
               "lm_head": {"kernel": np.ones((2, 5), np.float32), "lora_a": np.ones((2, 1), np.float32)}}
    out, _ = vocab.only_rows((3, 4), 5).update(updates, optax_empty_state())
    np.testing.assert_array_equal(out["model"]["embed_tokens"]["embedding"][:, 0], [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(out["lm_head"]["kernel"][0], [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(out["lm_head"]["lora_a"], updates["lm_head"]["lora_a"])


def optax_empty_state():
    import optax

    return optax.EmptyState()


def test_extend_tokenizer_skips_present_tokens(tiny_chat_model):
    tokenizer = api.load_tokenizer(tiny_chat_model)
    before = len(tokenizer)
    ext = vocab.extend_tokenizer(tokenizer, "<|im_end|>," + TOKENS, before)
    assert ext.added == ("<|extract|>", "<|done|>") and ext.new_ids == (before, before + 1)
    assert ext.new_size == len(tokenizer) == before + 2 and ext.base_rows == before
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("a<|done|>b"))[1] == "<|done|>"
    assert not vocab.extend_tokenizer(tokenizer, TOKENS, ext.new_size).changed


def test_lora_steps_train_only_the_new_rows_of_an_untied_model(tiny_models):
    model = api.load(str(tiny_models("qwen2")[0]), with_tokenizer=False)  # untied lm_head
    ext = vocab.VocabExtension(("<a>", "<b>"), (256, 257), 256, 258, 256)
    params = vocab.resize_params(model.params, ext)
    cfg = model.cfg.replace(vocab_size=258, lora=lora.lora_config(4, 8.0, 0.0, "q,v", False))
    params = params_lib.merge_trees(params, lora.init_adapters(cfg, jax.random.key(0)))
    trainable, frozen = lora.split_trainable(params, False, train_embeddings=True)
    assert set(trainable) == {"model", "lm_head"} and "kernel" in trainable["lm_head"]
    assert "embedding" in trainable["model"]["embed_tokens"]
    optim_cfg = config_lib.base_config().optim
    optim_cfg.lr, optim_cfg.warmup_steps, optim_cfg.weight_decay = 1e-2, 0, 0.1  # decay must not move old rows
    tx = vocab.train_new_rows(optim.optimizer(optim_cfg, 5, False, train_embeddings=True), ext)
    state = state_lib.init(trainable, tx, seed=0)
    before = jax.tree_util.tree_map(np.array, trainable)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 258, (4, 12)).astype(np.int32)
    tokens[:, 3], tokens[:, 7] = 256, 257
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": np.ones((4, 12), np.float32),
             "positions": np.tile(np.arange(12, dtype=np.int32), (4, 1)), "segment_ids": np.ones((4, 12), np.int32)}
    train_fn = jax.jit(functools.partial(step.train_step, cfg=cfg, tx=tx, grad_accum=1))
    for _ in range(2):
        state, _ = train_fn(state, frozen, batch)
    embedding, head = (np.asarray(state["params"]["model"]["embed_tokens"]["embedding"]),
                       np.asarray(state["params"]["lm_head"]["kernel"]))
    np.testing.assert_array_equal(embedding[:256], before["model"]["embed_tokens"]["embedding"][:256])
    np.testing.assert_array_equal(head[:, :256], before["lm_head"]["kernel"][:, :256])
    assert np.all(np.abs(embedding[256:] - before["model"]["embed_tokens"]["embedding"][256:]).max(1) > 0)
    assert np.all(np.abs(head[:, 256:] - before["lm_head"]["kernel"][:, 256:]).max(0) > 0)


def extraction_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    names = ["ada", "bob", "cy", "dee"]
    rows = []
    for _ in range(n):
        name = str(rng.choice(names))
        rows.append({"messages": [{"role": "user", "content": f"who is {name}?"},
                                  {"role": "assistant", "content": f"<|extract|>name={name}<|done|>"}]})
    return rows


def test_added_tokens_train_save_and_export_with_lora(tiny_chat_model, tmp_path):
    peft = require_reference("peft")
    torch = require_reference("torch")
    transformers = require_reference("transformers")
    from jaxtune import train

    config = tiny_config()
    config.model.path = str(tiny_chat_model)
    config.data.train = str(write_jsonl(tmp_path / "train.jsonl", extraction_rows(16)))
    config.data.add_tokens = TOKENS
    config.optim.lr, config.optim.warmup_steps = 1e-2, 0
    config.train.steps = 3
    result = train.run(config, tmp_path / "run")

    base = api.load(str(tiny_chat_model), with_tokenizer=False)
    vocab_size = base.cfg.vocab_size + 2
    assert result.cfg.vocab_size == vocab_size
    embedding = np.asarray(result.params["model"]["embed_tokens"]["embedding"])  # trained, saved with the adapter
    old = np.asarray(base.params["model"]["embed_tokens"]["embedding"])
    assert embedding.shape == (vocab_size, base.cfg.hidden_size)
    np.testing.assert_array_equal(embedding[:-2], old)
    assert np.abs(embedding[-2:] - old.mean(0)).max(1).min() > 0  # both new rows moved from the mean
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    assert len(tokenizer) == vocab_size
    assert tokenizer.convert_tokens_to_ids(["<|extract|>", "<|done|>"]) == [vocab_size - 2, vocab_size - 1]

    ids = tokenizer.encode("<|extract|>name=ada<|done|> who")
    tokens = np.array([ids], np.int32)
    big = api.LoadedModel(result.cfg.replace(lora=None), params_lib.merge_trees(result.frozen, result.params), None,
                          tiny_chat_model)
    adapters, _ = lora.split_trainable(result.params, full_finetune=False)
    ours = api.logits(big, tokens, lora=result.cfg.lora)
    assert ours.shape[-1] == vocab_size and adapters

    def torch_logits(model):
        with torch.no_grad():
            return model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()

    adapter_dir = export.export_run(tmp_path / "run", "peft")
    assert transformers.AutoTokenizer.from_pretrained(adapter_dir).convert_tokens_to_ids("<|done|>") == vocab_size - 1
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_chat_model, attn_implementation="eager").eval()
    hf_model.resize_token_embeddings(len(tokenizer))
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(adapter_dir)).eval()
    np.testing.assert_allclose(torch_logits(peft_model), ours, atol=1e-4)

    merged_dir = export.export_run(tmp_path / "run", "merged")
    assert json.loads((merged_dir / "config.json").read_text())["vocab_size"] == vocab_size
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="eager").eval()
    np.testing.assert_allclose(torch_logits(merged), ours, atol=1e-4)
