"""Causal, segment-aware attention for training and scoring (no KV cache), with a hand-written backward.

    out = softmax(q k^T * scale, masked) v         q [B, T, H, Dh], k/v [B, S, K, Dh], mask [B, 1, T, S]

Grouped-query heads are computed without repeating k/v (q viewed as [B, T, K, G, Dh]). The
forward is jax.nn.dot_product_attention's XLA math (float32 scores, masked with float32's min,
softmax, probabilities cast to v's dtype). Only the softmax's row max and row sum are saved; the
backward recomputes the probabilities P from them (bit-identical) and applies
    dV = P^T dO      dP = dO V^T      dS = P * (dP - rowsum(dO * O)) * scale      dQ = dS K      dK = dS^T Q
which is what autodiff computes too, without storing [B, H, T, S] probabilities per layer
(283 MiB for SmolLM2-135M at 4 x 256) or autodiff's extra passes over them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xTxS, scale: float):
    """[B, T, H, Dh] attention output; mask True where query t may attend key s."""
    B, T, H, Dh = q_BxTxHxDh.shape
    S, K = k_BxSxKxDh.shape[1], k_BxSxKxDh.shape[2]
    G = H // K
    # Heads to the front, the G query heads of one kv head stacked along the rows: every dot below
    # is then a batched [rows, Dh] x [Dh, S]-style matmul with one contracting axis (XLA:CPU runs
    # dots with several contracting or trailing batch axes far slower).
    q_NxGTxDh = q_BxTxHxDh.reshape(B, T, K, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B * K, G * T, Dh)
    k_NxSxDh = k_BxSxKxDh.transpose(0, 2, 1, 3).reshape(B * K, S, Dh)
    v_NxSxDh = v_BxSxKxDh.transpose(0, 2, 1, 3).reshape(B * K, S, Dh)
    out_NxGTxDh = _attention(float(scale), (B, K, G), q_NxGTxDh, k_NxSxDh, v_NxSxDh, mask_Bx1xTxS)
    return out_NxGTxDh.reshape(B, K, G, T, Dh).transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)


def _grouped_mask(shape, mask_Bx1xTxS):
    B, K, G = shape
    T, S = mask_Bx1xTxS.shape[-2:]
    return jnp.broadcast_to(mask_Bx1xTxS[:, :, None], (B, K, G, T, S)).reshape(B * K, G * T, S)


def _masked_scores(scale, q, k, mask_NxGTxS):
    scores_NxGTxS = jnp.einsum("nqd,nsd->nqs", q, k, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask_NxGTxS, scores_NxGTxS, jnp.finfo(jnp.float32).min)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(scale, shape, q, k, v, mask):
    return _fwd(scale, shape, q, k, v, mask)[0]


def _fwd(scale, shape, q, k, v, mask):
    scores = _masked_scores(scale, q, k, _grouped_mask(shape, mask))
    # jax.nn.softmax's arithmetic, with its row max and row sum kept ([N, GT] each) so the backward
    # recomputes the same probabilities instead of storing [N, GT, S] of them for every layer.
    row_max = jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))
    unnormalized = jnp.exp(scores - row_max)
    row_sum = unnormalized.sum(axis=-1, keepdims=True)
    p = (unnormalized / row_sum).astype(v.dtype)
    out = jnp.einsum("nqs,nsd->nqd", p, v)
    return out, (q, k, v, mask, row_max, row_sum, out)


def _bwd(scale, shape, residuals, dout):
    q, k, v, mask, row_max, row_sum, out = residuals
    f32 = jnp.float32
    mask_NxGTxS = _grouped_mask(shape, mask)
    p = (jnp.exp(_masked_scores(scale, q, k, mask_NxGTxS) - row_max) / row_sum).astype(v.dtype)
    dv = jnp.einsum("nqs,nqd->nsd", p, dout)
    dp = jnp.einsum("nqd,nsd->nqs", dout, v, preferred_element_type=f32)
    delta_NxGT = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1)
    # Masked scores are constants: no gradient (it matters for fully masked rows, whose P is uniform).
    ds = jnp.where(mask_NxGTxS, p.astype(f32) * (dp - delta_NxGT[..., None]) * scale, 0.0).astype(q.dtype)
    dq = jnp.einsum("nqs,nsd->nqd", ds, k)
    dk = jnp.einsum("nqs,nqd->nsd", ds, q)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_fwd, _bwd)
