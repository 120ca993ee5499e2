"""Per-row LoRA deltas: many adapters over one base in one batch, each row with its own adapter.

A Linear whose params carry an adapter bank (`jaxtune.multi_adapter` builds it) computes

    y[b] = x[b] W (+ bias) + x[b] A[:, cols(b)] B[cols(b), :]

without ever forming a per-row weight matrix W + A B. The bank packs every adapter's rank components
side by side as columns: an adapter of rank r owns r of the bank's C rank columns (any r, not
necessarily adjacent), its scaling folded into its rows of B. No rank is padded to the largest and
the base model owns no column (rows of the base select none), so C is the sum of the loaded ranks
(plus free columns, zero, for adapters loaded later). Its leaves, next to the Linear's `kernel`:

    lora_bank_a [in, C]       lora_bank_b [C, out]
    lora_rows [B] int32           the adapter slot of each row (0: the base model)
    lora_columns [C] int32        the slot owning each column (-1: free)
    lora_row_columns [B, R] int32 each row's columns in order, then C (none) up to the bank's max rank R

(each with a leading layer axis L under the scanned `model/layers`). The three index leaves are inputs
of the compiled program like the tokens, so one program serves every mix of adapters in a batch.

Two ways to compute the delta, both here and tested equal (`benchmarks/bench_serve.py` measures them in
one process at the real model's shapes, and the whole decode step with each):
  * `all_columns_delta`: x [B*T, in] @ A [in, C] -> every adapter's h at once, each row keeping its
    own columns (the others multiplied by 0), then @ B [C, out]. Two plain 2-D matmuls that read the
    bank once per step whatever the batch; their FLOPs are B*T*C*(in + out): every row pays for the
    sum of the ranks, so packing (C = the sum of the ranks, not slots x the largest rank) is what keeps
    it cheap.
  * `gathered_delta` (BGMV, Punica's batched gather): gather each row's R columns of A and B, then two
    batched einsums. Its FLOPs are B*T*R*(in + out), independent of how many adapters are loaded, but
    it copies B*R*(in + out) floats per projection and its per-row products are thin.
`bank_dense` takes all-columns for decoding (one token per row: the gather's copies, in the whole decode
step, cost more than the extra FLOPs) and the gathered form for the prefill (many tokens per row share
each row's gathered A and B, while all-columns' FLOPs grow with C for every token: 64 rows x 31 tokens,
576 -> 1536, 68 columns, 3.1 ms gathered vs 7.5 ms all-columns against 36 ms for x W, process CPU time).
Measured on SmolLM2-135M, 8 adapters of ranks 4/8/16, float32, 2 cores (2026-11-30 20:31 UTC, one
process, variants interleaved, best of 8 rounds of 8 steps, a 40-slot cache; the machine shared, load
average 3.0-3.8, so at batch 64 the step ran on about one core, wall ~ CPU time): batch 64, the base
240.5 ms/step (CPU 239.3), the packed 68 columns 280.0 (CPU 278.7), +16%; batch 8, 40.2 (CPU 67.4) and
46.5 (CPU 77.3), +16% (+15% CPU). An earlier run (load 5-8) put 128 columns (8 slots padded to rank 16,
about the padded layout this replaced, which also gave the base a zero slot: 144 columns) at +29% of
the base's CPU time at batch 64 and +31% at batch 8. With C = the ranks' sum, the extra is about the
adapters' share of the step's FLOPs (68 x (in + out) multiply-adds per row and projection: ~15% of the
step's, head included): the A side (x A) and the B side (h B) each cost about half of it (an earlier run,
load 3.2: each alone added ~20 ms of CPU at batch 64, the own-columns mask ~3 ms), so what is left is
arithmetic, not overhead.
Tried in that same process at batch 64 / batch 8 and not kept, none being faster than the plain per-target
form above (280.0 / 46.5 ms):
  * shared-input fusion: q/k/v's (and gate/up's) A sides as one x [in, 3C] ([in, 2C]) dot with one mask,
    each B apart: 284.2 / 47.4. The fused [64, 204] dot took as long as the three [64, 68] dots it
    replaced (op profile: ~22 ms of A-side dots per step either way), so fewer dots buy nothing (the
    [A_q | A_k | A_v] concatenation, made here once per decode call, ~3 ms a step: stored that way it
    would still be no faster);
  * the same with the group's B sides as one block-diagonal dot: 304.2 / 50.5 (3x the B side's FLOPs);
  * A stored [C, in] and B [out, C]: 279.1 / 47.1, the same program (XLA folds a transpose of a dot's
    operand into its dimension numbers);
  * the delta added to x W in 2-D before the [B, T, out] reshape: 279.2 / 46.0, within noise (the layout
    copy of the 3-D add becomes a 2-D add of the same cost);
  * both dots with a transposed lhs, which XLA:CPU gives to its own dot instead of YNNPACK: slower (gate
    shape alone: 292 vs 268 us at batch 64, 107 vs 72 us at batch 8);
  * the gathered form in decoding at batch 8 too (its copies are 8x smaller than at 64): 105.7 vs 78.5
    ms/step (load 3.4).
The mask is built once per decode call already: the rows' and columns' slots are loop-invariant, and XLA
hoists the compare out of the decode loop, so one mask per layer or per step would change nothing.
(A `jax.lax.ragged_dot` grouped form, SGMV, was measured here before packing: XLA:CPU expands it into
dense dots over every group with the other groups' rows masked, plus a sort and a scatter, and it was
the slowest form in every case, 1.5x to 40x the fastest; it needs a per-slot [slots, in, R] layout,
which packing removes, so it is gone.)
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxtune.models.kernels import dense

BANK_A = "lora_bank_a"
BANK_B = "lora_bank_b"
ROWS = "lora_rows"
COLUMNS = "lora_columns"
ROW_COLUMNS = "lora_row_columns"
INDEX_LEAVES = (ROWS, COLUMNS, ROW_COLUMNS)


def own_columns(rows_B, columns_C, dtype):
    """[B, C] 1 where column c belongs to row b's adapter, else 0 (rows of the base own none)."""
    return (rows_B[:, None] == columns_C[None, :]).astype(dtype)


def all_columns_delta(x_BxTxI, a_IxC, b_CxO, bank: dict, *, dtype: Any):
    """x [B*T, in] @ A [in, C], each row's own columns kept (the others zeroed), @ B [C, out] -> [B, T, out]."""
    B, T, I = x_BxTxI.shape
    C = a_IxC.shape[1]
    h_BxTxC = jnp.dot(x_BxTxI.reshape(B * T, I).astype(dtype), a_IxC.astype(dtype)).reshape(B, T, C)
    h_BxTxC = h_BxTxC * own_columns(bank[ROWS], bank[COLUMNS], dtype)[:, None, :]
    return jnp.dot(h_BxTxC.reshape(B * T, C), b_CxO.astype(dtype)).reshape(B, T, -1)


def gathered_delta(x_BxTxI, a_IxC, b_CxO, bank: dict, *, dtype: Any):
    """BGMV: each row's columns of A and B gathered (index C, past the end: zeros), two batched einsums."""
    columns_BxR = bank[ROW_COLUMNS]
    a_IxBxR = jnp.take(a_IxC, columns_BxR, axis=1, mode="fill", fill_value=0).astype(dtype)
    b_BxRxO = jnp.take(b_CxO, columns_BxR, axis=0, mode="fill", fill_value=0).astype(dtype)
    h_BxTxR = jnp.einsum("bti,ibr->btr", x_BxTxI.astype(dtype), a_IxBxR)
    return jnp.einsum("btr,bro->bto", h_BxTxR, b_BxRxO)


def delta_kernel(tokens_per_row: int):
    """The faster per-row delta for these static shapes: `all_columns_delta` when decoding (one token
    per row), `gathered_delta` for a prefill (several tokens per row)."""
    return all_columns_delta if tokens_per_row == 1 else gathered_delta


def bank_dense(x_BxTxI, kernel_IxO, bias_O, bank: dict, *, dtype: Any):
    """x W (+ bias) + the per-row delta of `bank` (the leaves listed in the module docstring)."""
    delta = delta_kernel(x_BxTxI.shape[1])
    delta_BxTxO = delta(x_BxTxI, bank[BANK_A], bank[BANK_B], bank, dtype=dtype)
    return dense(x_BxTxI, kernel_IxO, bias_O, dtype=dtype) + delta_BxTxO
