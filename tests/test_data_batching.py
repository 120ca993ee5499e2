"""jaxtune.data.batching: the Batch contract, first-fit packing, buckets, the Batcher's order, resume and
host slices, eval batches."""

import json

import numpy as np
import pytest

from conftest import chat
from jaxtune import data
from jaxtune.data import TokenizedExample


def example(ids, trained):
    return TokenizedExample(np.asarray(ids, np.int32), np.asarray(trained, bool))


A = example([5, 6, 7, 8], [0, 0, 1, 1])
B = example([9, 10, 11], [0, 1, 1])


def test_make_batch_exact_contents():
    batch = data.make_batch([[A, B], [B], []], seq_len=8, pad_id=99)
    assert {k: v.dtype for k, v in batch.items()} == {"tokens": np.int32, "targets": np.int32,
                                                      "loss_mask": np.float32, "positions": np.int32,
                                                      "segment_ids": np.int32}
    np.testing.assert_array_equal(batch["tokens"], [[5, 6, 7, 8, 9, 10, 11, 99],
                                                    [9, 10, 11, 99, 99, 99, 99, 99], [99] * 8])
    np.testing.assert_array_equal(batch["targets"], [[6, 7, 8, 99, 10, 11, 99, 99],
                                                     [10, 11, 99, 99, 99, 99, 99, 99], [99] * 8])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0, 1, 1, 0, 0],
                                                       [1, 1, 0, 0, 0, 0, 0, 0], [0] * 8])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 0, 1, 2, 0],
                                                       [0, 1, 2, 0, 0, 0, 0, 0], [0] * 8])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 2, 2, 2, 0],
                                                         [1, 1, 1, 0, 0, 0, 0, 0], [0] * 8])
    with pytest.raises(ValueError, match="more than the batch length"):
        data.make_batch([[A, B]], seq_len=6, pad_id=0)


def check_contract(batch, pad_id):
    """Batch-contract invariants that hold for any batch."""
    tokens, targets, mask = batch["tokens"], batch["targets"], batch["loss_mask"]
    positions, segments = batch["positions"], batch["segment_ids"]
    assert len({v.shape for v in batch.values()}) == 1
    same_next = (segments[:, :-1] == segments[:, 1:]) & (segments[:, :-1] > 0)
    np.testing.assert_array_equal(targets[:, :-1][same_next], tokens[:, 1:][same_next])
    assert not mask[:, -1].any()
    assert not mask[:, :-1][~same_next].any()  # no loss across examples, on last tokens or on pad
    assert (tokens[segments == 0] == pad_id).all() and (positions[segments == 0] == 0).all()
    starts = (segments > 0) & np.concatenate([np.ones_like(segments[:, :1], bool),
                                              segments[:, 1:] != segments[:, :-1]], axis=1)
    assert (positions[starts] == 0).all()
    inner = (segments[:, 1:] > 0) & ~starts[:, 1:]
    np.testing.assert_array_equal(positions[:, 1:][inner], positions[:, :-1][inner] + 1)


def random_examples(count, seed=0, low=2, high=30):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = int(rng.integers(low, high))
        ids = rng.integers(1, 1000, n)
        ids[0] = 100_000 + i  # first token identifies the example
        out.append(example(ids, rng.random(n) < 0.7))
    return out


def first_tokens(batch):
    """Example ids (first tokens) in a batch, row by row."""
    starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
    return [batch["tokens"][r][starts[r]].tolist() for r in range(len(starts))]


def test_pack_first_fit_exact_and_matches_reference():
    assert data.pack_first_fit([5, 3, 4, 2, 6, 1], 8) == [[4, 3], [0, 1], [2, 5]]
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 64, 300).tolist()
    reference_rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), len(free))
        if row == len(free):
            reference_rows.append([])
            free.append(64)
        reference_rows[row].append(i)
        free[row] -= lengths[i]
    assert data.pack_first_fit(lengths, 64) == reference_rows
    with pytest.raises(ValueError):
        data.pack_first_fit([9], 8)


@pytest.mark.parametrize("length,max_len,bucket,padded", [
    (5, 64, "pow2", 8), (64, 512, "pow2", 64), (65, 100, "pow2", 100), (1, 8, "pow2", 1),
    (70, 512, 64, 128), (64, 512, 64, 64), (70, 100, 64, 100)])
def test_bucket_len(length, max_len, bucket, padded):
    assert data.bucket_len(length, max_len, bucket) == padded


@pytest.mark.parametrize("packing", [False, True])
def test_batcher_epoch_covers_every_example_and_keeps_the_contract(packing):
    examples = random_examples(37)
    batcher = data.Batcher(examples, batch_size=4, max_len=32, pad_id=0, seed=3, packing=packing, epochs=1)
    batches = list(batcher)
    assert len(batches) == batcher.steps_per_epoch == -(-len(batcher.rows) // 4)
    seen = [e for b in batches for row in first_tokens(b) for e in row]
    assert set(seen) == {100_000 + i for i in range(37)}
    visited = batcher.epoch_order(0).flatten()  # every row once, then a few again to fill the last batch
    assert sorted(set(visited.tolist())) == list(range(len(batcher.rows)))
    assert len(visited) == 4 * batcher.steps_per_epoch
    assert len(seen) == sum(len(batcher.rows[r]) for r in visited)
    for batch in batches:
        check_contract(batch, pad_id=0)
        assert batch["tokens"].shape[0] == 4
        if packing:
            assert batch["tokens"].shape[1] == 32
        else:
            longest = int((batch["segment_ids"] > 0).sum(1).max())
            assert batch["tokens"].shape[1] == data.bucket_len(longest, 32)
    if packing:
        assert len(batcher.rows) < 37 and 0.5 < batcher.fill <= 1.0
    # The loss falls on exactly the trained tokens of the rows the epoch visits.
    total_trained = sum(int(examples[i].trained[1:].sum()) for r in visited for i in batcher.rows[r])
    assert sum(b["loss_mask"].sum() for b in batches) == total_trained


def test_batcher_batch_holds_the_examples_tokens():
    batcher = data.Batcher([A, B], batch_size=2, max_len=8, pad_id=99, seed=0, packing=True)
    batch = next(batcher)
    np.testing.assert_array_equal(batch["tokens"], [[5, 6, 7, 8, 9, 10, 11, 99]] * 2)  # 1 row, wrapped
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0, 1, 1, 0, 0]] * 2)


def test_batcher_is_deterministic_and_shuffles_per_epoch():
    examples = random_examples(40)

    def run(seed, steps):
        batcher = data.Batcher(examples, batch_size=4, max_len=32, pad_id=0, seed=seed)
        return [first_tokens(next(batcher)) for _ in range(steps)]

    assert run(0, 20) == run(0, 20)
    assert run(0, 10) != run(1, 10)
    epoch0, epoch1 = run(0, 20)[:10], run(0, 20)[10:]
    assert epoch0 != epoch1
    assert sorted(sum(sum(epoch0, []), [])) == sorted(sum(sum(epoch1, []), []))


def test_batcher_groups_lengths_in_padded_mode():
    examples = [example(np.arange(n) + 1, [0] + [1] * (n - 1)) for n in range(2, 18)]  # lengths 2..17
    batcher = data.Batcher(examples, batch_size=4, max_len=32, pad_id=0, seed=5, epochs=1)
    groups = sorted(sorted(((b["segment_ids"] > 0).sum(1)).tolist()) for b in batcher)
    assert groups == [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13], [14, 15, 16, 17]]
    shapes = [b["tokens"].shape[1] for b in data.Batcher(examples, 4, 32, 0, seed=5, epochs=1)]
    assert sorted(shapes) == [8, 16, 16, 32]


@pytest.mark.parametrize("packing", [False, True])
def test_batcher_resumes_exactly(packing):
    examples = random_examples(23)
    options = dict(batch_size=4, max_len=32, pad_id=0, seed=7, packing=packing)
    reference = data.Batcher(examples, **options)
    expected_batches = [next(reference) for _ in range(17)]  # crosses epoch boundaries
    for stop in (0, 3, reference.steps_per_epoch, 11):
        first = data.Batcher(examples, **options)
        for _ in range(stop):
            next(first)
        state = json.loads(json.dumps(first.state()))
        resumed = data.Batcher(examples, **options)
        resumed.restore(state)
        for want in expected_batches[stop:]:
            got = next(resumed)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
    # A checkpoint's position that does not fit this data is the user's to fix: a DataError (still a ValueError).
    with pytest.raises(data.DataError, match=r"out of range .*train.batch_size; resume with the run's own settings"):
        resumed.restore({"epoch": 0, "index": 999})
    with pytest.raises(data.DataError, match="epoch"):
        resumed.restore({"step": 3})


def test_batcher_epochs_limit():
    batcher = data.Batcher(random_examples(10), batch_size=4, max_len=32, pad_id=0, epochs=2)
    assert len(list(batcher)) == 2 * 3
    assert batcher.state() == {"epoch": 2, "index": 0}


@pytest.mark.parametrize("packing", [False, True])
def test_multi_host_slices_concatenate_to_the_global_batch(packing):
    examples = random_examples(50)
    options = dict(batch_size=8, max_len=32, pad_id=0, seed=11, packing=packing)
    single = data.Batcher(examples, **options)
    global_batches = [next(single) for _ in range(6)]
    for count in (2, 4, 8):
        hosts = [data.Batcher(examples, **options, process_index=i, process_count=count) for i in range(count)]
        for want in global_batches:
            parts = [next(host) for host in hosts]
            assert {p["tokens"].shape for p in parts} == {(8 // count, want["tokens"].shape[1])}
            for key in want:
                np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
    with pytest.raises(data.DataError, match=r"train.batch_size=6 is not divisible by the 4 processes.*multiple of 4"):
        data.Batcher(examples, batch_size=6, max_len=32, pad_id=0, process_count=4)
    with pytest.raises(data.DataError, match="train.batch_size=0"):
        data.Batcher(examples, batch_size=0, max_len=32, pad_id=0)
    with pytest.raises(data.DataError, match="no training examples"):
        data.Batcher([], batch_size=4, max_len=32, pad_id=0)


@pytest.mark.parametrize("packing", [False, True])
def test_eval_batches_cover_the_set_once_with_pad_rows(packing):
    examples = random_examples(5, seed=2, high=12)
    batches = list(data.eval_batches(examples, batch_size=2, max_len=16, pad_id=0, packing=packing))
    seen = [e for b in batches for row in first_tokens(b) for e in row]
    assert sorted(seen) == [100_000 + i for i in range(5)]
    if not packing:
        assert seen == [100_000 + i for i in range(5)] and len(batches) == 3
        last = batches[-1]
        assert last["segment_ids"][1].sum() == 0 and last["loss_mask"][1].sum() == 0
    assert sum(b["loss_mask"].sum() for b in batches) == sum(int(e.trained[1:].sum()) for e in examples)
    for batch in batches:
        check_contract(batch, pad_id=0)
    halves = [list(data.eval_batches(examples, 2, 16, 0, packing=packing, process_index=i, process_count=2))
              for i in range(2)]
    for want, part0, part1 in zip(batches, *halves):
        np.testing.assert_array_equal(np.concatenate([part0["tokens"], part1["tokens"]]), want["tokens"])


def test_pad_never_trained_even_when_pad_is_eos(chatml):
    # SmolLM2 pads with <|im_end|> = EOS: trained EOS targets must still come from real tokens.
    pad_id = chatml.eos_token_id
    examples, _ = data.tokenize_examples(
        [chat(("user", "hello"), ("assistant", "world")), chat(("user", "a b c d e f"), ("assistant", "four"))],
        chatml, max_len=64)
    for packing in (False, True):
        batch = next(data.Batcher(examples, batch_size=2, max_len=64, pad_id=pad_id, packing=packing))
        check_contract(batch, pad_id)
        trained = batch["loss_mask"] == 1
        assert (batch["segment_ids"][trained] > 0).all()
        assert (np.roll(batch["segment_ids"], -1, axis=1)[trained] == batch["segment_ids"][trained]).all()
        examples_in_batch = ((batch["positions"] == 0) & (batch["segment_ids"] > 0)).sum()
        assert (batch["targets"][trained] == pad_id).sum() == examples_in_batch  # each one's real <|im_end|>
