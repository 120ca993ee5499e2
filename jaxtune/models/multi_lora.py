"""Per-row LoRA deltas: many adapters over one base in one batch, each row with its own adapter.

A Linear whose params carry an adapter bank (`jaxtune.multi_adapter` builds it) computes

    y[b] = x[b] W (+ bias) + x[b] A[rows[b]] B[rows[b]]

without ever forming a per-row weight matrix W + A B. The bank holds N adapter slots, ranks padded
with zeros to the largest rank R (exact: a zero column of A times a zero row of B adds nothing) and
each adapter's scaling folded into its B; slot 0 is all zeros (the base model, no adapter). Its leaves,
next to the Linear's `kernel`:

    lora_bank_a [in, N, R]     lora_bank_b [N, R, out]     lora_rows [B] int32 (the slot of each row)

(each with a leading layer axis L under the scanned `model/layers`). A is laid out [in, N, R] so that
it is, without a copy, the [in, N*R] matrix of `all_slots_delta`; B [N, R, out] is [N*R, out] as it is.
`lora_rows` is an input of the compiled program like the tokens, so one program serves every mix of
adapters in a batch.

Three ways to compute the delta, all here and tested equal (`benchmarks/bench_serve.py` measures them
in one process at the real model's shapes, and the whole decode step with each):
  * `all_slots_delta`: x [B*T, in] @ A [in, N*R] -> every slot's h at once, each row keeps its own
    slot's R columns (the others are multiplied by 0), then @ B [N*R, out]. Two plain 2-D matmuls: it
    reads each slot's A and B once per step, whatever the batch, and its FLOPs are N times those of
    one adapter per row (B*T*N*R*(in + out) multiply-adds).
  * `gathered_delta` (BGMV, Punica's batched gather): gather each row's A and B, then two batched
    einsums. Its FLOPs do not grow with N, but it copies B*R*(in + out) floats per layer and step, and
    its per-row products are matrix-vector products when T is 1.
  * `grouped_delta` (SGMV, S-LoRA/Punica's segmented matmul): sort the rows by slot and run
    `jax.lax.ragged_dot` over the N groups, then unsort. XLA:CPU has no grouped matmul: `ragged_dot` is
    expanded into dense dots over all N groups with the other groups' rows masked out, so its cost is
    all-slots' FLOPs on T*B*N rows plus a sort and a scatter back: the slowest form in every case
    measured on this CPU (1.5x to 40x the fastest). It stays as the measured alternative for an
    accelerator with a native grouped matmul (TPU megablox, GPU Punica-style kernels).
`bank_dense` takes all-slots while tokens per row x slots <= ALL_SLOTS_MAX_TOKEN_SLOTS (decoding, one
token per row, with up to 64 slots), else the gathered form (prefill: many tokens per row share each
gathered A and B, while all-slots' FLOPs would be N times the adapter's). Measured on this 2-core CPU
(2026-11-30, machine loaded: load average 4 to 25, so only ratios within one process are meaningful),
gate/up shape, rank 16, 9 slots: decode, 8 rows x 1 token, the two were even in isolation (0.15 ms)
and 64 x 1 all-slots 0.54 ms vs gathered 0.66 ms; prefill 8 x 31 gathered 0.48 ms vs all-slots
1.6 ms. What decides decoding is the whole step, where the gather's copies compete with the base
weights for memory bandwidth: at batch 8 a step took 257 ms with all-slots and 332 ms gathered
(base alone 195 ms, one adapter through the ordinary LoRA path 194 ms).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxtune.models.kernels import dense

BANK_A = "lora_bank_a"
BANK_B = "lora_bank_b"
ROWS = "lora_rows"
ALL_SLOTS_MAX_TOKEN_SLOTS = 16


def gathered_delta(x_BxTxI, a_IxNxR, b_NxRxO, rows_B, *, dtype: Any):
    """BGMV: x[b] A[rows[b]] B[rows[b]] for every row b, each row's A and B gathered -> [B, T, out]."""
    a_IxBxR = jnp.take(a_IxNxR, rows_B, axis=1).astype(dtype)
    b_BxRxO = jnp.take(b_NxRxO, rows_B, axis=0).astype(dtype)
    h_BxTxR = jnp.einsum("bti,ibr->btr", x_BxTxI.astype(dtype), a_IxBxR)
    return jnp.einsum("btr,bro->bto", h_BxTxR, b_BxRxO)


def all_slots_delta(x_BxTxI, a_IxNxR, b_NxRxO, rows_B, *, dtype: Any):
    """The same delta from every slot at once: x [B*T, in] @ A [in, N*R], each row's own slot's R
    columns kept (the others zeroed), then @ B [N*R, out]. Two plain 2-D matmuls, no gather."""
    B, T, I = x_BxTxI.shape
    _, N, R = a_IxNxR.shape
    h_MxNR = jnp.dot(x_BxTxI.reshape(B * T, I).astype(dtype), a_IxNxR.reshape(I, N * R).astype(dtype))
    own_BxN = (rows_B[:, None] == jnp.arange(N, dtype=rows_B.dtype)[None, :]).astype(dtype)
    h_BxTxNxR = h_MxNR.reshape(B, T, N, R) * own_BxN[:, None, :, None]
    delta_MxO = jnp.dot(h_BxTxNxR.reshape(B * T, N * R), b_NxRxO.reshape(N * R, -1).astype(dtype))
    return delta_MxO.reshape(B, T, -1)


def grouped_delta(x_BxTxI, a_IxNxR, b_NxRxO, rows_B, *, dtype: Any):
    """SGMV: the same delta, rows sorted by slot, `jax.lax.ragged_dot` per group."""
    B, T, I = x_BxTxI.shape
    N = a_IxNxR.shape[1]
    order_B = jnp.argsort(rows_B, stable=True)
    x_MxI = jnp.take(x_BxTxI, order_B, axis=0).reshape(B * T, I).astype(dtype)
    group_sizes_N = (jnp.bincount(rows_B, length=N) * T).astype(jnp.int32)
    h_MxR = jax.lax.ragged_dot(x_MxI, jnp.moveaxis(a_IxNxR, 1, 0).astype(dtype), group_sizes_N)
    delta_MxO = jax.lax.ragged_dot(h_MxR, b_NxRxO.astype(dtype), group_sizes_N)
    sorted_BxTxO = delta_MxO.reshape(B, T, -1)
    return jnp.zeros_like(sorted_BxTxO).at[order_B].set(sorted_BxTxO)


def delta_kernel(tokens_per_row: int, slots: int):
    """The faster per-row delta for these static shapes: `all_slots_delta` while tokens x slots is at
    most ALL_SLOTS_MAX_TOKEN_SLOTS (decoding: 1 token per row), else `gathered_delta` (prefill)."""
    return all_slots_delta if tokens_per_row * slots <= ALL_SLOTS_MAX_TOKEN_SLOTS else gathered_delta


def bank_dense(x_BxTxI, kernel_IxO, bias_O, bank: dict, *, dtype: Any):
    """x W (+ bias) + the per-row delta of `bank` ({lora_bank_a, lora_bank_b, lora_rows} leaves)."""
    delta = delta_kernel(x_BxTxI.shape[1], bank[BANK_A].shape[1])
    delta_BxTxO = delta(x_BxTxI, bank[BANK_A], bank[BANK_B], bank[ROWS], dtype=dtype)
    return dense(x_BxTxI, kernel_IxO, bias_O, dtype=dtype) + delta_BxTxO
