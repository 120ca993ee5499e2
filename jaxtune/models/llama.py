"""Flax (linen) port of the Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM2.

One implementation with options (q/k/v bias, q/k RMSNorm, tied embeddings, RoPE scaling, sliding
window, grouped-query attention). Module and parameter names follow the Hugging Face module path
(`model.layers.N.self_attn.q_proj` ...), so loading is a table of renames and transposes
(jaxtune/hf.py). Layers are stacked with `nn.scan`: compile time does not grow with depth, and every
leaf under `model/layers` carries a leading layer axis L.

LoRA adapters live next to the kernel they adapt (`lora_a [in, r]`, `lora_b [r, out]`):
    y = x W + scaling * dropout(x) a b           (never materialises W + a b)
Embedding LoRA follows PEFT's lora_embedding_A/B: `y = E[x] + scaling * a[x] b`.
QLoRA (cfg.quant): a targeted Linear holds NF4 leaves instead of `kernel` (jaxtune/models/quant.py)
and de-quantises them where the kernel is read; the layers are then rematerialised with the 'dots'
policy, so the backward recomputes each layer's float kernel instead of keeping all of them.
Adapters are float32 (`ADAPTER_DTYPE`) whatever `param_dtype`; every param, adapter or base, is cast
to `compute_dtype` where it is used, so a float32 leaf (a master weight) runs over a bfloat16 base.

Shapes: B batch, T query length, S key length (T, or the cache length when decoding), D hidden,
H query heads, K kv heads, G = H / K, Dh head dim, F mlp width, V vocab, L layers, r LoRA rank.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.models import quant
from jaxtune.models.attention import attention
from jaxtune.models import multi_lora
from jaxtune.models.dora import dora_dense, weight_norm
from jaxtune.models.kernels import (HeadSpec, dense, gated_lora_dense, lora_dense, shared_input_lora_dense,
                                    silu_gate)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# LoRA adapters are trainable, so always float32 master weights whatever param_dtype (an Adam update of
# ~lr is below bfloat16's resolution and would vanish); they are cast to the compute dtype at use.
ADAPTER_DTYPE = jnp.float32

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_TARGETS = LINEAR_TARGETS + ("embed_tokens", "lm_head")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Adapter settings the model needs to build its LoRA params."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LINEAR_TARGETS
    rslora: bool = False
    dora: bool = False  # DoRA (jaxtune.models.dora): a trainable magnitude per output feature of linear targets

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one Llama-family model (read from an HF config.json by jaxtune.hf)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # frozen dict items
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q/k/v; Llama `attention_bias`: also o
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    sliding_window: int | None = None
    architecture: str = "LlamaForCausalLM"
    # Numerics and memory, chosen by the run config rather than the checkpoint.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    lora: LoRAConfig | None = None
    quant: quant.QuantConfig | None = None  # model.quantize: NF4 frozen kernels (jaxtune/models/quant.py)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())


# --------------------------------------------------------------------------------------------
# RoPE


def rope_inverse_frequencies(cfg: ModelConfig) -> jax.Array:
    """Per-pair inverse frequencies [Dh/2], with HF's 'default', 'linear' and 'llama3' scaling."""
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    scaling = cfg.rope_scaling_dict
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling.get("low_freq_factor", 1.0)
        high_freq_factor = scaling.get("high_freq_factor", 4.0)
        old_context = scaling.get("original_max_position_embeddings", 8192)
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return jnp.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r} (supported: default, linear, llama3)")


def apply_rope(x_BxTxNxDh: jax.Array, positions_BxT: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in HF's rotate-half layout, computed in float32."""
    angles_BxTxDh2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(jnp.concatenate([angles_BxTxDh2] * 2, axis=-1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles_BxTxDh2] * 2, axis=-1))[:, :, None, :]
    x = x_BxTxNxDh.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x_BxTxNxDh.dtype)


# --------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return rms_norm(x, scale, self.eps, self.dtype)


@functools.partial(jax.checkpoint, prevent_cse=False, static_argnums=(2, 3))
def rms_norm(x, scale, eps: float, dtype):
    """scale * x / rms(x), in float32. Rematerialised: the backward keeps only x and the scale and
    recomputes the rest (one reduction and a few multiplies over x); autodiff would keep x, the
    normalised x and its inverse rms, one more stacked [L, B, T, D] buffer per norm in a scanned model."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * normed.astype(dtype)


def lora_a_init(key, shape, dtype):
    """PEFT's kaiming_uniform_(a=sqrt(5)) on lora_A [r, in]: U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nn.Module):
    """Dense layer with kernel [in, out], optional bias and optional LoRA adapter.

    quant (model.quantize=nf4): the kernel is stored as NF4 leaves (`nf4`, `absmax`, ...: see
    jaxtune/models/quant.py) instead of `kernel`, and dequantised to the compute dtype here, where
    it is read; the rest of the layer is unchanged."""

    features: int
    use_bias: bool
    lora: LoRAConfig | None
    dtype: Any
    param_dtype: Any
    deterministic: bool = True
    quant: quant.QuantConfig | None = None

    @nn.compact
    def __call__(self, x):
        kernel, bias, a, b = linear_weights(self, x.shape[-1])
        if self.has_variable("params", multi_lora.BANK_A):  # many adapters, one per row (jaxtune.multi_adapter)
            return multi_lora.bank_dense(x, kernel, bias, self.variables["params"], dtype=self.dtype)
        if a is None:
            return dense(x, kernel, bias, dtype=self.dtype)
        if self.lora.dora:  # magnitude m [out], initialised to ||W + scaling a b|| (jaxtune.lora sets it from the base)
            magnitude = self.param("lora_magnitude", lambda _: weight_norm(kernel, a, b, self.lora.scaling))
            return dora_dense(x, kernel, bias, a, b, magnitude, lora_dropout(self, x), scaling=self.lora.scaling,
                              dtype=self.dtype)
        if lora_dropout_inactive(self) or self.quant is not None:
            return lora_dense(x, kernel, bias, a, b, lora_dropout(self, x), scaling=self.lora.scaling, dtype=self.dtype)
        # Active dropout: the kernel applies the mask itself and saves it (1 byte an element), not the dropped x.
        return shared_input_lora_dense(x, [(kernel, bias, a, b)], scaling=self.lora.scaling, dtype=self.dtype,
                                       keep_masks=[lora_keep_mask(self, x.shape)], keep_prob=1.0 - self.lora.dropout)[0]


def linear_weights(module: Linear, in_features: int):
    """(kernel [in, out], bias or None, lora_a or None, lora_b or None): a Linear's params (an NF4
    kernel dequantised to the compute dtype; no adapter when the params carry an adapter bank)."""
    if module.quant is None:
        kernel = module.param("kernel", nn.initializers.normal(0.02), (in_features, module.features),
                              module.param_dtype)
    else:
        kernel = quantized_kernel(module, in_features, module.features, module.quant, module.dtype)
    bias = module.param("bias", nn.initializers.zeros, (module.features,), module.param_dtype) if module.use_bias else None
    if module.lora is None or module.has_variable("params", multi_lora.BANK_A):
        return kernel, bias, None, None
    a = module.param("lora_a", lora_a_init, (in_features, module.lora.rank), ADAPTER_DTYPE)
    b = module.param("lora_b", nn.initializers.zeros, (module.lora.rank, module.features), ADAPTER_DTYPE)
    return kernel, bias, a, b


class LinearWeights(Linear):
    """A Linear's params alone (same names and shapes) and its adapter's dropout keep-mask for an
    input of x_shape (None: no adapter or no active dropout), for `shared_input_linears`."""

    @nn.compact
    def __call__(self, x_shape: tuple[int, ...]):
        kernel, bias, a, b = linear_weights(self, x_shape[-1])
        mask = None if a is None or lora_dropout_inactive(self) else lora_keep_mask(self, x_shape)
        return (kernel, bias, a, b), mask


def shared_input_linears(module: nn.Module, x, linears: list[Linear]) -> list:
    """The outputs of Linears that read the same x (q/k/v; gate/up), each as `linear(x)` would be in
    `module`; the Linears come unbound (parent=None) and become `module`'s submodules by their names.

    When they are plain float kernels, none of them or all with a plain LoRA adapter (same scaling
    and dropout rate), they run as one hand-written VJP (kernels.shared_input_lora_dense: x saved
    once, where autodiff of one `dense` each saves its own flattened copy of x, one stacked [L, N, in]
    buffer per projection in a scanned model; without active dropout the adapters' a as one matmul;
    with it, one keep-mask per adapted linear, drawn from that linear's own 'dropout' rng as `Linear`
    draws it, as PEFT draws one per adapted module, and only the masks saved); otherwise (DoRA, NF4,
    adapter banks) each Linear runs on its own. Same params either way."""
    if not fusable(module, linears):
        return [linear.clone(parent=module)(x) for linear in linears]
    weights, masks, scaling, keep_prob = fused_weights(module, x.shape, linears)
    return shared_input_lora_dense(x, weights, scaling=scaling, dtype=linears[0].dtype, keep_masks=masks,
                                   keep_prob=keep_prob)


def gated_linear(module: nn.Module, gate, up, linear: Linear):
    """`linear(silu(gate) * up)` in `module` (the MLP's down projection; `linear` unbound, as in
    `shared_input_linears`). Plain float kernels (see there) run as kernels.gated_lora_dense, whose
    backward keeps gate and up, not their product: one stacked [L, N, F] buffer less per scanned model."""
    if not fusable(module, [linear]):
        return linear.clone(parent=module)(silu_gate(gate, up))
    weights, masks, scaling, keep_prob = fused_weights(module, gate.shape, [linear])
    return gated_lora_dense(gate, up, weights[0], None if masks is None else masks[0], scaling=scaling,
                            dtype=linear.dtype, keep_prob=keep_prob)


def fusable(module: nn.Module, linears: list[Linear]) -> bool:
    """Plain float kernels, none or all with a plain LoRA adapter of one scaling and dropout rate."""
    adapted = [linear.lora for linear in linears if linear.lora is not None]
    return (len({(lora.scaling, lora.dropout) for lora in adapted}) <= 1
            and not any(lora.dora for lora in adapted) and all(linear.quant is None for linear in linears)
            and not any(holds_adapter_bank(module, linear.name) for linear in linears))


def fused_weights(module: nn.Module, x_shape, linears: list[Linear]):
    """(the (kernel, bias, a, b) of each linear, their dropout keep-masks or None, scaling, keep prob)
    as `module`'s submodules by the linears' names."""
    weights, masks = zip(*[LinearWeights(linear.features, linear.use_bias, linear.lora, linear.dtype,
                                         linear.param_dtype, linear.deterministic, linear.quant, parent=module,
                                         name=linear.name)(x_shape)
                           for linear in linears])
    adapted = [linear.lora for linear in linears if linear.lora is not None]
    scaling, rate = (adapted[0].scaling, adapted[0].dropout) if adapted else (1.0, 0.0)
    return weights, masks if any(mask is not None for mask in masks) else None, scaling, 1.0 - rate


def holds_adapter_bank(module: nn.Module, name: str) -> bool:
    """Whether `module`'s submodule `name` carries an adapter bank (jaxtune.multi_adapter's params)."""
    return multi_lora.BANK_A in module.variables.get("params", {}).get(name, {})


def lora_dropout_inactive(module: nn.Module) -> bool:
    return module.deterministic or module.lora.dropout == 0.0


def quantized_kernel(module: nn.Module, in_features: int, out_features: int, qcfg: quant.QuantConfig, dtype):
    """Declare `module`'s NF4 leaves of an [in, out] kernel (HF layout [out, in], jaxtune.models.quant)
    and return the kernel dequantised to `dtype`, [in, out]. Init (`quant.init_leaves`): random codes
    under one typical absmax; real runs quantise the loaded weights (jaxtune.hf.load_params)."""
    shapes = quant.leaf_shapes(out_features, in_features, qcfg.double)

    def init(key, shape, leaf_dtype, name):
        return quant.init_leaves(key, out_features, in_features, qcfg.double)[name]

    leaves = {name: module.param(name, init, shape, leaf_dtype, name) for name, (shape, leaf_dtype) in shapes.items()}
    return quant.dequantize(leaves, dtype).T


def quantized_remat_policy():
    """Remat policy of a quantised model's layers under model.remat=none: 'dots' (keep the matmul
    outputs, recompute the rest). Without remat the backward would keep every layer's dequantised
    kernels (lora_dense's residual), a float copy of the whole base; this policy recomputes them from
    the NF4 leaves instead, with the cheap elementwise ops. (A name-based 'everything but the
    dequantised kernel' policy does not reach the residuals of lora_dense's custom VJP.)"""
    return remat_policy("dots")


def quant_for(cfg: ModelConfig, target: str) -> quant.QuantConfig | None:
    return cfg.quant if cfg.quant is not None and target in cfg.quant.targets else None


def lora_keep_mask(module: nn.Module, shape: tuple[int, ...]):
    """The keep-mask of a LoRA adapter's input dropout (bool, kept with probability 1 - rate): flax
    nn.Dropout's draw, from the module's own 'dropout' rng (one mask per adapted module, as PEFT)."""
    return jax.random.bernoulli(module.make_rng("dropout"), 1.0 - module.lora.dropout, shape)


def lora_dropout(module: nn.Module, x):
    """The input the adapter multiplies: dropout(x) (nn.Dropout's arithmetic over `lora_keep_mask`),
    or None when there is no dropout (rate 0 or deterministic) so the adapter reads x itself."""
    if lora_dropout_inactive(module):
        return None
    keep_prob = 1.0 - module.lora.dropout
    return jax.lax.select(lora_keep_mask(module, x.shape), x / keep_prob, jnp.zeros_like(x))


class Embed(nn.Module):
    """Token embedding [V, D] with optional PEFT-style embedding LoRA; `attend` for tied heads."""

    vocab_size: int
    features: int
    lora: LoRAConfig | None
    dtype: Any
    param_dtype: Any

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.initializers.normal(0.02), (self.vocab_size, self.features), self.param_dtype
        )
        if self.lora is not None:
            rank = self.lora.rank
            self.lora_a = self.param("lora_a", nn.initializers.zeros, (self.vocab_size, rank), ADAPTER_DTYPE)
            self.lora_b = self.param("lora_b", nn.initializers.normal(1.0), (rank, self.features), ADAPTER_DTYPE)

    def __call__(self, tokens_BxT):
        x = jnp.take(self.embedding, tokens_BxT, axis=0).astype(self.dtype)
        if self.lora is not None:  # 2-D [N, r] @ [r, D]: canonical dots in the backward too
            x_a_NxR = jnp.take(self.lora_a, tokens_BxT.reshape(-1), axis=0).astype(self.dtype)
            delta_NxD = (x_a_NxR @ self.lora_b.astype(self.dtype)) * self.lora.scaling
            x = x + delta_NxD.reshape(x.shape)
        return x

    def attend(self, h_BxTxD, decoding: bool = False):
        """Tied output projection h E^T (the base embedding only; a tied lm_head LoRA is added apart).
        decoding=True: the few rows of a decode step, see `decode_tied_logits`."""
        if decoding:
            return decode_tied_logits(h_BxTxD, self.embedding, self.dtype)
        return jnp.dot(h_BxTxD, self.embedding.astype(self.dtype).T)


def decode_tied_logits(h_BxTxD, embedding_VxD, dtype):
    """h E^T for the few rows of a decode step, reading E [V, D] once in its own layout.

    One row: a matrix-vector dot. Several rows: a multiply-reduce over D (float32 products and sums),
    which XLA:CPU runs close to memory speed; its dot of a few rows against the transposed [V, D]
    embedding ran 1.5-1.6x slower (SmolLM2-135M's 49152 x 576 head, 2 to 32 rows, one core)."""
    rows_NxD = h_BxTxD.reshape(-1, h_BxTxD.shape[-1])
    if rows_NxD.shape[0] == 1:
        logits_NxV = jnp.dot(rows_NxD.astype(dtype), embedding_VxD.astype(dtype).T)
    else:
        f32 = jnp.float32
        logits_NxV = jnp.sum(embedding_VxD[None].astype(f32) * rows_NxD[:, None, :].astype(f32), axis=-1)
    return logits_NxV.astype(dtype).reshape(*h_BxTxD.shape[:-1], -1)


class TiedHeadLoRA(nn.Module):
    """LoRA delta of a tied lm_head: scaling * dropout(h) a b, a [D, r], b [r, V]."""

    vocab_size: int
    lora: LoRAConfig
    dtype: Any
    param_dtype: Any
    deterministic: bool = True

    @nn.compact
    def __call__(self, h_BxTxD):
        a = self.param("lora_a", lora_a_init, (h_BxTxD.shape[-1], self.lora.rank), ADAPTER_DTYPE)
        b = self.param("lora_b", nn.initializers.zeros, (self.lora.rank, self.vocab_size), ADAPTER_DTYPE)
        return lora_dense(h_BxTxD, None, None, a, b, lora_dropout(self, h_BxTxD), scaling=self.lora.scaling,
                          dtype=self.dtype)


def lora_for(cfg: ModelConfig, target: str) -> LoRAConfig | None:
    return cfg.lora if cfg.lora is not None and target in cfg.lora.targets else None


def attention_mask(q_slots_BxT, q_segments_BxT, k_slots_BxS, k_segments_BxS, sliding_window):
    """[B, 1, T, S] bool: causal by slot, same segment, never a pad key (segment 0)."""
    causal = k_slots_BxS[:, None, :] <= q_slots_BxT[:, :, None]
    same_segment = q_segments_BxT[:, :, None] == k_segments_BxS[:, None, :]
    mask = causal & same_segment & (k_segments_BxS[:, None, :] != 0)
    if sliding_window is not None:
        mask &= (q_slots_BxT[:, :, None] - k_slots_BxS[:, None, :]) < sliding_window
    return mask[:, None, :, :]


def write_cache(cached, chunk, cache_index, slot_axis: int):
    """`cached` with `chunk` written from slot cache_index on, along slot_axis (-1: keys, slot-minor;
    -2: values). cached: a layer's keys / values, stacked ([B, K, Dh, S] / [B, K, S, Dh]) or with rows
    merged ([B * K, Dh, S] / [B * K, S, Dh], `unstack_cache`); chunk: [B, K, Dh, T] / [B, K, T, Dh]."""
    new = chunk.astype(cached.dtype)
    if cached.ndim == 3:
        new = new.reshape(-1, *new.shape[2:])
    start = [0] * cached.ndim
    start[slot_axis] = cache_index
    return jax.lax.dynamic_update_slice(cached, new, start)


def one_token_attention(q_BxHxDh, keys_NxDhxS, values_NxSxDh, mask_BxS, scale):
    """Attention of one query per row over a cache (decoding). The cache rows are (batch row, kv head)
    pairs, N = B * K (`unstack_cache`'s per-layer layout), so both products are plain batched matmuls
    over N with the G query heads of a kv head as rows: q [G, Dh] x k [Dh, S], then p [G, S] x v [S, Dh].
    The keys are stored slot-minor ([Dh, S] per row, `init_cache`) so that both products read their
    cache operand in a matmul's natural layout: slot-major keys ([S, Dh], contracted over their minor
    axis) made the scores' product 4-5x slower than p x v on XLA:CPU (YNNPACK) and this whole function
    1.3x (batch 1) to 1.5x (batch 64; 1.9x at 512 slots) slower (the A/B figures: `init_cache`).
    float32 scores, softmax and accumulation. (Multiply-reduce fusions over a [B, S, K, Dh] cache took
    1.6-1.8x longer on XLA:CPU, measured over 30 layers of SmolLM2-135M at batch 1 and 8; over the
    slot-minor keys, XLA runs a multiply-reduce at the speed of this dot.)"""
    B, H, Dh = q_BxHxDh.shape
    N = keys_NxDhxS.shape[0]
    f32 = jnp.float32
    q_NxGxDh = (q_BxHxDh.reshape(N, H * B // N, Dh).astype(f32) * scale).astype(keys_NxDhxS.dtype)
    scores_NxGxS = jnp.einsum("ngd,nds->ngs", q_NxGxDh, keys_NxDhxS, preferred_element_type=f32)
    mask_NxS = jnp.repeat(mask_BxS, N // B, axis=0)
    scores_NxGxS = jnp.where(mask_NxS[:, None, :], scores_NxGxS, jnp.finfo(f32).min)
    weights_NxGxS = jnp.exp(scores_NxGxS - scores_NxGxS.max(axis=-1, keepdims=True))
    weights_NxGxS = weights_NxGxS / weights_NxGxS.sum(axis=-1, keepdims=True)
    out_NxGxDh = jnp.einsum("ngs,nsd->ngd", weights_NxGxS.astype(values_NxSxDh.dtype), values_NxSxDh,
                            preferred_element_type=f32)
    return out_NxGxDh.reshape(B, H, Dh).astype(q_BxHxDh.dtype)


class Attention(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segments_BxT, layer_cache, cache_index):
        cfg = self.cfg
        dtype, pdtype = DTYPES[cfg.compute_dtype], DTYPES[cfg.param_dtype]
        B, T, _ = x_BxTxD.shape
        H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def proj(name, features, bias, parent=self):
            return Linear(features, bias, lora_for(cfg, name), dtype, pdtype, self.deterministic,
                          quant=quant_for(cfg, name), parent=parent, name=name)

        q_BxTxHD, k_BxTxKD, v_BxTxKD = shared_input_linears(
            self, x_BxTxD, [proj("q_proj", H * Dh, cfg.qkv_bias, None), proj("k_proj", K * Dh, cfg.qkv_bias, None),
                            proj("v_proj", K * Dh, cfg.qkv_bias, None)])
        q_BxTxHxDh = q_BxTxHD.reshape(B, T, H, Dh)
        k_BxTxKxDh = k_BxTxKD.reshape(B, T, K, Dh)
        v_BxTxKxDh = v_BxTxKD.reshape(B, T, K, Dh)
        if cfg.qk_norm:
            q_BxTxHxDh = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="q_norm")(q_BxTxHxDh)
            k_BxTxKxDh = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="k_norm")(k_BxTxKxDh)
        inv_freq = rope_inverse_frequencies(cfg)
        q_BxTxHxDh = apply_rope(q_BxTxHxDh, positions_BxT, inv_freq)
        k_BxTxKxDh = apply_rope(k_BxTxKxDh, positions_BxT, inv_freq)

        q_slots_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if layer_cache is None:
            keys, values, k_slots, k_segments = k_BxTxKxDh, v_BxTxKxDh, q_slots_BxT, segments_BxT
            new_cache = None
        else:
            # Write this chunk at slots [cache_index, cache_index + T) and attend over the whole cache
            # (head-major, keys slot-minor: keys [B, K, Dh, S], values [B, K, S, Dh]; or, unrolled
            # decoding, rows merged: keys [B * K, Dh, S], values [B * K, S, Dh]: see `init_cache`).
            keys = write_cache(layer_cache["k"], k_BxTxKxDh.transpose(0, 2, 3, 1), cache_index, slot_axis=-1)
            values = write_cache(layer_cache["v"], v_BxTxKxDh.transpose(0, 2, 1, 3), cache_index, slot_axis=-2)
            k_segments = jax.lax.dynamic_update_slice(layer_cache["segments"], segments_BxT, (0, cache_index))
            S = values.shape[-2]
            k_slots = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
            q_slots_BxT = q_slots_BxT + cache_index
            new_cache = {"k": keys, "v": values, "segments": k_segments}

        mask = attention_mask(q_slots_BxT, segments_BxT, k_slots, k_segments, cfg.sliding_window)
        if layer_cache is None:  # training / scoring: canonical batched dots, hand-written backward
            out_BxTxHxDh = attention(q_BxTxHxDh, keys, values, mask, 1.0 / math.sqrt(Dh))
        elif T == 1:  # decoding: read the cache in place, its rows (batch row, kv head) pairs
            out_BxHxDh = one_token_attention(q_BxTxHxDh[:, 0], keys.reshape(B * K, Dh, S),
                                             values.reshape(B * K, S, Dh), mask[:, 0, 0], 1.0 / math.sqrt(Dh))
            out_BxTxHxDh = out_BxHxDh[:, None]
        else:  # prefill into a cache
            keys_BxSxKxDh = keys.reshape(B, K, Dh, S).transpose(0, 3, 1, 2).astype(dtype)
            values_BxSxKxDh = values.reshape(B, K, S, Dh).transpose(0, 2, 1, 3).astype(dtype)
            out_BxTxHxDh = jax.nn.dot_product_attention(q_BxTxHxDh, keys_BxSxKxDh, values_BxSxKxDh, mask=mask,
                                                        scale=1.0 / math.sqrt(Dh))
        out = proj("o_proj", cfg.hidden_size, cfg.o_bias)(out_BxTxHxDh.reshape(B, T, H * Dh))
        return out, new_cache


class MLP(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.cfg
        dtype, pdtype = DTYPES[cfg.compute_dtype], DTYPES[cfg.param_dtype]

        def proj(name, features, parent=self):
            return Linear(features, cfg.mlp_bias, lora_for(cfg, name), dtype, pdtype, self.deterministic,
                          quant=quant_for(cfg, name), parent=parent, name=name)

        gate_BxTxF, up_BxTxF = shared_input_linears(
            self, x_BxTxD, [proj("gate_proj", cfg.intermediate_size, None), proj("up_proj", cfg.intermediate_size, None)])
        return gated_linear(self, gate_BxTxF, up_BxTxF, proj("down_proj", cfg.hidden_size, None))


class DecoderLayer(nn.Module):
    """One pre-norm block; written as a scan body: (h, per-layer cache) -> (h, new per-layer cache)."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, h_BxTxD, positions_BxT, segments_BxT, cache_index, layer_cache):
        cfg = self.cfg
        dtype, pdtype = DTYPES[cfg.compute_dtype], DTYPES[cfg.param_dtype]
        normed = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="input_layernorm")(h_BxTxD)
        attn_out, new_cache = Attention(cfg, self.deterministic, name="self_attn")(
            normed, positions_BxT, segments_BxT, layer_cache, cache_index
        )
        h_BxTxD = h_BxTxD + attn_out
        normed = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="post_attention_layernorm")(h_BxTxD)
        h_BxTxD = h_BxTxD + MLP(cfg, self.deterministic, name="mlp")(normed)
        return h_BxTxD, new_cache


def remat_policy(name: str):
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }
    if name not in policies:
        raise ValueError(f"model.remat={name!r}: choose one of {REMAT_POLICIES}")
    return policies[name]


class Decoder(nn.Module):
    """`model` in HF naming: embed_tokens, scanned layers (or unrolled ones, see Llama), final norm."""

    cfg: ModelConfig
    deterministic: bool = True
    unroll_layers: bool = False

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, segments_BxT, cache, cache_index):
        cfg = self.cfg
        dtype, pdtype = DTYPES[cfg.compute_dtype], DTYPES[cfg.param_dtype]
        embed = Embed(cfg.vocab_size, cfg.hidden_size, lora_for(cfg, "embed_tokens"), dtype, pdtype, name="embed_tokens")
        h_BxTxD = embed(tokens_BxT)

        if self.unroll_layers:
            new_cache = None if cache is None else []
            for i in range(cfg.num_layers):
                h_BxTxD, layer_cache = DecoderLayer(cfg, self.deterministic, name=f"layers_{i}")(
                    h_BxTxD, positions_BxT, segments_BxT, cache_index, None if cache is None else cache[i])
                if cache is not None:
                    new_cache.append(layer_cache)
            h_BxTxD = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="norm")(h_BxTxD)
            return h_BxTxD, new_cache, embed

        layer_cls = DecoderLayer
        if cfg.remat != "none":
            layer_cls = nn.remat(DecoderLayer, prevent_cse=False, policy=remat_policy(cfg.remat))
        elif cfg.quant is not None:  # each policy above already recomputes the dequantised kernels
            layer_cls = nn.remat(DecoderLayer, prevent_cse=False, policy=quantized_remat_policy())
        layers = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=cfg.num_layers,
        )(cfg, self.deterministic, name="layers")
        h_BxTxD, new_cache = layers(h_BxTxD, positions_BxT, segments_BxT, cache_index, cache)
        h_BxTxD = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="norm")(h_BxTxD)
        return h_BxTxD, new_cache, embed


class Llama(nn.Module):
    """Causal LM. Returns (logits [B, T, V] float32, new KV cache or None); with hidden_only=True,
    (final hidden states [B, T, D], the lm_head adapter's dropped input or None) for a loss that
    applies the head (`lm_head`) in chunks so the [B, T, V] logits never exist at once.

    cache: None (training / scoring) or a dict from `init_cache` whose `k` is [L, B, K, Dh, S], `v`
    [L, B, K, S, Dh] and `segments` [L, B, S]; `cache_index` (int32 scalar) is where this call's T
    tokens are written. Query row t attends to cache slots <= cache_index + t of its own segment.

    unroll_layers=True (decoding): the layers run as a Python loop, with params `model/layers_{i}`
    (`unstack_layers`) and the cache as a list of per-layer dicts (`unstack_cache`: keys [B * K, Dh, S],
    values [B * K, S, Dh]).
    Same math; every layer's weights and cache are then separate buffers that XLA reads and updates in place, whereas
    a scan slices each layer's weights and cache out of the stack with a copy, on every step (on CPU
    that copy costs about as much as the step's matmuls). Compiles slower, so training keeps the scan.
    """

    cfg: ModelConfig
    deterministic: bool = True
    unroll_layers: bool = False

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, segments_BxT, cache=None, cache_index=0, hidden_only=False):
        cfg = self.cfg
        dtype, pdtype = DTYPES[cfg.compute_dtype], DTYPES[cfg.param_dtype]
        cache_index = jnp.asarray(cache_index, jnp.int32)
        h_BxTxD, new_cache, embed = Decoder(cfg, self.deterministic, self.unroll_layers, name="model")(
            tokens_BxT, positions_BxT, segments_BxT, cache, cache_index
        )
        head_lora = lora_for(cfg, "lm_head")
        if hidden_only:  # (final hidden states, the lm_head adapter's dropped input or None): see lm_head
            dropped = None
            if head_lora is not None and head_lora.dropout > 0.0 and not self.deterministic:
                dropped = nn.Dropout(head_lora.dropout, name="lm_head_dropout")(h_BxTxD, deterministic=False)
            return h_BxTxD, dropped
        if cfg.tie_word_embeddings:
            logits_BxTxV = embed.attend(h_BxTxD, decoding=self.unroll_layers)
            if head_lora is not None:  # params under 'lm_head' although the kernel is the tied embedding
                logits_BxTxV += TiedHeadLoRA(cfg.vocab_size, head_lora, dtype, pdtype, self.deterministic, name="lm_head")(h_BxTxD)
        else:
            logits_BxTxV = Linear(cfg.vocab_size, False, head_lora, dtype, pdtype, self.deterministic,
                                  quant=quant_for(cfg, "lm_head"), name="lm_head")(h_BxTxD)
        return logits_BxTxV.astype(jnp.float32), new_cache


def lm_head(params, cfg: ModelConfig):
    """The output head of Llama.__call__ (tied or not, with its LoRA) from the param tree, for a loss
    that applies it chunk by chunk (jaxtune.step, kernels.head_cross_entropy_sum):
    (kernel, lora_a or None, lora_b or None, HeadSpec). A tied head's kernel is the embedding [V, D]
    itself (never transposed into a copy), a quantised one its dequantised NF4 leaves [V, D]; an untied
    one is lm_head's [D, V]."""
    head_lora = lora_for(cfg, "lm_head")
    kernel_is_VxD = True
    if cfg.tie_word_embeddings:
        kernel = params["model"]["embed_tokens"]["embedding"]
    elif quant_for(cfg, "lm_head") is not None:  # NF4 leaves in HF layout: dequantised [V, D], no transpose
        kernel = quant.dequantize(params["lm_head"], DTYPES[cfg.compute_dtype])
    else:
        kernel, kernel_is_VxD = params["lm_head"]["kernel"], False
    a = b = None
    if head_lora is not None:
        a, b = params["lm_head"]["lora_a"], params["lm_head"]["lora_b"]
    scaling = head_lora.scaling if head_lora is not None else 1.0
    return kernel, a, b, HeadSpec(kernel_is_VxD, float(scaling), DTYPES[cfg.compute_dtype])


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
    """Empty KV cache in the compute dtype, head-major for `one_token_attention`'s matmuls: keys
    [L, B, K, Dh, S] (slot-minor: the scores' product reads them as q x k), values [L, B, K, S, Dh]
    (p x v); segments [L, B, S] (0 = empty).

    Slot-minor keys against slot-major keys ([L, B, K, S, Dh]), A/B in one process, interleaved, best
    of 15 (2 CPU cores, load 1.3-1.5). The whole decode step of SmolLM2-135M (float32, a third of the
    cache filled): batch 64, 96 slots 155.9 -> 138.5 ms, 256 slots 221.9 -> 171.4 ms; batch 8, 96 slots
    43.1 -> 40.9 ms, 512 slots 62.6 -> 52.7 ms; batch 1, 96 slots 25.1 -> 24.8 ms, 512 slots 27.8 ->
    27.1 ms; the prefill unchanged (batch 64 x 32 tokens 2.89 s either way). 30 layers of one_token_attention alone at its shapes (K 3, G 3, Dh 64, load ~3):
    batch 64, 96 slots 31.1 -> 20.8 ms, 512 slots 226 -> 119 ms (~14 GB/s of cache read, near this
    machine's memory bandwidth); batch 8 3.8 -> 2.6 ms, 19.8 -> 16.2 ms; batch 1 0.30 -> 0.23 ms,
    2.6 -> 2.0 ms."""
    dtype = dtype or DTYPES[cfg.compute_dtype]
    L, K, Dh = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    return {
        "k": jnp.zeros((L, batch_size, K, Dh, max_len), dtype),
        "v": jnp.zeros((L, batch_size, K, max_len, Dh), dtype),
        "segments": jnp.zeros((L, batch_size, max_len), jnp.int32),
    }


def unstack_layers(params: dict, num_layers: int, split=None) -> dict:
    """Params with stacked `model/layers` ([L, ...] leaves) -> `model/layers_0..L-1`, for unroll_layers.

    split(leaf) -> the L per-layer arrays (default: leaf[i])."""
    split = split or (lambda leaf: [leaf[i] for i in range(num_layers)])
    model = dict(params["model"])
    leaves, treedef = jax.tree_util.tree_flatten(model.pop("layers"))
    per_leaf = [split(leaf) for leaf in leaves]
    for i in range(num_layers):
        model[f"layers_{i}"] = jax.tree_util.tree_unflatten(treedef, [layers[i] for layers in per_leaf])
    return {**params, "model": model}


def unstack_cache(cache: dict[str, jax.Array]) -> list[dict[str, jax.Array]]:
    """A stacked cache from `init_cache` -> one dict per layer, for unroll_layers: keys [B * K, Dh, S],
    values [B * K, S, Dh] (rows are (batch row, kv head) pairs: the same bytes as [B, K, ...]),
    segments [B, S].

    Merged rows give a layer's cache one shape for its write and for its attention's reads. With
    [B, K, S, Dh] at batch 1, XLA dropped the unit batch axis for the attention's products, wrote each
    cache twice per step (once per shape) and copied every k and v cache 4 times per step to do it
    (SmolLM2-135M, jax 0.10.2) instead of updating them in place."""
    rows = lambda leaf: leaf.reshape(-1, *leaf.shape[2:])
    return [{"k": rows(cache["k"][i]), "v": rows(cache["v"][i]), "segments": cache["segments"][i]}
            for i in range(cache["k"].shape[0])]


def abstract_params(cfg: ModelConfig) -> Any:
    """Shape/dtype tree of the params (jax.ShapeDtypeStruct leaves), without allocating anything."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), tokens, tokens, tokens + 1))
    return variables["params"]
