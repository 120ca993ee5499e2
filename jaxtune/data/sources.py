"""Data sources: files or datasets -> validated examples in normal form (no tokenizer, no JAX).

``load_examples(spec, format="auto") -> list[dict]``: ``spec`` is a JSONL file (``.jsonl`` /
``.json``; a ``.json`` file holding one JSON array also works), a ``.parquet`` / ``.csv`` file (read
with ``datasets``), a directory written by ``datasets``' ``save_to_disk`` (``DIR`` or ``DIR:SPLIT``
for a DatasetDict), or a hub dataset ``hf:NAME[:CONFIG]:SPLIT`` (``hf:NAME`` means split
``train``). A list of specs is concatenated. Rows come in three formats, detected per source from
the first row's keys with ``format="auto"``:

* ``messages``:  ``{"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}``
  (the OpenAI fine-tuning format; an assistant message may carry ``"weight": 0`` to be shown
  but not trained, as in OpenAI's format);
* ``prompt_completion``: ``{"prompt": "...", "completion": "..."}``: the prompt becomes a user
  turn, the completion an assistant turn (either may also be a list of messages, as in TRL);
* ``text``: ``{"text": "..."}``: every token is trained.

Each example is normalised to ``{"messages": [...], "source": "FILE:LINE"}`` or
``{"text": "...", "source": "FILE:LINE"}``. Any bad row raises one :class:`DataError` naming
the file and line (or dataset row) and saying how to fix it. This module owns
:class:`DataError`, the formats, their detection and row validation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from jaxtune.errors import JaxtuneError

FORMATS = ("auto", "messages", "prompt_completion", "text")
FORMAT_ALIASES = {"prompt-completion": "prompt_completion"}  # design.md's (and TRL's docs') spelling
ROLES = ("system", "user", "assistant")
FORMAT_HELP = ('one JSON object per line, in one of the formats '
               '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}, '
               '{"prompt": "...", "completion": "..."} or {"text": "..."}')


class DataError(JaxtuneError, ValueError):
    """Bad training data: the message names the file and line (or dataset row) and the fix."""


def format_name(format: str) -> str | None:
    """The format of FORMATS that `format` names (itself, or the one it is an alias of); None if none.
    The one rule of which data.format values are accepted: config.validate asks it too."""
    name = FORMAT_ALIASES.get(format, format)
    return name if name in FORMATS else None


def load_examples(spec: str | Sequence[str], format: str = "auto") -> list[dict]:
    """Loads and validates the examples of one spec (or a list of specs), normalised.

    Returns dicts ``{"messages": [{"role", "content"[, "weight"]}...], "source": str}`` or
    ``{"text": str, "source": str}``; ``source`` is ``FILE:LINE`` / ``SPEC row N`` for errors.
    """
    name = format_name(format)
    if name is None:
        raise DataError(f"unknown data format {format!r}; use one of {', '.join(FORMATS)}")
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise DataError("no data source given")
    examples = []
    for one_spec in specs:
        examples.extend(_load_source(one_spec, name))
    return examples


def _load_source(spec: str, format: str) -> list[dict]:
    rows = _source_rows(spec)
    examples = []
    source_format = format
    for where, row in rows:
        if source_format == "auto":
            source_format = detect_format(row, where)
        examples.append(normalise_row(row, source_format, where))
    if not examples:
        raise DataError(f"{spec}: no examples (the file or split is empty); expected {FORMAT_HELP}")
    return examples


def _source_rows(spec: str) -> Iterator[tuple[str, Any]]:
    """(where, row) pairs of one source; `where` names file and line (1-based) or dataset row."""
    if spec.startswith("hf:"):
        return _dataset_rows(spec, _load_hub_dataset(spec))
    if os.path.isdir(spec):
        return _dataset_rows(spec, _load_disk_dataset(spec, split=None))
    if not os.path.exists(spec):
        head, _, split = spec.rpartition(":")
        if head and os.path.isdir(head):
            return _dataset_rows(spec, _load_disk_dataset(head, split=split))
        raise DataError(f"{spec}: no such file or directory (data sources are JSONL files, "
                        f"save_to_disk directories or 'hf:NAME[:CONFIG]:SPLIT')")
    suffix = os.path.splitext(spec)[1].lower()
    if suffix in (".parquet", ".csv"):
        return _dataset_rows(spec, _load_dataset_file(spec, suffix[1:]))
    return _json_rows(spec)


def _json_rows(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}); the file starts "
                            f"with '[' so it is read as one JSON array; JSON Lines files hold "
                            f"{FORMAT_HELP}") from None
        for i, item in enumerate(items):
            yield f"{path} item {i}", item
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); each line must be "
                            f"one complete JSON object: {FORMAT_HELP}") from None
        yield f"{path}:{lineno}", row


def _dataset_rows(spec: str, dataset) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(dataset):
        yield f"{spec} row {i}", row


def _load_hub_dataset(spec: str):
    import datasets

    parts = spec[len("hf:"):].split(":")
    if len(parts) == 1:
        name, config, split = parts[0], None, "train"
    elif len(parts) == 2:
        (name, split), config = parts, None
    elif len(parts) == 3:
        name, config, split = parts
    else:
        raise DataError(f"{spec}: expected 'hf:NAME[:CONFIG]:SPLIT'")
    if not name or not split:
        raise DataError(f"{spec}: expected 'hf:NAME[:CONFIG]:SPLIT' with a dataset name and a split")
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # datasets raises many types; they all mean "could not load".
        raise DataError(f"{spec}: could not load dataset {name!r} (config {config!r}, split {split!r}): "
                        f"{type(e).__name__}: {e}") from e


def _load_disk_dataset(path: str, split: str | None):
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as e:
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({type(e).__name__}: {e})") from e
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            raise DataError(f"{path}: holds the splits {splits}; name one as '{path}:SPLIT'")
        return loaded[split]
    if split is not None:
        raise DataError(f"{path}: is a single Dataset without splits; use '{path}' without ':{split}'")
    return loaded


def _load_dataset_file(path: str, builder: str):
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as e:
        raise DataError(f"{path}: could not read as {builder} ({type(e).__name__}: {e})") from e


def detect_format(row: Any, where: str) -> str:
    """The format of a source from its first row's keys."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}; {FORMAT_HELP}")
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    raise DataError(f"{where}: cannot tell the data format from the keys {sorted(row)}; expected "
                    f"{FORMAT_HELP} (or set data.format)")


def normalise_row(row: Any, format: str, where: str) -> dict:
    """One validated example in normal form (see load_examples)."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}; {FORMAT_HELP}")
    if format == "text":
        text = _field(row, "text", where, format)
        if not isinstance(text, str):
            raise DataError(f"{where}: 'text' must be a string, got {_type_name(text)}")
        if not text.strip():
            raise DataError(f"{where}: 'text' is empty; remove the line or give it some text")
        return {"text": text, "source": where}
    if format == "messages":
        messages = _field(row, "messages", where, format)
        return {"messages": validate_messages(messages, where, "messages"), "source": where}
    if format == "prompt_completion":
        prompt = _field(row, "prompt", where, format)
        completion = _field(row, "completion", where, format)
        messages = (_as_turns(prompt, "user", "prompt", where)
                    + _as_turns(completion, "assistant", "completion", where))
        return {"messages": validate_messages(messages, where, "prompt/completion"), "source": where}
    raise DataError(f"unknown data format {format!r}; use one of {', '.join(FORMATS)}")


def _field(row: Mapping, key: str, where: str, format: str) -> Any:
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing field '{key}' (this source is read as {format} data, "
                        f"keys here: {sorted(row)}); every line of a file must have the same format: "
                        f"{FORMAT_HELP}")
    return row[key]


def _as_turns(value: Any, role: str, key: str, where: str) -> list:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise DataError(f"{where}: '{key}' must be a string (or a list of messages), got {_type_name(value)}")


def validate_messages(messages: Any, where: str, what: str) -> list[dict]:
    """Checks roles, contents and weights; returns clean message dicts."""
    if not isinstance(messages, list):
        raise DataError(f"{where}: '{what}' must be a list of messages, got {_type_name(messages)}")
    if not messages:
        raise DataError(f"{where}: empty conversation; give at least a user and an assistant message")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(f"{where}: message {i} must be an object "
                            f'{{"role": ..., "content": ...}}, got {_type_name(message)}')
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role {role!r}; roles are "
                            f"{', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}) must have a string 'content', got "
                            f"{_type_name(content)} (multi-part contents and tool calls are not supported)")
        item = {"role": role, "content": content}
        weight = message.get("weight")
        if weight is not None:
            if role != "assistant" or weight not in (0, 1) or isinstance(weight, bool):
                raise DataError(f"{where}: message {i}: 'weight' is allowed on assistant messages only and "
                                f"must be 0 or 1, got {weight!r} on a {role} message")
            item["weight"] = int(weight)
        clean.append(item)
    return clean


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
