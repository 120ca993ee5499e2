"""Compute kernels of the model with hand-written gradients, in pure JAX (they run on every backend).

`lora_dense`: y = x W (+ bias) + scaling * (dropout(x) a) b over any leading dims of x.
    jax.grad of that expression on 3-D inputs makes XLA:CPU emit batched dot_generals with
    transposed layouts for the adapter's thin dots; its backward ran 2.5x slower than the frozen
    dense alone. Here x is flattened to [N, in] and the backward is written as plain 2-D dots:
        d(P) = dy * scaling          (P = h b, h = x_dropped a)
        d(b) = h^T d(P)      d(h) = d(P) b^T      d(a) = (d(h)^T x_dropped)^T      d(x_dropped) = d(h) a^T
        d(x) = dy W^T (+ d(x_dropped) when there is no dropout)     d(W) = x^T dy     d(bias) = sum dy
    Every cotangent is returned in its input's own dtype (adapters may be float32 while x and W
    are bfloat16; the math runs in the compute dtype, as the forward does). Cotangents nobody asks
    for (the frozen kernel's in a LoRA step) are dead code that XLA removes.

Dropout stays outside: the caller passes `x_dropped` (the input the adapter multiplies), so
autodiff chains its cotangent through the caller's mask; `x_dropped=None` means no dropout.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def dense(x, kernel, bias, *, dtype: Any):
    """x [..., in] W [in, out] (+ bias [out]) in `dtype`, as one 2-D dot (its autodiff is already
    canonical: the 3-D form's kernel gradient contracts two axes and ran ~1.4x slower)."""
    x_NxI = x.reshape(-1, x.shape[-1]).astype(dtype)
    y_NxO = jnp.dot(x_NxI, kernel.astype(dtype))
    if bias is not None:
        y_NxO = y_NxO + bias.astype(dtype)
    return y_NxO.reshape(*x.shape[:-1], y_NxO.shape[-1])


def lora_dense(x, kernel, bias, lora_a, lora_b, x_dropped=None, *, scaling: float, dtype: Any):
    """x [..., in] W [in, out] (+ bias [out]) + scaling * (x_dropped [..., in] a [in, r]) b [r, out].

    kernel=None (then bias=None): the adapter's delta alone."""
    x_NxI = x.reshape(-1, x.shape[-1])
    xd_NxI = None if x_dropped is None else x_dropped.reshape(-1, x.shape[-1])
    y_NxO = _lora_dense_2d(float(scaling), jnp.dtype(dtype), x_NxI, xd_NxI, kernel, bias, lora_a, lora_b)
    return y_NxO.reshape(*x.shape[:-1], y_NxO.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lora_dense_2d(scaling, dtype, x_NxI, xd_NxI, kernel_IxO, bias_O, a_IxR, b_RxO):
    return _fwd(scaling, dtype, x_NxI, xd_NxI, kernel_IxO, bias_O, a_IxR, b_RxO)[0]


def _fwd(scaling, dtype, x_NxI, xd_NxI, kernel_IxO, bias_O, a_IxR, b_RxO):
    x = x_NxI.astype(dtype)
    xd = x if xd_NxI is None else xd_NxI.astype(dtype)
    h_NxR = jnp.dot(xd, a_IxR.astype(dtype))
    delta = jnp.dot(h_NxR, b_RxO.astype(dtype)) * scaling
    if kernel_IxO is None:
        return delta, (x_NxI, xd_NxI, kernel_IxO, bias_O, a_IxR, b_RxO, h_NxR)
    y = jnp.dot(x, kernel_IxO.astype(dtype))
    if bias_O is not None:
        y = y + bias_O.astype(dtype)
    y = y + delta
    # Residuals are the inputs as given (their dtypes say what each cotangent must be) and h.
    return y, (x_NxI, xd_NxI, kernel_IxO, bias_O, a_IxR, b_RxO, h_NxR)


def _bwd(scaling, dtype, residuals, dy_NxO):
    x_NxI, xd_NxI, kernel_IxO, bias_O, a_IxR, b_RxO, h_NxR = residuals
    x = x_NxI.astype(dtype)
    xd = x if xd_NxI is None else xd_NxI.astype(dtype)
    dy = dy_NxO.astype(dtype)
    dp_NxO = dy * scaling
    db_RxO = jnp.dot(h_NxR.T, dp_NxO)
    dh_NxR = jnp.dot(dp_NxO, b_RxO.astype(dtype).T)
    da_IxR = jnp.dot(dh_NxR.T, xd).T
    dxd_NxI = jnp.dot(dh_NxR, a_IxR.astype(dtype).T)
    dx_NxI = None if kernel_IxO is None else jnp.dot(dy, kernel_IxO.astype(dtype).T)
    dw_IxO = None if kernel_IxO is None else jnp.dot(x.T, dy).astype(kernel_IxO.dtype)
    if xd_NxI is None:  # no dropout: the adapter's input is x itself
        dx_NxI, dxd_NxI = (dxd_NxI if dx_NxI is None else dx_NxI + dxd_NxI), None
    else:  # x reaches the output through x_dropped alone when there is no kernel
        dx_NxI, dxd_NxI = (jnp.zeros_like(x) if dx_NxI is None else dx_NxI), dxd_NxI.astype(xd_NxI.dtype)
    dbias_O = None if bias_O is None else jnp.sum(dy, axis=0).astype(bias_O.dtype)
    return (dx_NxI.astype(x_NxI.dtype), dxd_NxI, dw_IxO, dbias_O,
            da_IxR.astype(a_IxR.dtype), db_RxO.astype(b_RxO.dtype))


_lora_dense_2d.defvjp(_fwd, _bwd)
