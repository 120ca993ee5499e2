"""jaxtune.data.sources: loading every source kind, format detection, and one error per bad row naming
its file and line."""

import json

import pytest

from conftest import chat, require_reference, write_jsonl
from jaxtune import data
from jaxtune.data import DataError


def test_load_detects_each_format_and_normalises(tmp_path):
    messages = chat(("system", "s"), ("user", "u"), ("assistant", "a"))
    files = {
        "m.jsonl": [messages],
        "pc.jsonl": [{"prompt": "p", "completion": "c", "extra": 1}],
        "t.jsonl": [{"text": "hello"}],
    }
    paths = {name: str(write_jsonl(tmp_path / name, rows)) for name, rows in files.items()}
    assert data.load_examples(paths["m.jsonl"]) == [{**messages, "source": f"{paths['m.jsonl']}:1"}]
    assert data.load_examples(paths["pc.jsonl"]) == [
        {"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}],
         "source": f"{paths['pc.jsonl']}:1"}]
    assert data.load_examples(paths["t.jsonl"]) == [{"text": "hello", "source": f"{paths['t.jsonl']}:1"}]
    # Several sources, each detected on its own; blank lines are skipped but line numbers kept.
    (tmp_path / "blank.jsonl").write_text('\n{"text": "x"}\n\n{"text": "y"}\n')
    both = data.load_examples([paths["pc.jsonl"], str(tmp_path / "blank.jsonl")])
    assert [e["source"].rsplit(":", 1)[1] for e in both] == ["1", "2", "4"]


def test_load_prompt_completion_message_lists_and_weights(tmp_path):
    row = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
           "completion": [{"role": "assistant", "content": "c", "weight": 1}]}
    path = str(write_jsonl(tmp_path / "x.jsonl", [row]))
    assert data.load_examples(path)[0]["messages"] == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u"},
        {"role": "assistant", "content": "c", "weight": 1}]


def test_load_json_array_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [e["text"] for e in data.load_examples(str(path))] == ["a", "b"]


BAD_FILES = [
    ('{"text": "a"}\n{"text": \n', 2, "invalid JSON"),
    ('{"messages": [{"role": "user", "content": "u"}]}\n{"text": "t"}\n', 2, "missing field 'messages'"),
    ('{"messages": []}\n', 1, "empty conversation"),
    ('{"messages": [{"role": "tool", "content": "x"}]}\n', 1, "unknown role 'tool'"),
    ('{"messages": [{"role": "user", "content": null}]}\n', 1, "string 'content', got null"),
    ('{"messages": [{"role": "user", "content": ["a"]}]}\n', 1, "string 'content', got list"),
    ('{"messages": [{"role": "user"}]}\n', 1, "string 'content'"),
    ('{"messages": "hi"}\n', 1, "must be a list of messages"),
    ('{"messages": ["hi"]}\n', 1, "message 0 must be an object"),
    ('{"messages": [{"role": "assistant", "content": "a", "weight": 2}]}\n', 1, "must be 0 or 1"),
    ('{"prompt": "p", "completion": 3}\n', 1, "'completion' must be a string"),
    ('{"prompt": "p"}\n', 1, "cannot tell the data format"),
    ('\n\n{"question": "q"}\n', 3, "cannot tell the data format"),
    ('{"text": ""}\n', 1, "'text' is empty"),
    ('{"text": 5}\n', 1, "'text' must be a string"),
    ('"just a string"\n', 1, "expected a JSON object"),
]


@pytest.mark.parametrize("content,line,message", BAD_FILES)
def test_bad_rows_give_one_error_with_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        data.load_examples(str(path))
    assert f"{path}:{line}: " in str(info.value)
    assert message in str(info.value)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no examples"):
        data.load_examples(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        data.load_examples(str(tmp_path / "absent.jsonl"))
    with pytest.raises(DataError, match="unknown data format"):
        data.load_examples(str(tmp_path / "empty.jsonl"), format="chat")
    with pytest.raises(DataError, match="hf:NAME"):
        data.load_examples("hf:a:b:c:d")


def test_explicit_format_overrides_detection(tmp_path):
    path = str(write_jsonl(tmp_path / "x.jsonl", [{"text": "t", "prompt": "p", "completion": "c"}]))
    assert data.load_examples(path, format="text")[0]["text"] == "t"
    assert data.load_examples(path)[0]["messages"][1]["content"] == "c"


def test_datasets_sources(tmp_path):
    datasets = require_reference("datasets")
    rows = [chat(("user", "u1"), ("assistant", "a1")), chat(("user", "u2"), ("assistant", "a2"))]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    loaded = data.load_examples(str(tmp_path / "single"))
    assert [e["messages"] for e in loaded] == [r["messages"] for r in rows]
    assert loaded[1]["source"] == f"{tmp_path / 'single'} row 1"

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]),
                                   "test": datasets.Dataset.from_list([{"text": "c"}])})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert [e["text"] for e in data.load_examples(f"{tmp_path / 'dict'}:test")] == ["c"]
    with pytest.raises(DataError, match="SPLIT"):
        data.load_examples(str(tmp_path / "dict"))

    datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}]).to_parquet(str(tmp_path / "x.parquet"))
    assert data.load_examples(str(tmp_path / "x.parquet"))[0]["messages"][1] == {"role": "assistant",
                                                                               "content": "c"}
    bad = datasets.Dataset.from_list([{"text": "ok"}, {"text": ""}])
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad row 1: 'text' is empty"):
        data.load_examples(str(tmp_path / "bad"))
