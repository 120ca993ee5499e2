"""NF4: the 4-bit NormalFloat base weights of QLoRA (Dettmers et al. 2023), in pure JAX.

What a quantised weight is. A frozen weight is stored in Hugging Face layout ([out, in] for a Linear,
[V, D] for an embedding), cut into blocks of `BLOCK_SIZE` = 64 consecutive values along its last
axis. Each block keeps its absolute maximum (`absmax`, float32) and, per value, the index (0..15) of
the nearest of the 16 NF4 code values (`NF4_CODE`, the QLoRA paper's Appendix E table) to
value / absmax. Two codes are packed into one uint8, the first in the high nibble. A value comes back
as NF4_CODE[code] * absmax (`dequantize`), which is what the model multiplies by, cast to its compute
dtype inside the Linear. These are the codes, bytes and values bitsandbytes' `quantize_4bit(W,
quant_type="nf4", blocksize=64)` produces for the same HF weight W, bit for bit (tests/test_quant.py
checks them against bitsandbytes' CPU path and qwix's `fp_to_nf4`).

Double quantisation (`double=True`, bitsandbytes' `compress_statistics=True`): the float32 absmax
of a weight are stored as 8 bits each. As bitsandbytes does, their mean is subtracted (`offset`,
float32), and the centred values, flattened in HF order, are quantised in blocks of 256
(`SCALE_BLOCK_SIZE`) to the nearest of bitsandbytes' signed 8-bit dynamic code
(`DYNAMIC_CODE`, `create_dynamic_map(signed=True)`) with one float32 absmax per block. The absmax
then cost 8.1 bits per 64 values (0.127 bits per weight) instead of 32 (0.5 bits per weight). The
code table and the block scales equal bitsandbytes'; its CPU search returns a farther code than the
nearest for a few values (~0.2% in the tests), ours always the nearest, so those codes differ.

Leaves (the names a quantised module holds instead of `kernel`; with scanned layers
each carries the leading L axis):
    nf4            uint8   [out, in / 2]        two codes per byte
    absmax         float32 [out, in / 64]       (single quantisation)
    absmax_code    uint8   [out, in / 64]       (double: the 8-bit absmax codes)
    absmax_scale   float32 [ceil(out * in / 64 / 256)]   (double: one per block of 256 absmax)
    absmax_offset  float32 []                   (double: the mean that was subtracted)

Why our own lines and not qwix: qwix (Google's JAX quantisation library) has the same NF4 table but
stores codes as unpacked `uint4` arrays, has no double quantisation, and attaches quantisation by
intercepting `dot_general` calls of a model, whereas jaxtune's param tree is named after the HF
module path and must load, shard and checkpoint explicitly. The few functions here keep the packed
leaves in that tree; qwix's `fp_to_nf4` is used as an independent reference in the tests.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_SIZE = 64  # values per absmax (QLoRA, bitsandbytes' default for NF4)
SCALE_BLOCK_SIZE = 256  # absmax per second-level scale (double quantisation)
KINDS = ("nf4",)
# Divisor floor of an all-zero block: the smallest normal float32 (bitsandbytes clamps at 1e-38, a
# denormal that XLA:CPU flushes to zero; both give code 0.0 for every value of such a block).
TINY = np.float32(np.finfo(np.float32).tiny)

# The 16 NF4 values: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA, App. E).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)

LEAVES = ("nf4", "absmax")
DOUBLE_LEAVES = ("nf4", "absmax_code", "absmax_scale", "absmax_offset")
ALL_LEAVES = ("nf4", "absmax", "absmax_code", "absmax_scale", "absmax_offset")


def _dynamic_code() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic code (`create_dynamic_map(signed=True)`), sorted: 256 values.

    Seven decades 10^-6 .. 10^0; decade i holds 2^i evenly spaced magnitudes (the midpoints of a
    float32 linspace(0.1, 1, 2^i + 1)), each with both signs; plus 0 and 1."""
    values: list[float] = [0.0, 1.0]
    for i in range(7):
        bounds = _torch_linspace(0.1, 1.0, 2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        decade = np.float32(10.0 ** (-6 + i))  # multiplied in float32, as bitsandbytes does
        values += (decade * means).tolist() + (-decade * means).tolist()
    return np.sort(np.array(values, dtype=np.float32))


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32, bit for bit: step = float32((end - start) / (steps - 1)); the first
    half is start + step * i and the second end - step * (steps - 1 - i), each one fused
    multiply-add (one rounding, done here in float64, which holds the product exactly)."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32((np.float64(end32) - np.float64(start32)) / (steps - 1)))
    index = np.arange(steps, dtype=np.float64)
    up = step * index + np.float64(start32)
    down = np.float64(end32) - step * (steps - 1 - index)
    return np.where(index < steps // 2, up, down).astype(np.float32)


DYNAMIC_CODE = _dynamic_code()


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Which frozen weights are stored quantised, and how (model.quantize*)."""

    kind: str = "nf4"
    targets: tuple[str, ...] = ()  # HF module names: q_proj ... down_proj, lm_head, embed_tokens
    double: bool = False  # 8-bit absmax in blocks of 256 (bitsandbytes' compress_statistics)

    @property
    def leaves(self) -> tuple[str, ...]:
        return DOUBLE_LEAVES if self.double else LEAVES


# --------------------------------------------------------------------------------------------
# Codes: nearest code value, pack / unpack


def nearest_code(x, code) -> jax.Array:
    """Index of the nearest value of the sorted `code` for each x; a tie goes to the lower value
    (bitsandbytes: `bucketize` over the midpoints, right=False)."""
    midpoints = (code[:-1] + code[1:]) / np.float32(2.0)
    return jnp.searchsorted(jnp.asarray(midpoints), x, side="left").astype(jnp.uint8)


def pack(codes_NxI) -> jax.Array:
    """[..., I] codes 0..15 (I even) -> [..., I / 2] uint8, code 2j in the high nibble of byte j."""
    codes = codes_NxI.astype(jnp.uint8)
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack(packed_NxI2) -> jax.Array:
    """Inverse of `pack`: [..., I / 2] uint8 -> [..., I] codes."""
    high, low = packed_NxI2 >> 4, packed_NxI2 & 0xF
    return jnp.stack([high, low], axis=-1).reshape(*packed_NxI2.shape[:-1], packed_NxI2.shape[-1] * 2)


# --------------------------------------------------------------------------------------------
# NF4 of one weight (any leading axes; blocks along the last axis)


def check_quantizable(shape, what: str = "weight") -> None:
    if not shape or shape[-1] % BLOCK_SIZE:
        raise ValueError(f"{what} {tuple(shape)}: NF4 needs the last (input) dimension to be a multiple of "
                         f"{BLOCK_SIZE} (blocks of {BLOCK_SIZE} values share one absmax)")


def quantize_nf4(w_NxI) -> tuple[jax.Array, jax.Array]:
    """(packed codes [..., I / 2] uint8, absmax [..., I / 64] float32) of a weight [..., I].

    As bitsandbytes: x = clamp(w * (1 / max(absmax, TINY)), -1, 1) in float32, nearest NF4 code."""
    check_quantizable(w_NxI.shape)
    w = jnp.asarray(w_NxI, jnp.float32)
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    scaled = jnp.clip(blocks * (1.0 / jnp.maximum(absmax, TINY))[..., None], -1.0, 1.0)
    codes = nearest_code(scaled, NF4_CODE).reshape(w.shape)
    return pack(codes), absmax


def dequantize_nf4(packed_NxI2, absmax_NxB, dtype=jnp.float32) -> jax.Array:
    """[..., I] weight of packed codes and absmax: NF4_CODE[code] * absmax (float32), cast to dtype."""
    codes = unpack(packed_NxI2)
    values = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)]
    blocks = values.reshape(*absmax_NxB.shape, BLOCK_SIZE) * absmax_NxB[..., None].astype(jnp.float32)
    return blocks.reshape(codes.shape).astype(dtype)


# --------------------------------------------------------------------------------------------
# Double quantisation of the absmax (one weight: no leading layer axis; `quantize` vmaps over L)


def _scale_blocks(flat):
    """[n] -> [ceil(n / 256), 256], zero-padded (bitsandbytes' last block is short; zeros change
    neither its absmax nor any code)."""
    pad = -flat.shape[0] % SCALE_BLOCK_SIZE
    return jnp.pad(flat, (0, pad)).reshape(-1, SCALE_BLOCK_SIZE)


def quantize_absmax(absmax_OxB) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(codes uint8 [O, B], block absmax float32 [ceil(O B / 256)], offset float32 []) of one weight's absmax."""
    offset = jnp.mean(absmax_OxB.astype(jnp.float32))
    blocks = _scale_blocks((absmax_OxB - offset).reshape(-1))
    scale = jnp.max(jnp.abs(blocks), axis=-1)
    scaled = jnp.clip(blocks * (1.0 / jnp.maximum(scale, TINY))[:, None], -1.0, 1.0)
    codes = nearest_code(scaled, DYNAMIC_CODE).reshape(-1)[:absmax_OxB.size].reshape(absmax_OxB.shape)
    return codes, scale, offset


def dequantize_absmax(codes_OxB, scale, offset) -> jax.Array:
    """float32 [O, B] absmax: DYNAMIC_CODE[code] * its block's scale + offset."""
    values = jnp.asarray(DYNAMIC_CODE)[codes_OxB.reshape(-1).astype(jnp.int32)]
    blocks = _scale_blocks(values) * scale[:, None]
    return blocks.reshape(-1)[:codes_OxB.size].reshape(codes_OxB.shape) + offset


# --------------------------------------------------------------------------------------------
# A weight <-> its leaves


def quantize(w_OxI, double: bool = False, stacked: bool = False) -> dict[str, jax.Array]:
    """The leaves of a weight in HF layout [O, I] ([L, O, I] when `stacked`: scanned layers)."""
    packed, absmax = quantize_nf4(w_OxI)
    if not double:
        return {"nf4": packed, "absmax": absmax}
    codes, scale, offset = (jax.vmap(quantize_absmax) if stacked else quantize_absmax)(absmax)
    return {"nf4": packed, "absmax_code": codes, "absmax_scale": scale, "absmax_offset": offset}


def dequantize(leaves: dict, dtype=jnp.float32) -> jax.Array:
    """The [..., O, I] weight of `quantize`'s leaves (stacked or not), in `dtype`."""
    if "absmax" in leaves:
        absmax = leaves["absmax"]
    else:
        one = dequantize_absmax
        for _ in range(leaves["absmax_code"].ndim - 2):  # leading (layer) axes
            one = jax.vmap(one)
        absmax = one(leaves["absmax_code"], leaves["absmax_scale"], leaves["absmax_offset"])
    return dequantize_nf4(leaves["nf4"], absmax, dtype)


def leaf_shapes(out_features: int, in_features: int, double: bool) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
    """{leaf name: (shape, dtype)} of one [out, in] weight (what a quantised module declares)."""
    check_quantizable((out_features, in_features))
    blocks = in_features // BLOCK_SIZE
    shapes = {"nf4": ((out_features, in_features // 2), jnp.uint8)}
    if not double:
        return {**shapes, "absmax": ((out_features, blocks), jnp.float32)}
    return {**shapes, "absmax_code": ((out_features, blocks), jnp.uint8),
            "absmax_scale": ((math.ceil(out_features * blocks / SCALE_BLOCK_SIZE),), jnp.float32),
            "absmax_offset": ((), jnp.float32)}


def init_leaves(key, out_features: int, in_features: int, double: bool, stddev: float = 0.02) -> dict:
    """Leaves for a model init (shapes, tests): the codes of a random normal(stddev) weight under the
    absmax such a block typically has (2.5 stddev), the same for every block. The leaves of one weight
    are initialised one by one (one rng each), so none may depend on another's random draw; real
    runs quantise the loaded weights instead."""
    packed, _ = quantize_nf4(stddev * jax.random.normal(key, (out_features, in_features), jnp.float32))
    absmax = jnp.full((out_features, in_features // BLOCK_SIZE), 2.5 * stddev, jnp.float32)
    if not double:
        return {"nf4": packed, "absmax": absmax}
    codes, scale, offset = quantize_absmax(absmax)
    return {"nf4": packed, "absmax_code": codes, "absmax_scale": scale, "absmax_offset": offset}


def is_quantized(node) -> bool:
    """Whether a module's param dict holds a quantised weight."""
    return isinstance(node, dict) and "nf4" in node


def nbytes(leaves: dict) -> int:
    return sum(int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize for leaf in leaves.values())
