"""Train step: frozen weights untouched, only adapter buffers compiled, exact gradient accumulation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import api, config as config_lib, lora, optim, step
from jaxtune import params as params_lib
from jaxtune import state as state_lib


def synthetic_batch(batch_size, seq_len, vocab, seed=0):
    """Right-padded rows of random lengths with a loss on the second half of each row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(batch_size, seq_len)).astype(np.int32)
    lengths = rng.integers(seq_len // 2, seq_len + 1, size=batch_size)
    segments = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
    targets = np.concatenate([tokens[:, 1:], np.zeros((batch_size, 1), np.int32)], axis=1)
    loss_mask = ((np.arange(seq_len)[None] >= seq_len // 4) & (np.arange(seq_len)[None] < lengths[:, None] - 1))
    return {"tokens": tokens * segments, "targets": targets * segments, "positions": np.arange(seq_len)[None].repeat(batch_size, 0).astype(np.int32) * segments,
            "segment_ids": segments, "loss_mask": loss_mask.astype(np.float32)}


def setup(tiny_models, full_finetune, grad_accum=1, family="smollm2", targets="all", dropout=0.0, dtype="float32",
          lr=1e-2):
    """(model, cfg, state, frozen, jitted train step, optimizer); `dtype` is model.dtype and compute_dtype."""
    model = api.load(str(tiny_models(family)[0]), param_dtype=dtype, compute_dtype=dtype, with_tokenizer=False)
    optim_cfg = config_lib.base_config().optim
    optim_cfg.lr, optim_cfg.warmup_steps = lr, 0
    cfg = model.cfg
    params = model.params
    if not full_finetune:
        cfg = cfg.replace(lora=lora.lora_config(4, 8.0, dropout, targets, False))
        params = params_lib.merge_trees(params, lora.init_adapters(cfg, jax.random.key(0)))
    trainable, frozen = lora.split_trainable(params, full_finetune)
    tx = optim.optimizer(optim_cfg, 10, full_finetune)
    state = state_lib.init(trainable, tx, seed=0)
    train_fn = jax.jit(functools.partial(step.train_step, cfg=cfg, tx=tx, grad_accum=grad_accum))
    return model, cfg, state, frozen, train_fn, tx


def test_lora_steps_leave_frozen_weights_bit_identical(tiny_models):
    model, cfg, state, frozen, train_fn, _ = setup(tiny_models, full_finetune=False)
    before = jax.tree_util.tree_map(np.array, frozen)
    adapters_before = jax.tree_util.tree_map(np.array, state["params"])
    for i in range(3):
        state, metrics = train_fn(state, frozen, synthetic_batch(4, 16, 256, seed=i))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree_util.tree_leaves(frozen)):
        assert np.array_equal(a, np.asarray(b)), path
    changed = [not np.array_equal(a, np.asarray(b)) for a, b in
               zip(jax.tree_util.tree_leaves(adapters_before), jax.tree_util.tree_leaves(state["params"]))]
    assert all(changed), "every adapter leaf must train"
    assert int(state["step"]) == 3 and np.isfinite(float(metrics["loss"]))


def test_full_finetuning_changes_every_weight(tiny_models):
    model, cfg, state, frozen, train_fn, _ = setup(tiny_models, full_finetune=True)
    assert frozen == {}
    before = jax.tree_util.tree_map(np.array, state["params"])
    state, _ = train_fn(state, frozen, synthetic_batch(4, 16, 256))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree_util.tree_leaves(state["params"])):
        assert not np.array_equal(a, np.asarray(b)), f"{path} did not change"


@pytest.mark.parametrize("full_finetune", [False, True])
def test_accumulated_micro_batches_equal_one_big_batch(tiny_models, full_finetune):
    """With SGD(lr=1) the update IS the gradient: compare it exactly (Adam's first step is ~sign(g))."""
    import optax

    batch = synthetic_batch(8, 16, 256, seed=3)
    _, cfg, state, frozen, _, _ = setup(tiny_models, full_finetune)
    sgd = optax.sgd(1.0)
    state = state_lib.init(state["params"], sgd, seed=0)
    results = {}
    for accum in (1, 4):
        fn = jax.jit(functools.partial(step.train_step, cfg=cfg, tx=sgd, grad_accum=accum))
        results[accum] = fn(state, frozen, batch)
    (new1, m1), (new4, m4) = results[1], results[4]
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-6)
    assert float(m1["target_tokens"]) == float(m4["target_tokens"]) == batch["loss_mask"].sum()
    for p0, a, b in zip(jax.tree_util.tree_leaves(state["params"]), jax.tree_util.tree_leaves(new1["params"]),
                        jax.tree_util.tree_leaves(new4["params"])):
        grad1, grad4 = np.asarray(p0) - np.asarray(a), np.asarray(p0) - np.asarray(b)
        np.testing.assert_allclose(grad4, grad1, rtol=1e-4, atol=1e-5 * np.abs(grad1).max())  # float32 summation order


def test_loss_is_normalised_by_target_tokens_of_the_whole_batch(tiny_models):
    """Rows with many targets weigh more than rows with few: mean over tokens, not over rows."""
    model, cfg, state, frozen, _, _ = setup(tiny_models, full_finetune=False)
    batch = synthetic_batch(4, 16, 256, seed=5)
    s, n = step.eval_step(state["params"], frozen, batch, cfg=cfg)
    logits = api.logits(model, batch["tokens"], attention_mask=batch["segment_ids"] > 0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], axis=-1)[..., 0]
    expected = (ce * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    np.testing.assert_allclose(float(s) / float(n), expected, rtol=1e-5)


def test_compiled_lora_step_holds_no_gradient_or_optimizer_buffers_for_frozen_weights(tiny_models):
    batch = synthetic_batch(4, 16, 256)
    memory = {}
    for full in (False, True):
        model, cfg, state, frozen, _, tx = setup(tiny_models, full_finetune=full, targets="q,v")
        fn = jax.jit(functools.partial(step.train_step, cfg=cfg, tx=tx, grad_accum=1), donate_argnums=0)
        analysis = fn.lower(state, frozen, batch).compile().memory_analysis()
        memory[full] = analysis
        opt_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state["opt_state"]))
        param_bytes = params_lib.count_params(model.params) * 4
        if not full:
            # Adam moments exist for the adapters only: a tiny fraction of the base weights.
            assert opt_bytes < 0.1 * param_bytes
        else:
            assert opt_bytes >= 2 * param_bytes
    # The full step's outputs hold new params + 2 moments for every weight; the LoRA step's outputs
    # (new state) are only the adapters and their moments, and its temporaries hold no weight-sized
    # gradient tree.
    assert memory[False].output_size_in_bytes < 0.1 * memory[True].output_size_in_bytes
    assert memory[False].temp_size_in_bytes < memory[True].temp_size_in_bytes


def test_optimizer_labels_come_from_the_trainable_predicate(tiny_models):
    model = api.load(str(tiny_models("qwen2")[0]), with_tokenizer=False)
    labels = optim.labels(model.params, full_finetune=False)
    assert set(jax.tree_util.tree_leaves(labels)) == {"frozen"}
    labels = optim.labels(model.params, full_finetune=True)
    assert labels["model"]["layers"]["self_attn"]["q_proj"]["kernel"] == "decay"
    assert labels["model"]["layers"]["self_attn"]["q_proj"]["bias"] == "no_decay"
    assert labels["model"]["norm"]["scale"] == "no_decay"


# ============================================================================================
# bfloat16 base weights: trained leaves stay float32, so updates of ~lr are not rounded away


def float_dtypes(tree) -> set[str]:
    return {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}


def moved_fraction(before, after, leaf_name: str) -> float:
    """Share of the entries of every `leaf_name` leaf that differ between two trees."""
    moved = total = 0
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree_util.tree_leaves(after)):
        if params_lib.path_of(path)[-1] == leaf_name:
            moved += int(np.sum(np.asarray(a) != np.asarray(b)))
            total += a.size
    assert total, f"no {leaf_name} leaves"
    return moved / total


def train_a_few_steps(tiny_models, full_finetune, dtype, lr, steps=6):
    """(initial trainable params, final state, frozen, per-step losses) of `steps` steps on two
    alternating batches, with model.dtype = compute_dtype = `dtype`."""
    _, _, state, frozen, train_fn, _ = setup(tiny_models, full_finetune, targets="all-linear", dtype=dtype, lr=lr)
    initial = jax.tree_util.tree_map(np.array, state["params"])
    losses = []
    for i in range(steps):
        state, metrics = train_fn(state, frozen, synthetic_batch(4, 16, 256, seed=i % 2))
        losses.append(float(metrics["loss"]))
    return initial, state, frozen, losses


def test_bfloat16_base_trains_float32_adapters_whose_small_updates_land(tiny_models):
    """At lr 1e-5 Adam moves each adapter entry by ~1e-5: far below bfloat16's resolution (2^-8
    relative), so bfloat16 adapters kept ~2% of their updates. Adapters (and so their gradients and
    Adam moments) are float32 over the bfloat16 base, whose leaves stay bfloat16."""
    initial, state, frozen, _ = train_a_few_steps(tiny_models, False, "bfloat16", lr=1e-5)
    assert float_dtypes(frozen) == {"bfloat16"}
    assert float_dtypes(state["params"]) == float_dtypes(state["opt_state"]) == {"float32"}
    # Step 1 moves lora_b off zero; from step 2 on every lora_a entry has a gradient.
    assert moved_fraction(initial, state["params"], "lora_a") >= 0.95
    assert moved_fraction(initial, state["params"], "lora_b") >= 0.95


def test_bfloat16_lora_loss_tracks_the_float32_run(tiny_models):
    """Same steps at lr 1e-3 (the loss of the repeated batches falls by ~0.06): bfloat16 base and
    compute follow the float32 run within bfloat16 rounding (measured < 0.001; bfloat16 adapters: 0.008)."""
    losses = {dtype: train_a_few_steps(tiny_models, False, dtype, lr=1e-3)[3] for dtype in ("float32", "bfloat16")}
    assert losses["float32"][-2] < losses["float32"][0] - 0.03  # the comparison is not of two flat lines
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], atol=0.005)


# ============================================================================================
# LoRA dropout in training


def test_training_dropout_is_reproducible_for_a_seed_and_acts(tiny_models):
    """Two runs with dropout 0.5 and the same seed are bit-identical; another seed or dropout 0 differ."""
    def adapters_after_two_steps(dropout, seed=0):
        _, _, state, frozen, train_fn, tx = setup(tiny_models, False, targets="all-linear", dropout=dropout)
        state = state_lib.init(state["params"], tx, seed=seed)  # the rng of the dropout masks
        for i in range(2):
            state, _ = train_fn(state, frozen, synthetic_batch(4, 16, 256, seed=i))
        return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(state["params"])]

    first = adapters_after_two_steps(0.5)
    for a, b in zip(first, adapters_after_two_steps(0.5)):
        np.testing.assert_array_equal(a, b)
    for other in (adapters_after_two_steps(0.5, seed=1), adapters_after_two_steps(0.0)):
        assert all(not np.array_equal(a, b) for a, b in zip(first, other))
