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

`shared_input_lora_dense`: several LoRA linears reading one x (q/k/v; gate/up; or one linear alone)
as one VJP that saves x once. Dropout happens inside: it takes one keep-mask per adapter and saves
the masks (1 byte an element) rather than each adapter's dropped copy of x (4 bytes), recomputing
the dropped inputs in the backward.

`head_cross_entropy_sum`: the output head (tied or not, with its LoRA) and the masked cross-entropy,
over chunks of positions, with the gradients formed in the same pass as the loss (no logits
recomputed in the backward, no transposed copy of a tied embedding for the hidden gradient).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


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


# --------------------------------------------------------------------------------------------
# Output head + cross-entropy, gradients computed in the forward pass


class HeadSpec(NamedTuple):
    """Static description of an output head: logits = h W (W [D, V]; or h E^T for a tied embedding
    E [V, D], kernel_is_VxD=True) + scaling * (h_dropped a) b, in `dtype`, then float32."""

    kernel_is_VxD: bool
    scaling: float
    dtype: Any


def head_cross_entropy_sum(h_BxTxD, h_dropped_BxTxD, kernel, lora_a, lora_b, targets_BxT, mask_BxT, *,
                           spec: HeadSpec, chunk: int):
    """sum over [B, T] of mask * CE(logits, targets), `chunk` positions at a time, so only one
    [B, chunk, V] block of logits exists at once. lora_a/lora_b None: no head adapter;
    h_dropped None: the adapter reads h itself.

    Under differentiation, each chunk's logit gradient (softmax - onehot) * mask is formed right after
    its loss, and contracted at once into the gradients of h (and h_dropped, the kernel, a, b: only
    those being differentiated): the backward only scales them by the loss's cotangent. Autodiff of a
    checkpointed chunk would compute every chunk's logits twice and the hidden gradient in a second
    pass; this computes them once. T is padded up to a multiple of the chunk with masked positions."""
    B, T, _ = h_BxTxD.shape
    num_chunks = -(-T // chunk)
    chunk = -(-T // num_chunks)  # same number of chunks, least padding
    pad = num_chunks * chunk - T

    def chunked(x_BxT_):  # [B, T, ...] -> [num_chunks, B, chunk, ...]; B stays whole (it is the sharded axis)
        x = jnp.pad(x_BxT_, [(0, 0), (0, pad)] + [(0, 0)] * (x_BxT_.ndim - 2))
        return jnp.moveaxis(x.reshape(B, num_chunks, chunk, *x.shape[2:]), 1, 0)

    hd = None if h_dropped_BxTxD is None else chunked(h_dropped_BxTxD)
    return _head_ce(spec, chunked(h_BxTxD), hd, chunked(targets_BxT), chunked(mask_BxT.astype(jnp.float32)),
                    kernel, lora_a, lora_b)


def _head_chunk_logits(spec: HeadSpec, h_NxD, hd_NxD, kernel, a_DxR, b_RxV):
    """(float32 logits [N, V], the adapter's h_dropped a [N, r] or None)."""
    x = h_NxD.astype(spec.dtype)
    w = kernel.astype(spec.dtype)
    logits_NxV = jnp.dot(x, w.T) if spec.kernel_is_VxD else jnp.dot(x, w)
    if a_DxR is None:
        return logits_NxV.astype(jnp.float32), None
    xd = x if hd_NxD is None else hd_NxD.astype(spec.dtype)
    ha_NxR = jnp.dot(xd, a_DxR.astype(spec.dtype))
    logits_NxV = logits_NxV + jnp.dot(ha_NxR, b_RxV.astype(spec.dtype)) * spec.scaling
    return logits_NxV.astype(jnp.float32), ha_NxR


def _head_pass(spec: HeadSpec, h, hd, targets, mask, kernel, a, b, wanted: tuple[bool, ...]):
    """One pass over the chunks: (CE sum, gradients for a cotangent of 1: dh, dhd [chunked like h],
    dkernel, da, db), each None where `wanted` (h, hd, kernel, a, b) says it is not needed."""
    want_h, want_hd, want_kernel, want_a, want_b = wanted
    f32 = jnp.float32
    _, B, c, D = h.shape
    dtype = spec.dtype

    def body(carry, xs):
        ce_sum, dkernel, da, db = carry
        h_c, hd_c, targets_c, mask_c = xs
        h_NxD = h_c.reshape(B * c, D)
        hd_NxD = None if hd_c is None else hd_c.reshape(B * c, D)
        targets_N, mask_N = targets_c.reshape(B * c), mask_c.reshape(B * c)
        logits_NxV, ha_NxR = _head_chunk_logits(spec, h_NxD, hd_NxD, kernel, a, b)
        # optax.softmax_cross_entropy_with_integer_labels: logsumexp(logits) - logits[target]
        row_max = jax.lax.stop_gradient(logits_NxV.max(axis=-1, keepdims=True))
        unnormalized = jnp.exp(logits_NxV - row_max)
        row_sum = unnormalized.sum(axis=-1, keepdims=True)
        target_logit = jnp.take_along_axis(logits_NxV, targets_N[:, None], axis=-1)[:, 0]
        ce_sum = ce_sum + jnp.sum((jnp.log(row_sum[:, 0]) + row_max[:, 0] - target_logit) * mask_N)
        outs = (None, None)
        if any(wanted):
            is_target = jax.lax.broadcasted_iota(jnp.int32, logits_NxV.shape, 1) == targets_N[:, None]
            probs = unnormalized / row_sum
            dlogits_NxV = (jnp.where(is_target, probs - 1.0, probs) * mask_N[:, None]).astype(dtype)
            dh_NxD = dhd_NxD = None
            if want_h:
                w = kernel.astype(dtype)
                dh_NxD = jnp.dot(dlogits_NxV, w) if spec.kernel_is_VxD else jnp.dot(dlogits_NxV, w.T)
            if want_kernel:
                x = h_NxD.astype(dtype)
                dk = jnp.dot(dlogits_NxV.T, x) if spec.kernel_is_VxD else jnp.dot(x.T, dlogits_NxV)
                dkernel = dkernel + dk.astype(f32)
            if a is not None:  # the adapter's chain, as lora_dense's backward
                dp_NxV = dlogits_NxV * spec.scaling
                dha_NxR = jnp.dot(dp_NxV, b.astype(dtype).T)
                xd = (h_NxD if hd_NxD is None else hd_NxD).astype(dtype)
                if want_b:
                    db = db + jnp.dot(ha_NxR.T, dp_NxV).astype(f32)
                if want_a:
                    da = da + jnp.dot(dha_NxR.T, xd).T.astype(f32)
                dxd_NxD = jnp.dot(dha_NxR, a.astype(dtype).T)
                if hd_NxD is not None:
                    dhd_NxD = dxd_NxD if want_hd else None
                elif want_h:
                    dh_NxD = dh_NxD + dxd_NxD
            outs = (None if dh_NxD is None else dh_NxD.astype(h.dtype).reshape(B, c, D),
                    None if dhd_NxD is None else dhd_NxD.astype(hd.dtype).reshape(B, c, D))
        return (ce_sum, dkernel, da, db), outs

    def zeros_if(wanted_leaf, leaf):
        return jnp.zeros(leaf.shape, f32) if wanted_leaf and leaf is not None else None

    carry = (jnp.zeros((), f32), zeros_if(want_kernel, kernel), zeros_if(want_a, a), zeros_if(want_b, b))
    (ce_sum, dkernel, da, db), (dh, dhd) = jax.lax.scan(body, carry, (h, hd, targets, mask))
    cast = lambda g, like: None if g is None else g.astype(like.dtype)
    return ce_sum, (dh, dhd, cast(dkernel, kernel), cast(da, a), cast(db, b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_ce(spec, h, hd, targets, mask, kernel, a, b):
    return _head_pass(spec, h, hd, targets, mask, kernel, a, b, (False,) * 5)[0]


def _head_ce_fwd(spec, h, hd, targets, mask, kernel, a, b):
    # symbolic_zeros: every array argument arrives as CustomVJPPrimal(value, perturbed); the pass
    # computes the gradients of the perturbed ones only (a LoRA step never forms the frozen
    # kernel's [V, D] gradient).
    def value(p):
        return None if p is None else p.value

    def perturbed(p):
        return p is not None and p.perturbed

    wanted = tuple(perturbed(p) for p in (h, hd, kernel, a, b))
    ce_sum, grads = _head_pass(spec, value(h), value(hd), value(targets), value(mask), value(kernel), value(a),
                               value(b), wanted)
    return ce_sum, grads


def _head_ce_bwd(spec, grads, g):
    dh, dhd, dkernel, da, db = grads
    if isinstance(g, SymbolicZero):
        return (None,) * 7
    scale = lambda x: None if x is None else (x * g).astype(x.dtype)
    return scale(dh), scale(dhd), None, None, scale(dkernel), scale(da), scale(db)


_head_ce.defvjp(_head_ce_fwd, _head_ce_bwd, symbolic_zeros=True)


# --------------------------------------------------------------------------------------------
# Gated activation of the MLP


@jax.custom_vjp
def silu_gate(gate, up):
    """silu(gate) * up (jax.nn.silu's arithmetic), saving only gate and up for the backward:
        d(up) = dy silu(gate)      d(gate) = dy up sigmoid(gate) (1 + gate (1 - sigmoid(gate)))
    Autodiff of the expression keeps about five [N, F] intermediates per layer (the sigmoid, the
    silu, their products); in a scanned model each is a stacked [L, N, F] buffer (189 MiB per
    buffer for SmolLM2-135M at 4 x 256), zero-filled and written every step."""
    return jax.nn.silu(gate) * up


def _silu_gate_fwd(gate, up):
    return silu_gate(gate, up), (gate, up)


def _silu_gate_bwd(residuals, dy):
    gate, up = residuals
    sig = jax.nn.sigmoid(gate)
    dgate = dy * up * sig * (1 + gate * (1 - sig))
    dup = dy * gate * sig
    return dgate.astype(gate.dtype), dup.astype(up.dtype)


silu_gate.defvjp(_silu_gate_fwd, _silu_gate_bwd)


def gated_lora_dense(gate, up, projection, keep_mask=None, *, scaling: float, dtype: Any, keep_prob: float = 1.0):
    """`shared_input_lora_dense(silu_gate(gate, up), [projection])` (the MLP's down projection),
    rematerialised: its backward keeps gate and up, which silu_gate keeps anyway, and recomputes their
    product (elementwise) instead of also keeping it, an [N, F] buffer per layer (one stacked
    [L, N, F] buffer in a scanned model, 180 MiB for SmolLM2-135M at 4 x 256). The forward's matmul is
    not recomputed (its output is not needed by the backward)."""
    return _gated_lora_dense(float(scaling), jnp.dtype(dtype), float(keep_prob), gate, up, tuple(projection),
                             keep_mask)


@functools.partial(jax.checkpoint, prevent_cse=False, static_argnums=(0, 1, 2))
def _gated_lora_dense(scaling, dtype, keep_prob, gate, up, projection, keep_mask):
    masks = None if keep_mask is None else [keep_mask]
    return shared_input_lora_dense(silu_gate(gate, up), [projection], scaling=scaling, dtype=dtype, keep_masks=masks,
                                   keep_prob=keep_prob)[0]


# --------------------------------------------------------------------------------------------
# Several LoRA linears reading the same input (q/k/v; gate/up)


def shared_input_lora_dense(x, projections, *, scaling: float, dtype: Any, keep_masks=None, keep_prob: float = 1.0):
    """[x W_i (+ bias_i) + scaling * (xd_i a_i) b_i for each projection (kernel_i, bias_i, a_i, b_i)],
    a_i = b_i = None for a projection without adapter.

    Dropout: keep_masks None (no dropout: xd_i = x), or one mask per projection (bool [..., in], None
    for a projection without adapter): xd_i = where(mask_i, x / keep_prob, 0), flax nn.Dropout's
    arithmetic, one mask per adapted projection as PEFT draws them; the base path reads x itself.

    The same numbers as one `lora_dense` per projection, as one hand-written VJP: x is saved once
    for all of them (per-projection VJPs each save it: in a scanned model, one stacked [L, N, in]
    buffer per projection, zero-filled and written every step), and with dropout only the masks
    (1 byte an element) are saved, the dropped inputs being recomputed from x in the backward;
    without dropout the adapters' a are one matmul of x with [a_1 | a_2 | ...] and their input
    gradient one matmul with its transpose."""
    x_NxI = x.reshape(-1, x.shape[-1])
    masks = None
    if keep_masks is not None:
        masks = tuple(None if m is None else m.reshape(-1, x.shape[-1]) for m in keep_masks)
    ys = _shared_2d(float(scaling), jnp.dtype(dtype), float(keep_prob), x_NxI, tuple(tuple(p) for p in projections),
                    masks)
    return [y_NxO.reshape(*x.shape[:-1], y_NxO.shape[-1]) for y_NxO in ys]


def _adapter_columns(projections):
    """(index, first column, rank) of each adapted projection's block in [a_1 | a_2 | ...]."""
    blocks, start = [], 0
    for i, (_, _, a, _) in enumerate(projections):
        if a is not None:
            blocks.append((i, start, a.shape[1]))
            start += a.shape[1]
    return blocks


def _dropped(x, mask, keep_prob):
    """The adapter's input: x (mask None) or where(mask, x / keep_prob, 0)."""
    return x if mask is None else jax.lax.select(mask, x / keep_prob, jnp.zeros_like(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _shared_2d(scaling, dtype, keep_prob, x_NxI, projections, masks):
    return _shared_fwd(scaling, dtype, keep_prob, x_NxI, projections, masks)[0]


def _shared_fwd(scaling, dtype, keep_prob, x_NxI, projections, masks):
    x = x_NxI.astype(dtype)
    blocks = _adapter_columns(projections)
    h_NxRs = None
    if blocks and masks is None:  # every adapter reads x: one matmul with [a_1 | a_2 | ...]
        a_IxRs = jnp.concatenate([projections[i][2].astype(dtype) for i, _, _ in blocks], axis=1)
        h_NxRs = jnp.dot(x, a_IxRs)
    elif blocks:  # each adapter reads its own dropped x
        h_NxRs = jnp.concatenate([jnp.dot(_dropped(x, masks[i], keep_prob), projections[i][2].astype(dtype))
                                  for i, _, _ in blocks], axis=1)
    ys = []
    for i, (kernel, bias, a, b) in enumerate(projections):
        y = jnp.dot(x, kernel.astype(dtype))
        if bias is not None:
            y = y + bias.astype(dtype)
        ys.append(y)
    for i, start, rank in blocks:
        ys[i] = ys[i] + jnp.dot(h_NxRs[:, start:start + rank], projections[i][3].astype(dtype)) * scaling
    return ys, (x_NxI, projections, masks, h_NxRs)


def _shared_bwd(scaling, dtype, keep_prob, residuals, dys):
    x_NxI, projections, masks, h_NxRs = residuals
    x = x_NxI.astype(dtype)
    dys = [dy.astype(dtype) for dy in dys]
    dx_NxI = None
    grads = []
    for (kernel, bias, a, b), dy in zip(projections, dys):
        dx_i = jnp.dot(dy, kernel.astype(dtype).T)
        dx_NxI = dx_i if dx_NxI is None else dx_NxI + dx_i
        grads.append([jnp.dot(x.T, dy).astype(kernel.dtype),
                      None if bias is None else jnp.sum(dy, axis=0).astype(bias.dtype), None, None])
    blocks = _adapter_columns(projections)
    if blocks:
        dh_blocks = []
        for i, start, rank in blocks:
            b = projections[i][3]
            dp_NxO = dys[i] * scaling
            grads[i][3] = jnp.dot(h_NxRs[:, start:start + rank].T, dp_NxO).astype(b.dtype)
            dh_blocks.append(jnp.dot(dp_NxO, b.astype(dtype).T))
        if masks is None:
            dh_NxRs = jnp.concatenate(dh_blocks, axis=1)
            a_IxRs = jnp.concatenate([projections[i][2].astype(dtype) for i, _, _ in blocks], axis=1)
            da_IxRs = jnp.dot(dh_NxRs.T, x).T
            for i, start, rank in blocks:
                grads[i][2] = da_IxRs[:, start:start + rank].astype(projections[i][2].dtype)
            dx_NxI = dx_NxI + jnp.dot(dh_NxRs, a_IxRs.T)
        else:  # d(xd_i) = dh_i a_i^T reaches x through its mask: where(mask_i, d(xd_i) / keep_prob, 0)
            for (i, _, _), dh_NxR in zip(blocks, dh_blocks):
                a = projections[i][2]
                grads[i][2] = jnp.dot(dh_NxR.T, _dropped(x, masks[i], keep_prob)).T.astype(a.dtype)
                dx_NxI = dx_NxI + _dropped(jnp.dot(dh_NxR, a.astype(dtype).T), masks[i], keep_prob)
    mask_cotangents = None if masks is None else tuple(None for _ in masks)
    return dx_NxI.astype(x_NxI.dtype), tuple(tuple(g) for g in grads), mask_cotangents


_shared_2d.defvjp(_shared_fwd, _shared_bwd)
