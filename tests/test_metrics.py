"""What a run reports as it goes (jaxtune.metrics): metrics.jsonl records, TensorBoard event files,
`metrics_at` reading records back the way a resumed run does, the token rate and the progress bar."""

import json
import struct
import time

import pytest

from jaxtune import metrics


def tensorboard_scalars(event_files) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} read from TensorBoard event files (TFRecords of Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in event_files:
        data, offset = path.read_bytes(), 0
        while offset < len(data):  # record: uint64 length, uint32 crc, payload, uint32 crc
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 16 + length
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_records_are_appended_as_json_lines_and_tensorboard_scalars(tmp_path):
    log = metrics.MetricsLog(tmp_path, enabled=True)
    log.write("train", 1, {"loss": 2.5, "lr": 1e-4})
    log.write("eval", 1, {"loss": 2.75, "perplexity": 15.6})
    log.write("train", 2, {"loss": 2.25, "lr": 2e-4})
    log.close()
    scalars = tensorboard_scalars(sorted((tmp_path / "tb").glob("events.out.tfevents.*")))
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.25)]
    assert scalars["eval/perplexity"] == [(1, pytest.approx(15.6))]

    log = metrics.MetricsLog(tmp_path, enabled=True)  # a resumed run appends
    log.write("train", 3, {"loss": 2.0, "lr": 3e-4})
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("eval", 1), ("train", 2), ("train", 3)]
    assert records[0]["loss"] == 2.5 and records[1]["perplexity"] == 15.6
    assert all(abs(r["time"] - time.time()) < 600 for r in records)


def test_writers_of_one_second_keep_their_own_event_files(tmp_path, monkeypatch):
    """tensorboardX names an event file by the second and the host and opens it for writing: a second
    writer in the same second (two at once, or a resume right after a stop) must not truncate the first's."""
    import types

    from tensorboardX import event_file_writer

    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1_700_000_000.25))
    first = metrics.MetricsLog(tmp_path, enabled=True)
    first.write("train", 1, {"loss": 2.5})
    second = metrics.MetricsLog(tmp_path, enabled=True)  # open at the same time
    second.write("train", 2, {"loss": 2.0})
    first.close()
    second.close()
    third = metrics.MetricsLog(tmp_path, enabled=True)  # opened after the others closed, same second
    third.write("train", 3, {"loss": 1.5})
    third.close()
    files = sorted((tmp_path / "tb").glob("events.out.tfevents.1700000000.*"))
    assert len(files) == 3
    assert sorted(tensorboard_scalars(files)["train/loss"]) == [(1, 2.5), (2, 2.0), (3, 1.5)]


def test_a_disabled_log_writes_nothing(tmp_path):
    """Processes other than 0 keep no metrics files."""
    log = metrics.MetricsLog(tmp_path, enabled=False)
    log.write("train", 1, {"loss": 1.0})
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_metrics_at_reads_the_last_record_of_a_step_and_skips_a_line_cut_by_a_kill(tmp_path):
    lines = [{"kind": "eval", "step": 0, "loss": 3.0}, {"kind": "task", "step": 0, "accuracy": 0.1},
             {"kind": "eval", "step": 4, "loss": 2.0}, {"kind": "eval", "step": 0, "loss": 2.9}]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"kind": "eval", "step": 0, "lo'  # killed mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    assert metrics.metrics_at(tmp_path, "eval", 0)["loss"] == 2.9
    assert metrics.metrics_at(tmp_path, "task", 0)["accuracy"] == 0.1
    assert metrics.metrics_at(tmp_path, "eval", 4)["loss"] == 2.0
    assert metrics.metrics_at(tmp_path, "task", 4) is None


def test_metrics_at_without_a_metrics_file_is_none(tmp_path):
    assert metrics.metrics_at(tmp_path, "eval", 0) is None


def test_token_rate_counts_since_the_last_reset():
    rate = metrics.TokenRate()
    rate.add(1000)
    time.sleep(0.05)
    first = rate.per_second()
    assert 0 < first <= 1000 / 0.05
    rate.reset()
    assert rate.tokens == 0 and rate.per_second() == 0


def test_progress_bar_advances_to_the_logged_step():
    bar = metrics.ProgressBar(total=10, start=2, enabled=True)
    bar.update(5, {"loss": 1.2345, "lr": 3e-4, "tokens_per_s": 812.0})
    assert bar.bar.n == 5 and bar.position == 5
    assert "loss=1.2345" in str(bar.bar.postfix) and "tok_s=812" in str(bar.bar.postfix)
    bar.close()
    silent = metrics.ProgressBar(total=10, start=0, enabled=False)
    silent.update(3, {"loss": 1.0, "lr": 1e-4, "tokens_per_s": 1.0})
    silent.close()
    assert silent.position == 3 and silent.bar is None
