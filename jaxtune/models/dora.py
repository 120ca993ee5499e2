"""DoRA (weight-decomposed LoRA) as PEFT implements it (peft/tuners/lora/dora.py, `DoraLinearLayer`).

A DoRA target W [in, out] carries, next to `lora_a` [in, r] and `lora_b` [r, out], a trainable
`lora_magnitude` m [out] (float32). The adapted weight is m * V / ||V||, V = W + scaling * a b, the
norm taken per output feature (over the input dim: PEFT's `weight_norm` of its [out, in] weight along
dim 1) and treated as a constant in the backward (detached, section 4.3 of the DoRA paper, as PEFT does).
The magnitude is initialised to ||W + scaling * a b|| (= ||W|| for a fresh b = 0), so a fresh DoRA
adapter leaves the model unchanged.

The forward is PEFT's formula, term for term, with g = m / ||V|| (`mag_norm_scale`):
    no dropout:  y = x W + bias + (g - 1) (x W) + g * scaling * (x a) b  =  g (x W + scaling (x a) b) + bias
    dropout:     y = x W + bias + (g - 1) (xd W) + g * scaling * (xd a) b       (xd = dropout(x))
With dropout PEFT computes the base result on the undropped x and the DoRA term on the dropped one,
which costs a second base matmul (xd W); this mirrors it exactly. Without dropout (rates of 0 and
every evaluation / generation) the two terms collapse into one `lora_dense` call, scaled per column.

The norm ||W + scaling a b|| is computed each call as PEFT does, from the dense V in float32
(`weight_norm`): in*out*r multiply-adds for a b plus one pass over W, i.e. r / N of the base matmul's
FLOPs for N tokens (1 % at r 8 over 1024 tokens), with no backward (stop_gradient). The expansion
||W||^2 + 2 s <W, a b> + s^2 ||a b||^2 would need the same in*out*r FLOPs for <W, a b> (a^T W) and
cancels catastrophically when a b is small against W, so the dense form is kept: it matches PEFT's
rounding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxtune.models.kernels import dense, lora_dense


def adapted_weight(kernel_IxO, a_IxR, b_RxO, scaling: float):
    """V = W + scaling * a b in float32 ([in, out], or [L, in, out] for stacked leaves)."""
    return kernel_IxO.astype(jnp.float32) + scaling * jnp.matmul(a_IxR.astype(jnp.float32), b_RxO.astype(jnp.float32))


def weight_norm(kernel_IxO, a_IxR, b_RxO, scaling: float):
    """||W + scaling * a b|| per output feature, float32 [out] (or [L, out] for stacked [L, in, out])."""
    v = adapted_weight(kernel_IxO, a_IxR, b_RxO, scaling)
    return jnp.sqrt(jnp.sum(v * v, axis=-2))


def dora_dense(x, kernel, bias, lora_a, lora_b, magnitude, x_dropped=None, *, scaling: float, dtype: Any):
    """x [..., in] -> [..., out]: PEFT's DoRA linear (see the module docstring); x_dropped=None = no dropout."""
    norm_O = jax.lax.stop_gradient(weight_norm(kernel, lora_a, lora_b, scaling))
    # g = m / ||V|| stays float32 and scales in float32 before the one rounding to dtype: g - 1 is
    # small, and a bfloat16 g (steps of 2^-7 near 1) would bias it. No-op casts when dtype is float32.
    scale_O = magnitude.astype(jnp.float32) / norm_O
    f32 = jnp.float32
    if x_dropped is None:
        y = (scale_O * lora_dense(x, kernel, None, lora_a, lora_b, None, scaling=scaling, dtype=dtype).astype(f32))
        y = y.astype(dtype)
        return y if bias is None else y + bias.astype(dtype)
    base = dense(x, kernel, bias, dtype=dtype)
    dropped_base = dense(x_dropped, kernel, None, dtype=dtype).astype(f32)
    dropped_delta = lora_dense(x_dropped, None, None, lora_a, lora_b, None, scaling=scaling, dtype=dtype).astype(f32)
    return base + ((scale_O - 1) * dropped_base + scale_O * dropped_delta).astype(dtype)


def merged_kernel(kernel_IxO, a_IxR, b_RxO, magnitude_O, scaling: float):
    """W' = m * (W + scaling a b) / ||W + scaling a b|| in float32, cast back to the kernel's dtype
    (PEFT's merge: dora_factor * (W + delta)); works on stacked [L, ...] leaves too."""
    v = adapted_weight(kernel_IxO, a_IxR, b_RxO, scaling)
    norm = jnp.sqrt(jnp.sum(v * v, axis=-2, keepdims=True))
    return (magnitude_O.astype(jnp.float32)[..., None, :] / norm * v).astype(kernel_IxO.dtype)
