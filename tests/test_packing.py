"""Packing: a packed row gives each example the loss it has alone, attention never crosses segments,
positions restart per example, and a packed run trains end to end through train.run."""

import json

import jax
import numpy as np

from conftest import tiny_config, write_jsonl
from jaxtune import api, data, step

PAD = 0


def examples(seed=0, lengths=(9, 7, 11), id_ranges=((10, 60), (60, 110), (110, 160))):
    """Examples whose token ids come from disjoint ranges (so embedding rows belong to one example)."""
    rng = np.random.default_rng(seed)
    out = []
    for n, (low, high) in zip(lengths, id_ranges):
        trained = np.arange(n) >= n // 3
        out.append(data.TokenizedExample(rng.integers(low, high, n).astype(np.int32), trained, f"ex{len(out)}"))
    return out


def only_segment(batch, segment):
    """The batch with the loss mask kept on one segment only."""
    return {**batch, "loss_mask": batch["loss_mask"] * (batch["segment_ids"] == segment)}


def per_example_loss(params, cfg, batch, segment):
    total, _ = step.summed_loss(params, {}, only_segment(batch, segment), cfg, jax.random.key(0), True)
    return total


def test_packed_row_gives_each_example_its_unpacked_loss(tiny_models):
    model = api.load(str(tiny_models("llama2")[0]), with_tokenizer=False)
    exs = examples()
    packed = data.make_batch([exs], 32, PAD)
    padded = data.make_batch([[e] for e in exs], 32, PAD)
    assert packed["segment_ids"].max() == 3 and padded["segment_ids"].max() == 1
    for k in range(3):
        alone = {key: value[k:k + 1] for key, value in padded.items()}
        want = float(per_example_loss(model.params, model.cfg, alone, 1))
        got = float(per_example_loss(model.params, model.cfg, packed, k + 1))
        assert want > 1.0
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_no_gradient_and_no_logit_change_crosses_segments(tiny_models):
    model = api.load(str(tiny_models("llama2")[0]), with_tokenizer=False)  # untied: embedding rows = inputs only
    batch = data.make_batch([examples()], 32, PAD)

    def loss_of_segment_2(embedding):
        params = {**model.params, "model": {**model.params["model"], "embed_tokens": {"embedding": embedding}}}
        return per_example_loss(params, model.cfg, batch, 2)

    grad_VxD = np.asarray(jax.grad(loss_of_segment_2)(model.params["model"]["embed_tokens"]["embedding"]))
    rows_of = {s: np.unique(batch["tokens"][batch["segment_ids"] == s]) for s in (1, 2, 3)}
    assert np.all(grad_VxD[rows_of[1]] == 0.0), "segment 2's loss must not see segment 1's tokens"
    assert np.all(grad_VxD[rows_of[3]] == 0.0), "nor the tokens after it"
    assert np.abs(grad_VxD[rows_of[2]]).max() > 0.0

    # Other tokens in segment 1 leave segments 2 and 3 bit-identical.
    changed = {**batch, "tokens": np.where(batch["segment_ids"] == 1, (batch["tokens"] + 7) % 256, batch["tokens"])}
    forward = jax.jit(lambda b: model.module.apply({"params": model.params}, b["tokens"], b["positions"],
                                                   b["segment_ids"])[0])
    before, after = np.asarray(forward(batch)), np.asarray(forward(changed))
    later = batch["segment_ids"][0] >= 2
    assert np.array_equal(before[0, later], after[0, later])
    assert not np.array_equal(before[0, ~later], after[0, ~later])


def test_positions_restart_at_each_packed_example():
    exs = examples(lengths=(5, 3, 6, 4, 7, 2))
    batch = next(data.Batcher(exs, batch_size=2, max_len=16, pad_id=PAD, packing=True, seed=0))
    for r in range(2):
        segments, positions = batch["segment_ids"][r], batch["positions"][r]
        assert segments.max() >= 2
        for s in range(1, segments.max() + 1):
            np.testing.assert_array_equal(positions[segments == s], np.arange(np.sum(segments == s)))
        assert np.all(positions[segments == 0] == 0)
        # targets stay inside their example: the last token of each segment has no trained target
        ends = np.flatnonzero(np.diff(np.append(segments, 0)) != 0)
        assert np.all(batch["loss_mask"][r, ends] == 0)


def chat_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "cat", "dog", "tree", "sun"]
    rows = []
    for _ in range(n):
        a = " ".join(rng.choice(words, 3))
        rows.append({"messages": [{"role": "user", "content": f"repeat {a}"}, {"role": "assistant", "content": a}]})
    return rows


def test_packed_training_runs_end_to_end_and_counts_real_tokens(tiny_chat_model, tmp_path, monkeypatch):
    import time
    import types

    from jaxtune import metrics, train

    config = tiny_config()
    config.model.path = str(tiny_chat_model)
    config.data.train = str(write_jsonl(tmp_path / "train.jsonl", chat_rows(24)))
    config.data.eval = str(write_jsonl(tmp_path / "eval.jsonl", chat_rows(4, seed=1)))
    config.data.packing = True
    config.data.max_len = 128
    config.train.steps = 3
    # tokens/s = non-pad tokens fed per second: check the count by freezing the clock at 1 s per window.
    clock = iter(float(t) for t in range(1000))
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: next(clock), time=time.time))
    fed = []
    real_batcher = data.Batcher

    class CountingBatcher(real_batcher):
        def __next__(self):
            batch = super().__next__()
            fed.append(int(np.sum(batch["segment_ids"] > 0)))
            assert batch["segment_ids"].max() > 1, "rows hold several examples"
            return batch

    monkeypatch.setattr(train.data_lib, "Batcher", CountingBatcher)
    result = train.run(config, tmp_path / "run")
    assert np.isfinite(result.train_loss) and result.eval_after is not None
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    for record, tokens in zip(train_records, fed):
        assert record["tokens_per_s"] == tokens  # one clock tick per window
