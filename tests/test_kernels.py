"""Hand-written gradients (jaxtune.models.kernels) and the chunked loss (jaxtune.step) against
jax.grad of the plain math they replace: float32 round-off only."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals

from jaxtune import lora, step
from jaxtune import params as params_lib
from jaxtune.models import llama
from jaxtune.models.kernels import (HeadSpec, dense, gated_lora_dense, head_cross_entropy_sum, lora_dense,
                                    shared_input_lora_dense, silu_gate)

B, T, D, O, R = 2, 5, 12, 7, 3
SCALING = 2.5
KEEP = 0.8


def arrays(seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 6)
    return {"x": jax.random.normal(keys[0], (B, T, D), dtype),
            "kernel": jax.random.normal(keys[1], (D, O), dtype) * 0.3,
            "bias": jax.random.normal(keys[2], (O,), dtype),
            "a": jax.random.normal(keys[3], (D, R), jnp.float32) * 0.3,
            "b": jax.random.normal(keys[4], (R, O), jnp.float32) * 0.3,
            "keep": jax.random.bernoulli(keys[5], KEEP, (B, T, D))}


def dropped(x, keep, keep_prob=KEEP):  # flax nn.Dropout's arithmetic
    return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))


def plain(x, kernel, bias, a, b, keep, dtype):
    """The math lora_dense replaces, on 3-D inputs, as Linear computed it before."""
    xd = x if keep is None else dropped(x, keep)
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype)) if kernel is not None else 0.0
    if bias is not None:
        y = y + bias.astype(dtype)
    return y + (xd.astype(dtype) @ a.astype(dtype)) @ b.astype(dtype) * SCALING


def fast(x, kernel, bias, a, b, keep, dtype):
    xd = None if keep is None else dropped(x, keep)
    return lora_dense(x, kernel, bias, a, b, xd, scaling=SCALING, dtype=dtype)


def value_and_grads(fn, p, with_kernel, with_bias, with_dropout, dtype):
    keep = p["keep"] if with_dropout else None
    cotangent = jax.random.normal(jax.random.key(9), (B, T, O), jnp.float32).astype(dtype)

    def f(x, kernel, bias, a, b):
        return fn(x, kernel, bias, a, b, keep, dtype)

    @jax.jit
    def y_and_cotangents(*inputs):
        y, vjp = jax.vjp(f, *inputs)
        return y, vjp(cotangent)

    return y_and_cotangents(p["x"], p["kernel"] if with_kernel else None, p["bias"] if with_bias else None,
                            p["a"], p["b"])


def assert_close(actual, expected, rtol):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    scale = np.max(np.abs(expected)) + 1e-30
    assert np.max(np.abs(actual - expected)) / scale < rtol


@pytest.mark.parametrize("with_kernel,with_bias", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("with_dropout", [False, True])
def test_lora_dense_gradients_equal_autodiff_of_the_plain_math(with_kernel, with_bias, with_dropout):
    p = arrays()
    y_fast, grads_fast = value_and_grads(fast, p, with_kernel, with_bias, with_dropout, jnp.float32)
    y_ref, grads_ref = value_and_grads(plain, p, with_kernel, with_bias, with_dropout, jnp.float32)
    assert_close(y_fast, y_ref, 1e-6)
    for name, g_fast, g_ref in zip(("x", "kernel", "bias", "a", "b"), grads_fast, grads_ref):
        if g_ref is None:
            assert g_fast is None, name
        else:
            assert_close(g_fast, g_ref, 1e-5)
    if not with_dropout:  # the adapter reads x itself: its gradient reaches x
        assert float(jnp.abs(grads_fast[0]).max()) > 0


def test_lora_dense_bf16_compute_with_f32_adapters_returns_each_cotangent_in_its_own_dtype():
    p = arrays(dtype=jnp.bfloat16)
    assert p["a"].dtype == jnp.float32 and p["x"].dtype == jnp.bfloat16
    y_fast, grads_fast = value_and_grads(fast, p, True, True, True, jnp.bfloat16)
    y_ref, grads_ref = value_and_grads(plain, p, True, True, True, jnp.bfloat16)
    assert y_fast.dtype == jnp.bfloat16
    assert [g.dtype for g in grads_fast] == [jnp.bfloat16, jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.float32]
    assert_close(y_fast, y_ref, 1e-2)
    for g_fast, g_ref in zip(grads_fast, grads_ref):
        assert_close(g_fast, g_ref, 2e-2)  # bf16 round-off; both compute in bf16


def test_dense_equals_the_3d_dot_and_its_gradients():
    p = arrays()

    def ref(x, kernel, bias):
        return jnp.dot(x, kernel) + bias

    def new(x, kernel, bias):
        return dense(x, kernel, bias, dtype=jnp.float32)

    cot = jax.random.normal(jax.random.key(3), (B, T, O))
    for (y1, g1), (y2, g2) in [(jax.vjp(new, p["x"], p["kernel"], p["bias"])[0:2],
                                jax.vjp(ref, p["x"], p["kernel"], p["bias"])[0:2])]:
        assert_close(y1, y2, 1e-6)
        for a, b in zip(g1(cot), g2(cot)):
            assert_close(a, b, 1e-5)


# --------------------------------------------------------------------------------------------
# The modules and the chunked loss on a tiny model


def tiny_config(tied: bool, targets=llama.ALL_TARGETS, dropout=0.0):
    return llama.ModelConfig(vocab_size=97, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=4, tie_word_embeddings=tied, qkv_bias=True,
                             lora=llama.LoRAConfig(rank=2, alpha=4.0, dropout=dropout, targets=tuple(targets)))


def random_params(cfg, seed=0):
    """Init params with every adapter b random too (PEFT inits b to zero: no gradient to a then)."""
    tokens = jnp.zeros((1, 3), jnp.int32)
    params = llama.Llama(cfg).init(jax.random.key(seed), tokens, tokens, tokens + 1)["params"]
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [leaf + 0.1 * jax.random.normal(k, leaf.shape)
                                                  for leaf, k in zip(leaves, keys)])


def tiny_batch(cfg, batch=3, length=11, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (batch, length + 1)).astype(np.int32)
    mask = (rng.random((batch, length)) < 0.7).astype(np.float32)
    segments = np.ones((batch, length), np.int32)
    segments[0, 6:] = 2  # a packed row
    segments[1, 9:] = 0  # padding
    mask[1, 9:] = 0
    positions = np.where(segments[0] == 2, np.arange(length) - 6, np.arange(length))
    positions = np.stack([positions] + [np.arange(length)] * (batch - 1)).astype(np.int32)
    return {"tokens": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "loss_mask": jnp.asarray(mask), "positions": jnp.asarray(positions),
            "segment_ids": jnp.asarray(segments)}


def unchunked_loss(params, cfg, batch):
    """The loss as it was: full [B, T, V] logits from Llama.__call__, then CE."""
    logits, _ = llama.Llama(cfg).apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(ce * batch["loss_mask"])


# 2 positions of [3, 97] logits per chunk: 6 chunks of 11 positions padded to 12; 10**9: one chunk.
@pytest.mark.parametrize("tied,chunk_logits,full_finetune", [
    (True, 2 * 3 * 97, False), (False, 2 * 3 * 97, True), (True, 10**9, True), (False, 10**9, False)])
def test_chunked_loss_equals_the_unchunked_loss_and_gradient(monkeypatch, tied, chunk_logits, full_finetune):
    """Every adapter kind (7 linears with q/k/v bias, embedding, lm_head tied or not) and, in full
    fine-tuning, every kernel's cotangent through the hand-written VJP too."""
    cfg = tiny_config(tied)
    trainable, frozen = lora.split_trainable(random_params(cfg), full_finetune=full_finetune)
    batch = tiny_batch(cfg)
    monkeypatch.setattr(step, "LOSS_CHUNK_LOGITS", chunk_logits)

    def chunked(trainable):
        return step.summed_loss(trainable, frozen, batch, cfg, jax.random.key(0), True)[0]

    loss, grads = jax.jit(jax.value_and_grad(chunked))(trainable)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(
        lambda tr: unchunked_loss(params_lib.merge_trees(tr, frozen), cfg, batch)))(trainable)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(ref_grads)
    for g, g_ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        assert_close(g, g_ref, 1e-5)
    assert float(jnp.abs(grads["lm_head"]["lora_a"]).max()) > 0  # the head's adapter is trained
    assert jax.jit(step.summed_loss, static_argnums=(3, 5))(
        trainable, frozen, batch, cfg, jax.random.key(0), True)[1] == batch["loss_mask"].sum()


def test_embedding_adapter_gradients_equal_autodiff_of_the_3d_math():
    cfg = tiny_config(tied=True)
    embed = llama.Embed(cfg.vocab_size, cfg.hidden_size, cfg.lora, jnp.float32, jnp.float32)
    tokens = tiny_batch(cfg)["tokens"]
    params = random_params_of(embed, tokens)
    cot = jax.random.normal(jax.random.key(4), (*tokens.shape, cfg.hidden_size))

    def plain_embed(p):
        return p["embedding"][tokens] + (p["lora_a"][tokens] @ p["lora_b"]) * cfg.lora.scaling

    y, vjp = jax.vjp(lambda p: embed.apply({"params": p}, tokens), params)
    y_ref, vjp_ref = jax.vjp(plain_embed, params)
    assert_close(y, y_ref, 1e-6)
    for g, g_ref in zip(jax.tree_util.tree_leaves(vjp(cot)), jax.tree_util.tree_leaves(vjp_ref(cot))):
        assert_close(g, g_ref, 1e-5)


def random_params_of(module, *inputs):
    """`module`'s init params, each leaf moved by 0.3 N(0, 1) (so every adapter b is non-zero)."""
    params = module.init(jax.random.key(0), *inputs)["params"]
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [leaf + 0.3 * jax.random.normal(k, leaf.shape)
                                                  for leaf, k in zip(leaves, keys)])


def head_case(seed, V, with_adapter, with_dropout, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return {"h": normal(B, T, D).astype(dtype), "keep": jnp.asarray(rng.random((B, T, D)) < KEEP) if with_dropout else None,
            "w_DxV": normal(D, V).astype(dtype), "a": normal(D, R) if with_adapter else None,
            "b": normal(R, V) if with_adapter else None, "targets": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
            "mask": jnp.asarray(rng.random((B, T)) < 0.6, jnp.float32)}


def plain_head_ce(h, kernel, a, b, keep, targets, mask, tied, dtype):
    """The math the fused head replaces: full logits, optax's CE, masked sum."""
    w = (kernel.T if tied else kernel).astype(dtype)
    logits = jnp.dot(h.astype(dtype), w)
    if a is not None:
        hd = h if keep is None else dropped(h, keep)
        logits = logits + (hd.astype(dtype) @ a.astype(dtype)) @ b.astype(dtype) * SCALING
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(ce * mask)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("with_adapter,with_dropout", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("chunk", [2, T])
def test_fused_head_cross_entropy_gradients_equal_autodiff_of_the_plain_math(tied, with_adapter, with_dropout, chunk):
    """Tied ([V, D] embedding) and untied ([D, V]) heads, with a LoRA adapter (dropped input or not),
    chunked (T=5 in chunks of 2: padded) or not: loss and the gradients of h, kernel, a, b."""
    V = 13
    p = head_case(0, V, with_adapter, with_dropout)
    kernel = p["w_DxV"].T if tied else p["w_DxV"]
    spec = HeadSpec(tied, SCALING, jnp.float32)
    keep = p["keep"]

    def fused(h, kernel, a, b):
        hd = None if keep is None else dropped(h, keep)
        return head_cross_entropy_sum(h, hd, kernel, a, b, p["targets"], p["mask"], spec=spec, chunk=chunk)

    def reference(h, kernel, a, b):
        return plain_head_ce(h, kernel, a, b, keep, p["targets"], p["mask"], tied, jnp.float32)

    argnums = (0, 1, 2, 3) if with_adapter else (0, 1)
    value, grads = jax.jit(jax.value_and_grad(fused, argnums=argnums))(p["h"], kernel, p["a"], p["b"])
    ref_value, ref_grads = jax.jit(jax.value_and_grad(reference, argnums=argnums))(p["h"], kernel, p["a"], p["b"])
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(fused)(p["h"], kernel, p["a"], p["b"]), ref_value, rtol=1e-6)
    for g, g_ref in zip(grads, ref_grads):
        assert_close(g, g_ref, 1e-5)
    # Only the differentiated inputs: h alone (a LoRA step's frozen kernel), scaled by a cotangent.
    g_h = jax.jit(jax.grad(lambda h: 3.0 * fused(h, kernel, p["a"], p["b"])))(p["h"])
    assert_close(g_h, 3.0 * ref_grads[0], 1e-5)


def test_fused_head_cross_entropy_bf16_compute_returns_each_gradient_in_its_own_dtype():
    V = 13
    p = head_case(1, V, True, True, dtype=jnp.bfloat16)
    spec = HeadSpec(False, SCALING, jnp.bfloat16)

    def fused(h, kernel, a, b):
        return head_cross_entropy_sum(h, dropped(h, p["keep"]), kernel, a, b, p["targets"], p["mask"], spec=spec,
                                      chunk=2)

    def reference(h, kernel, a, b):
        return plain_head_ce(h, kernel, a, b, p["keep"], p["targets"], p["mask"], False, jnp.bfloat16)

    args = (p["h"], p["w_DxV"], p["a"], p["b"])
    value, grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2, 3)))(*args)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2, 3)))(*args)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.float32]
    np.testing.assert_allclose(value, ref_value, rtol=1e-2)
    for g, g_ref in zip(grads, ref_grads):
        assert_close(g, g_ref, 3e-2)  # bf16 round-off; both compute the head in bf16


def dot_output_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Output shapes of every dot_general in a jaxpr, inside scan/jit/custom-rule bodies too."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (tuple, list)) else [param]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += dot_output_shapes(inner)
    return shapes


@pytest.mark.parametrize("full_finetune", [False, True])
def test_the_head_kernel_gradient_is_formed_only_when_the_kernel_trains(full_finetune):
    """The fused head forms the gradients of differentiated inputs only: a LoRA step (frozen tied
    embedding) has no [V, D] gradient dot; full fine-tuning has it."""
    cfg = tiny_config(tied=True, targets=("q_proj", "v_proj"))
    trainable, frozen = lora.split_trainable(random_params(cfg), full_finetune=full_finetune)
    batch = tiny_batch(cfg)
    jaxpr = jax.make_jaxpr(jax.grad(
        lambda tr: step.summed_loss(tr, frozen, batch, cfg, jax.random.key(0), True)[0]))(trainable)
    has_kernel_gradient = (cfg.vocab_size, cfg.hidden_size) in dot_output_shapes(jaxpr.jaxpr)
    assert has_kernel_gradient == full_finetune


def test_module_dropout_feeds_the_adapter_only():
    """With dropout on, Linear's output is x W + b + s (dropout(x) a) b: the frozen path is unmasked."""
    lora_cfg = llama.LoRAConfig(rank=R, alpha=R * SCALING, dropout=0.5)
    layer = llama.Linear(O, True, lora_cfg, jnp.float32, jnp.float32, deterministic=False)
    x = arrays()["x"]
    variables = layer.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    params = jax.tree_util.tree_map(lambda v: v + 0.5, variables["params"])
    y = layer.apply({"params": params}, x, rngs={"dropout": jax.random.key(2)})
    base = x @ params["kernel"] + params["bias"]
    delta = y - base  # = s (x_dropped a) b; x_dropped is x / keep or 0 per element
    assert not np.allclose(delta, (x @ params["lora_a"]) @ params["lora_b"] * SCALING, atol=1e-3)
    no_lora = dataclasses.replace(lora_cfg, dropout=0.0)
    y_nodrop = llama.Linear(O, True, no_lora, jnp.float32, jnp.float32, deterministic=False).apply(
        {"params": params}, x)
    np.testing.assert_allclose(y_nodrop, base + (x @ params["lora_a"]) @ params["lora_b"] * SCALING, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_and_its_gradients_equal_dot_product_attention(dtype):
    """GQA (6 heads over 2 kv heads), a packed row, a padded row (fully masked queries), causal."""
    from jaxtune.models.attention import attention

    Bq, Tq, H, K, Dh = 2, 9, 6, 2, 4
    keys = jax.random.split(jax.random.key(5), 4)
    q = jax.random.normal(keys[0], (Bq, Tq, H, Dh), dtype)
    k = jax.random.normal(keys[1], (Bq, Tq, K, Dh), dtype)
    v = jax.random.normal(keys[2], (Bq, Tq, K, Dh), dtype)
    dout = jax.random.normal(keys[3], (Bq, Tq, H, Dh), dtype)
    segments = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0, 0]], jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(Tq), (Bq, Tq))
    mask = llama.attention_mask(slots, segments, slots, segments, None)

    def ours(q, k, v):
        return attention(q, k, v, mask, 0.5)

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.5)

    out, vjp = jax.jit(lambda *a: jax.vjp(ours, *a))(q, k, v)
    ref_out, ref_vjp = jax.jit(lambda *a: jax.vjp(reference, *a))(q, k, v)
    rtol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert_close(out, ref_out, rtol)
    for g, g_ref in zip(vjp(dout), ref_vjp(dout)):
        assert_close(g, g_ref, rtol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_silu_gate_and_its_gradients_equal_autodiff_of_the_plain_math(dtype):
    keys = jax.random.split(jax.random.key(7), 3)
    gate = (jax.random.normal(keys[0], (B, T, O)) * 3).astype(dtype)
    up = jax.random.normal(keys[1], (B, T, O)).astype(dtype)
    dy = jax.random.normal(keys[2], (B, T, O)).astype(dtype)
    y, vjp = jax.jit(lambda g, u: jax.vjp(silu_gate, g, u))(gate, up)
    y_ref, vjp_ref = jax.jit(lambda g, u: jax.vjp(lambda g, u: jax.nn.silu(g) * u, g, u))(gate, up)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))  # same forward
    for g, g_ref in zip(vjp(dy), vjp_ref(dy)):
        assert_close(g, g_ref, 1e-6 if dtype == jnp.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_dropout", [False, True])
def test_shared_input_lora_dense_gradients_equal_autodiff_of_the_plain_math(dtype, with_dropout):
    """Fused q/k/v-style projections of one input: with bias and adapter, adapter only, neither
    (a projection left out of lora.targets); outputs and every cotangent against per-projection math.
    With dropout each adapter reads x through its own keep-mask (the base path reads x itself)."""
    keys = jax.random.split(jax.random.key(11), 14)
    x = jax.random.normal(keys[0], (B, T, D)).astype(dtype)
    widths = (7, 5, 3)
    kernels = [jax.random.normal(keys[1 + i], (D, o)).astype(dtype) * 0.3 for i, o in enumerate(widths)]
    bias0 = jax.random.normal(keys[4], (widths[0],)).astype(dtype)
    a0, a1 = (jax.random.normal(keys[5 + i], (D, R)) * 0.3 for i in range(2))
    b0, b1 = (jax.random.normal(keys[7 + i], (R, o)) * 0.3 for i, o in enumerate(widths[:2]))
    cotangents = [jax.random.normal(keys[9 + i], (B, T, o)).astype(dtype) for i, o in enumerate(widths)]
    keep0, keep1 = (jax.random.bernoulli(keys[12 + i], KEEP, (B, T, D)) if with_dropout else None for i in range(2))
    if with_dropout:
        assert bool(jnp.any(keep0 != keep1))

    def fused(x, k0, k1, k2, bias0, a0, b0, a1, b1):
        return shared_input_lora_dense(x, [(k0, bias0, a0, b0), (k1, None, a1, b1), (k2, None, None, None)],
                                       scaling=SCALING, dtype=dtype,
                                       keep_masks=(keep0, keep1, None) if with_dropout else None, keep_prob=KEEP)

    def reference(x, k0, k1, k2, bias0, a0, b0, a1, b1):
        return [plain(x, k0, bias0, a0, b0, keep0, dtype), plain(x, k1, None, a1, b1, keep1, dtype),
                jnp.dot(x.astype(dtype), k2.astype(dtype))]

    inputs = (x, *kernels, bias0, a0, b0, a1, b1)
    results = [jax.jit(lambda *args, f=f: (lambda ys, vjp: (ys, vjp(cotangents)))(*jax.vjp(f, *args)))(*inputs)
               for f in (fused, reference)]
    (ys, grads), (ys_ref, grads_ref) = results
    rtol = 1e-5 if dtype == jnp.float32 else 2e-2
    for y, y_ref in zip(ys, ys_ref):
        assert_close(y, y_ref, rtol)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, rtol)
    assert [g.dtype for g in grads[-4:]] == [jnp.float32] * 4  # adapters' cotangents in their own dtype


PROJECTIONS = (("q_proj", 8), ("k_proj", 8), ("v_proj", 4))


class PlainLoRALinear(nn.Module):
    """A Linear's math by autodiff: x W + bias + scaling (dropout(x) a) b, its mask drawn as Linear
    draws it (llama.lora_keep_mask: from the module's own 'dropout' rng); same param names."""

    features: int
    lora: llama.LoRAConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        a = self.param("lora_a", nn.initializers.normal(1.0), (x.shape[-1], self.lora.rank))
        b = self.param("lora_b", nn.initializers.normal(1.0), (self.lora.rank, self.features))
        xd = x
        if not self.deterministic and self.lora.dropout > 0:
            xd = dropped(x, llama.lora_keep_mask(self, x.shape), 1.0 - self.lora.dropout)
        return x @ kernel + bias + (xd @ a) @ b * self.lora.scaling


class Projections(nn.Module):
    """q/k/v of one input x: `how` = 'plain' (PlainLoRALinear each), 'linear' (llama.Linear each) or
    'fused' (llama.shared_input_linears)."""

    cfg: llama.ModelConfig
    deterministic: bool
    how: str

    @nn.compact
    def __call__(self, x):
        if self.how == "plain":
            return [PlainLoRALinear(o, self.cfg.lora, self.deterministic, name=name)(x) for name, o in PROJECTIONS]
        linears = [llama.Linear(o, True, self.cfg.lora, jnp.float32, jnp.float32, self.deterministic, name=name,
                                parent=None) for name, o in PROJECTIONS]
        if self.how == "linear":
            return [linear.clone(parent=self)(x) for linear in linears]
        return llama.shared_input_linears(self, x, linears)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("how", ["fused", "linear"])
def test_projections_equal_autodiff_of_the_plain_math_with_the_same_dropout_masks(dropout, how):
    """q/k/v through `shared_input_linears` (one hand-written VJP) or through one Linear each: outputs
    and gradients equal the plain math's for the same 'dropout' rng, each adapted linear drawing its
    own mask from its own rng (PEFT: one dropout module per adapted linear); the fused path runs
    with dropout on or off."""
    cfg = tiny_config(tied=True, dropout=dropout)
    x = jax.random.normal(jax.random.key(3), (B, T, cfg.hidden_size))
    params = random_params_of(Projections(cfg, True, "plain"), x)
    rngs = {"dropout": jax.random.key(5)}
    cotangents = [jax.random.normal(jax.random.key(6 + i), (B, T, o)) for i, (_, o) in enumerate(PROJECTIONS)]

    def outputs_and_grads(module):
        ys, vjp = jax.vjp(lambda p, x: module.apply({"params": p}, x, rngs=rngs), params, x)
        return ys, vjp(cotangents)

    ys, grads = jax.jit(lambda: outputs_and_grads(Projections(cfg, False, how)))()
    ys_ref, grads_ref = jax.jit(lambda: outputs_and_grads(Projections(cfg, False, "plain")))()
    for y, y_ref in zip(ys, ys_ref):
        assert_close(y, y_ref, 1e-5)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(grads_ref)
    for g, g_ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
        assert_close(g, g_ref, 1e-5)
    jaxpr = str(jax.make_jaxpr(lambda p: Projections(cfg, False, how).apply({"params": p}, x, rngs=rngs))(params))
    assert ("_shared_2d" in jaxpr) == (how == "fused" or dropout > 0)  # a lone Linear with dropout: masks saved


def test_dropout_masks_are_drawn_per_adapted_linear():
    """q and k with identical weights and adapters: equal outputs without dropout, different ones
    with it (their masks are independent draws)."""
    cfg = tiny_config(tied=True, dropout=0.5)
    x = jax.random.normal(jax.random.key(3), (B, T, cfg.hidden_size))
    params = random_params_of(Projections(cfg, True, "fused"), x)
    params["k_proj"] = params["q_proj"]
    q, k, _ = Projections(cfg, False, "fused").apply({"params": params}, x, rngs={"dropout": jax.random.key(5)})
    assert not np.allclose(q, k, atol=1e-3)
    q, k, _ = Projections(cfg, True, "fused").apply({"params": params}, x)
    np.testing.assert_allclose(q, k, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# What a layer keeps for its backward: each activation once


@pytest.mark.parametrize("with_adapter, with_dropout", [(False, False), (True, False), (True, True)])
def test_gated_lora_dense_gradients_equal_autodiff_of_the_plain_math(with_adapter, with_dropout):
    """down(silu(gate) * up), the product rematerialised: outputs and every cotangent against the plain math."""
    keys = jax.random.split(jax.random.key(21), 8)
    gate, up = (jax.random.normal(keys[i], (B, T, D)) * 2 for i in range(2))
    kernel, bias = jax.random.normal(keys[2], (D, O)) * 0.3, jax.random.normal(keys[3], (O,))
    a = jax.random.normal(keys[4], (D, R)) * 0.3 if with_adapter else None
    b = jax.random.normal(keys[5], (R, O)) * 0.3 if with_adapter else None
    keep = jax.random.bernoulli(keys[6], KEEP, (B, T, D)) if with_dropout else None
    dy = jax.random.normal(keys[7], (B, T, O))

    def gated(gate, up, kernel, bias, a, b):
        return gated_lora_dense(gate, up, (kernel, bias, a, b), keep, scaling=SCALING, dtype=jnp.float32,
                                keep_prob=KEEP)

    def reference(gate, up, kernel, bias, a, b):
        h = jax.nn.silu(gate) * up
        return h @ kernel + bias + (0.0 if a is None else plain(h, kernel, None, a, b, keep, jnp.float32) - h @ kernel)

    inputs = (gate, up, kernel, bias, a, b)
    results = [jax.jit(lambda *args, f=f: (lambda y, vjp: (y, vjp(dy)))(*jax.vjp(f, *args)))(*inputs)
               for f in (gated, reference)]
    (y, grads), (y_ref, grads_ref) = results
    assert_close(y, y_ref, 1e-5)
    for g, g_ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref), strict=True):
        assert_close(g, g_ref, 1e-5)


def test_rms_norm_and_its_gradients_equal_autodiff_of_the_plain_math():
    keys = jax.random.split(jax.random.key(23), 3)
    x, scale, dy = jax.random.normal(keys[0], (B, T, D)) * 3, jax.random.normal(keys[1], (D,)), jax.random.normal(keys[2], (B, T, D))

    def reference(x, scale):
        return scale * (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5))

    y, grads = jax.jit(lambda x, s: (lambda y, vjp: (y, vjp(dy)))(*jax.vjp(
        lambda x, s: llama.rms_norm(x, s, 1e-5, jnp.float32), x, s)))(x, scale)
    y_ref, grads_ref = jax.jit(lambda x, s: (lambda y, vjp: (y, vjp(dy)))(*jax.vjp(reference, x, s)))(x, scale)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))  # same forward bits
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, 1e-5)


@pytest.mark.parametrize("adapters", [False, True])
def test_a_decoder_layer_keeps_each_activation_once_for_its_backward(adapters, capsys):
    """Besides the params and the layer's input, one layer's backward keeps (float32, no dropout):
    the q/k/v input once, q, k, v, the attention output (in attention's layout and in o_proj's),
    the residual stream after attention, the gate/up input once, gate and up. Not: the normalised
    copies inside the norms, one flattened copy of a shared input per projection, silu(gate) * up.
    (In a scanned model each of those would be one more stacked [L, B, T, width] buffer.)"""
    cfg = dataclasses.replace(tiny_config(tied=True, targets=llama.LINEAR_TARGETS), qkv_bias=False)
    if not adapters:
        cfg = dataclasses.replace(cfg, lora=None)
    N, D_, F, H, K, Dh = 3 * 10, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layer = llama.DecoderLayer(cfg, deterministic=True)
    h = jax.random.normal(jax.random.key(0), (3, 10, D_))
    positions = jnp.broadcast_to(jnp.arange(10), (3, 10))
    segments = jnp.ones((3, 10), jnp.int32)
    params = layer.init(jax.random.key(1), h, positions, segments, jnp.int32(0), None)

    def loss(params, h):
        return jnp.sum(layer.apply(params, h, positions, segments, jnp.int32(0), None)[0])

    print_saved_residuals(loss, params, h)  # one line each: "f32[3,10,16] output of ..." / "... from the argument ..."
    kept = [math.prod(int(n) for n in line.split("[", 1)[1].split("]", 1)[0].split(",") if n)
            for line in capsys.readouterr().out.splitlines()
            if line.startswith("f32[") and "from the argument" not in line]  # not the bool attention mask
    # per token: q/k/v input D, q H*Dh, k and v K*Dh each, attention output H*Dh twice (its own
    # layout, o_proj's input), residual stream D, gate/up input D, gate F, up F
    expected_per_token = 3 * D_ + 3 * H * Dh + 2 * K * Dh + 2 * F
    activations = sum(size for size in kept if size >= N * min(D_, K * Dh, F))
    assert activations == N * expected_per_token, kept
