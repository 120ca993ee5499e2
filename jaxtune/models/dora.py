"""DoRA (weight-decomposed LoRA) as PEFT implements it (peft/tuners/lora/dora.py, `DoraLinearLayer`).

A DoRA target W [in, out] carries, next to `lora_a` [in, r] and `lora_b` [r, out], a trainable
`lora_magnitude` m [out] (float32). The adapted weight is m * V / ||V||, V = W + scaling * a b, the
norm taken per output feature (over the input dim: PEFT's `weight_norm` of its [out, in] weight along
dim 1) and treated as a constant in the backward (detached, section 4.3 of the DoRA paper, as PEFT does).
The magnitude is initialised to ||W + scaling * a b|| (= ||W|| for a fresh b = 0), so a fresh DoRA
adapter leaves the model unchanged.

The forward is PEFT's formula, term for term, with g = m / ||V|| (`mag_norm_scale`):
    no dropout:  y = x W + bias + (g - 1) (x W) + g * scaling * (x a) b
    dropout:     y = x W + bias + (g - 1) (xd W) + g * scaling * (xd a) b       (xd = dropout(x))
With dropout PEFT computes the base result on the undropped x and the DoRA term on the dropped one,
which costs a second base matmul (xd W); this mirrors it exactly. Without dropout (rates of 0 and
every evaluation / generation) x W is computed once, with a hand-written 2-D VJP. The arrangement is kept rather than the equal
g (x W + scaling (x a) b) + bias: the base result passes unscaled and only the small correction is
rounded, which on the real SmolLM2 (30 layers) keeps float32 logits within 6e-5 of a float64
reference, as PEFT's are, where the scaled form drifted to 1e-4.

The norm ||W + scaling a b|| is computed each call as PEFT does, from the dense V in float32
(`weight_norm`): in*out*r multiply-adds for a b plus one pass over W, i.e. r / N of the base matmul's
FLOPs for N tokens (1 % at r 8 over 1024 tokens), with no backward (stop_gradient). The expansion
||W||^2 + 2 s <W, a b> + s^2 ||a b||^2 would need the same in*out*r FLOPs for <W, a b> (a^T W) and
cancels catastrophically when a b is small against W, so the dense form is kept: it matches PEFT's
rounding.
"""

from __future__ import annotations

import functools
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
    if x_dropped is None:
        x_NxI = x.reshape(-1, x.shape[-1])
        y_NxO = _dora_dense_2d(float(scaling), jnp.dtype(dtype), x_NxI, kernel, bias, lora_a, lora_b, scale_O)
        return y_NxO.reshape(*x.shape[:-1], y_NxO.shape[-1])
    f32 = jnp.float32
    base = dense(x, kernel, None, dtype=dtype)
    dropped_base = dense(x_dropped, kernel, None, dtype=dtype)
    dropped_delta = lora_dense(x_dropped, None, None, lora_a, lora_b, None, scaling=scaling, dtype=dtype)
    correction = (scale_O - 1) * dropped_base.astype(f32) + scale_O * dropped_delta.astype(f32)
    result = base if bias is None else base + bias.astype(dtype)
    return result + correction.astype(dtype)


# Without dropout: a hand-written 2-D VJP (as jaxtune.models.kernels.lora_dense's), since autodiff of
# the two-term forward ran ~1.4x slower than one LoRA linear. With G = dy * g (float32 g):
#   d(g) = sum_N dy * (x W + scaling h b)     d(b) = h^T (scaling G)     d(h) = scaling G b^T
#   d(a) = (d(h)^T x)^T     d(x) = G W^T + d(h) a^T     d(W) = x^T G     d(bias) = sum_N dy
# (the norm is detached: g's cotangent goes to the magnitude alone, through g = m / ||V||).


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dora_dense_2d(scaling, dtype, x_NxI, kernel_IxO, bias_O, a_IxR, b_RxO, scale_O):
    return _dora_fwd(scaling, dtype, x_NxI, kernel_IxO, bias_O, a_IxR, b_RxO, scale_O)[0]


def _dora_fwd(scaling, dtype, x_NxI, kernel_IxO, bias_O, a_IxR, b_RxO, scale_O):
    x = x_NxI.astype(dtype)
    base_NxO = jnp.dot(x, kernel_IxO.astype(dtype))
    h_NxR = jnp.dot(x, a_IxR.astype(dtype))
    delta_NxO = jnp.dot(h_NxR, b_RxO.astype(dtype)) * scaling
    correction = (scale_O - 1) * base_NxO.astype(jnp.float32) + scale_O * delta_NxO.astype(jnp.float32)
    y = base_NxO if bias_O is None else base_NxO + bias_O.astype(dtype)
    y = y + correction.astype(dtype)
    return y, (x_NxI, kernel_IxO, bias_O, a_IxR, b_RxO, scale_O, h_NxR, base_NxO + delta_NxO)


def _dora_bwd(scaling, dtype, residuals, dy_NxO):
    x_NxI, kernel_IxO, bias_O, a_IxR, b_RxO, scale_O, h_NxR, adapted_NxO = residuals
    x = x_NxI.astype(dtype)
    dy32 = dy_NxO.astype(jnp.float32)
    dscale_O = jnp.sum(dy32 * adapted_NxO.astype(jnp.float32), axis=0)
    g_dy = (dy32 * scale_O).astype(dtype)
    dp_NxO = g_dy * scaling
    db_RxO = jnp.dot(h_NxR.T, dp_NxO)
    dh_NxR = jnp.dot(dp_NxO, b_RxO.astype(dtype).T)
    da_IxR = jnp.dot(dh_NxR.T, x).T
    dx_NxI = jnp.dot(g_dy, kernel_IxO.astype(dtype).T) + jnp.dot(dh_NxR, a_IxR.astype(dtype).T)
    dw_IxO = jnp.dot(x.T, g_dy).astype(kernel_IxO.dtype)
    dbias_O = None if bias_O is None else jnp.sum(dy_NxO, axis=0).astype(bias_O.dtype)
    return (dx_NxI.astype(x_NxI.dtype), dw_IxO, dbias_O, da_IxR.astype(a_IxR.dtype), db_RxO.astype(b_RxO.dtype),
            dscale_O.astype(scale_O.dtype))


_dora_dense_2d.defvjp(_dora_fwd, _dora_bwd)


def merged_kernel(kernel_IxO, a_IxR, b_RxO, magnitude_O, scaling: float):
    """W' = m * (W + scaling a b) / ||W + scaling a b|| in float32, cast back to the kernel's dtype
    (PEFT's merge: dora_factor * (W + delta)); works on stacked [L, ...] leaves too."""
    v = adapted_weight(kernel_IxO, a_IxR, b_RxO, scaling)
    norm = jnp.sqrt(jnp.sum(v * v, axis=-2, keepdims=True))
    return (magnitude_O.astype(jnp.float32)[..., None, :] / norm * v).astype(kernel_IxO.dtype)
