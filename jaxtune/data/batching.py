"""Batching: tokenized examples -> numpy batches (padded or packed), training and eval order.

Batches follow the Batch contract (docs/architecture.md): dicts of
``tokens, targets, positions, segment_ids`` (int32 [B, T]) and ``loss_mask`` (float32 [B, T]),
``targets[t] = tokens[t+1]`` inside an example, the last token of each example has target
``pad_id`` and mask 0, padding has segment 0, mask 0, position 0 and token ``pad_id``.

* padded (default): one example per row, ``T`` = the longest row of the global batch rounded up
  to a bucket (``bucket="pow2"``: next power of two; an int ``k``: next multiple of ``k``), capped at
  ``max_len``, so jit sees few shapes; rows of similar length are grouped into the same batch;
* packed (``packing=True``): first-fit-decreasing packing of whole examples into rows of exactly
  ``max_len`` tokens (:func:`pack_first_fit`), segment ids ``1..k``, positions restart at 0.

:class:`Batcher` is the training iterator: global batches of ``batch_size`` rows in an order
that depends only on ``(seed, epoch)``, for ``epochs`` epochs or forever. An epoch has
``steps_per_epoch = ceil(rows / batch_size)`` batches: the last one is completed with rows from
the start of the same epoch's order, so every row is seen at least once per epoch and datasets
smaller than a batch work. ``state()`` is ``{"epoch": e, "index": i}`` (JSON-serialisable, the
next batch to yield); ``restore(state)`` continues exactly there. With
``process_index / process_count`` each host gets its contiguous slice of the global batch's rows
(``batch_size / process_count`` rows; the global batch and ``T`` do not depend on the count).

``eval_batches`` walks an eval set once in a fixed order; the last batch is completed with
all-pad rows (loss_mask 0). Numpy only, never JAX.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from jaxtune.data.sources import DataError
from jaxtune.data.tokenize import TokenizedExample

# Padded batches: rows of one global batch are drawn from windows of this many batches, sorted by
# length inside the window, so that batches hold similar lengths (less padding) yet stay random.
LENGTH_GROUP_BATCHES = 32


def pack_first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: rows of example indices whose lengths sum to <= capacity.

    Examples are placed longest first (ties in index order), each into the first row with room,
    found in O(log n) with a max-tree over the rows' free space. Deterministic.
    """
    count = len(lengths)
    leaves = 1
    while leaves < max(count, 1):
        leaves *= 2
    free_tree = [capacity] * (2 * leaves)  # node k covers leaves below it; holds their max free space
    rows: list[list[int]] = []
    for index in sorted(range(count), key=lambda i: -lengths[i]):
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"example {index} has {length} tokens, more than the row capacity {capacity}")
        node = 1
        while node < leaves:
            node = 2 * node if free_tree[2 * node] >= length else 2 * node + 1
        row = node - leaves
        if row == len(rows):
            rows.append([])
        rows[row].append(index)
        free_tree[node] -= length
        node //= 2
        while node:
            free_tree[node] = max(free_tree[2 * node], free_tree[2 * node + 1])
            node //= 2
    return rows


def bucket_len(length: int, max_len: int, bucket: str | int = "pow2") -> int:
    """Padded row length for a batch whose longest row has `length` tokens."""
    if bucket == "pow2":
        padded = 1 << max(length - 1, 0).bit_length()
    elif isinstance(bucket, int) and bucket > 0:
        padded = -(-length // bucket) * bucket
    else:
        raise ValueError(f"bucket must be 'pow2' or a positive int, got {bucket!r}")
    return min(padded, max_len)


def make_batch(rows: Sequence[Sequence[TokenizedExample]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A batch (Batch contract) with one row per entry of `rows`, each holding whole examples."""
    shape = (len(rows), seq_len)
    tokens_BxT = np.full(shape, pad_id, np.int32)
    targets_BxT = np.full(shape, pad_id, np.int32)
    loss_mask_BxT = np.zeros(shape, np.float32)
    positions_BxT = np.zeros(shape, np.int32)
    segment_ids_BxT = np.zeros(shape, np.int32)
    for r, row in enumerate(rows):
        start = 0
        for segment, example in enumerate(row, start=1):
            end = start + len(example)
            if end > seq_len:
                raise ValueError(f"row {r} needs {end} tokens, more than the batch length {seq_len}")
            tokens_BxT[r, start:end] = example.ids
            targets_BxT[r, start:end - 1] = example.ids[1:]
            loss_mask_BxT[r, start:end - 1] = example.trained[1:]
            positions_BxT[r, start:end] = np.arange(len(example))
            segment_ids_BxT[r, start:end] = segment
            start = end
    return {"tokens": tokens_BxT, "targets": targets_BxT, "loss_mask": loss_mask_BxT,
            "positions": positions_BxT, "segment_ids": segment_ids_BxT}


def plan_rows(examples: Sequence[TokenizedExample], max_len: int, packing: bool) -> list[list[int]]:
    """Example indices of each row: one example per row, or packed rows of at most max_len tokens."""
    too_long = [i for i, example in enumerate(examples) if len(example) > max_len]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than max_len={max_len} (first: "
                         f"{examples[too_long[0]].source or too_long[0]}); tokenize with the same max_len")
    if packing:
        return pack_first_fit([len(example) for example in examples], max_len)
    return [[i] for i in range(len(examples))]


def _check_process(batch_size: int, process_index: int, process_count: int) -> int:
    """Rows per process. batch_size is train.batch_size (a DataError names the key); the process
    index and count come from jax.distributed (a ValueError: a bug, not the user's input)."""
    if batch_size < 1:
        raise DataError(f"train.batch_size={batch_size}: must be >= 1")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    if batch_size % process_count:
        raise DataError(f"train.batch_size={batch_size} is not divisible by the {process_count} processes, each of "
                        f"which loads an equal share of every batch: use a multiple of {process_count}")
    return batch_size // process_count


class Batcher:
    """Training batches: shuffled per epoch, deterministic for a seed, resumable, sliced per host.

    Iterating yields this process's slice of each global batch. `state()` / `restore()` give and set
    the position (the next batch to yield) as ``{"epoch": int, "index": int}``.
    """

    def __init__(self, examples: Sequence[TokenizedExample], batch_size: int, max_len: int, pad_id: int, *,
                 seed: int = 0, packing: bool = False, bucket: str | int = "pow2", epochs: int | None = None,
                 process_index: int = 0, process_count: int = 1, group_by_length: bool = True):
        if not examples:
            raise DataError("no training examples to batch: data.train holds none that tokenize to a trained token")
        self.local_rows = _check_process(batch_size, process_index, process_count)
        bucket_len(1, max_len, bucket)  # validates bucket
        self.examples = examples
        self.batch_size = batch_size
        self.max_len = max_len
        self.pad_id = pad_id
        self.seed = seed
        self.packing = packing
        self.bucket = bucket
        self.epochs = epochs
        self.process_index = process_index
        self.process_count = process_count
        self.group_by_length = group_by_length and not packing
        self.rows = plan_rows(examples, max_len, packing)
        self.row_lengths = np.array([sum(len(examples[i]) for i in row) for row in self.rows], np.int64)
        self.steps_per_epoch = math.ceil(len(self.rows) / batch_size)
        self._epoch = 0
        self._index = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def fill(self) -> float:
        """Share of real (non-pad) tokens if every row were max_len long (packing efficiency)."""
        return float(self.row_lengths.sum()) / (len(self.rows) * self.max_len)

    def state(self) -> dict:
        return {"epoch": self._epoch, "index": self._index}

    def restore(self, state: Mapping) -> None:
        """Continue at a saved position (a checkpoint's data position); a DataError if it does not
        fit this data: saved with another training set or batch size."""
        try:
            epoch, index = int(state["epoch"]), int(state["index"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"the saved data position {state!r} is not {{'epoch': int, 'index': int}}: the checkpoint's "
                            f"meta is damaged; resume from another checkpoint or start a new --workdir") from None
        if epoch < 0 or not 0 <= index <= self.steps_per_epoch:
            raise DataError(f"the saved data position {state!r} is out of range for this training data "
                            f"({self.steps_per_epoch} batches per epoch): the checkpoint was saved with another "
                            f"data.train, data.max_len / data.packing or train.batch_size; resume with the run's "
                            f"own settings (its config.json), or train into a new --workdir")
        self._epoch, self._index = (epoch + 1, 0) if index == self.steps_per_epoch else (epoch, index)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row indices of every global batch of an epoch: int [steps_per_epoch, batch_size]."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = np.resize(rng.permutation(len(self.rows)), self.steps_per_epoch * self.batch_size)
        if self.group_by_length:
            window = self.batch_size * LENGTH_GROUP_BATCHES
            for start in range(0, len(order), window):
                chunk = order[start:start + window]
                order[start:start + window] = chunk[np.argsort(-self.row_lengths[chunk], kind="stable")]
            order_SxB = order.reshape(self.steps_per_epoch, self.batch_size)[rng.permutation(self.steps_per_epoch)]
        else:
            order_SxB = order.reshape(self.steps_per_epoch, self.batch_size)
        self._order_cache = (epoch, order_SxB)
        return order_SxB

    def global_rows(self, epoch: int, index: int) -> np.ndarray:
        return self.epoch_order(epoch)[index]

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch `index` of `epoch` (a pure function of its arguments)."""
        global_rows = self.global_rows(epoch, index)
        seq_len = self.max_len if self.packing else bucket_len(int(self.row_lengths[global_rows].max()),
                                                               self.max_len, self.bucket)
        local = global_rows[self.process_index * self.local_rows:(self.process_index + 1) * self.local_rows]
        rows = [[self.examples[i] for i in self.rows[r]] for r in local]
        return make_batch(rows, seq_len, self.pad_id)

    def __iter__(self) -> Batcher:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.epochs is not None and self._epoch >= self.epochs:
            raise StopIteration
        batch = self.batch(self._epoch, self._index)
        self._index += 1
        if self._index == self.steps_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        return batch


def eval_batches(examples: Sequence[TokenizedExample], batch_size: int, max_len: int, pad_id: int, *,
                 packing: bool = False, bucket: str | int = "pow2", process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Each eval example exactly once, in a fixed order; the last batch is completed with pad rows."""
    local_rows = _check_process(batch_size, process_index, process_count)
    rows = plan_rows(examples, max_len, packing)
    for start in range(0, len(rows), batch_size):
        global_rows = [[examples[i] for i in row] for row in rows[start:start + batch_size]]
        longest = max(sum(len(example) for example in row) for row in global_rows)
        global_rows += [[] for _ in range(batch_size - len(global_rows))]
        seq_len = max_len if packing else bucket_len(longest, max_len, bucket)
        local = global_rows[process_index * local_rows:(process_index + 1) * local_rows]
        yield make_batch(local, seq_len, pad_id)
