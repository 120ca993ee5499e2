"""Training data: files or datasets -> chat template -> token ids + loss mask -> packed/padded batches.

This module owns everything between a data spec in the config and the numpy batches that
`step.py` consumes (see the Batch contract in docs/architecture.md). It needs numpy and a
transformers tokenizer, never JAX.

Pipeline and public API
-----------------------

1. ``load_examples(spec, format="auto") -> list[dict]``
   ``spec`` is a JSONL file (``.jsonl`` / ``.json``; a ``.json`` file holding one JSON array also
   works), a ``.parquet`` / ``.csv`` file (read with ``datasets``), a directory written by
   ``datasets``' ``save_to_disk`` (``DIR`` or ``DIR:SPLIT`` for a DatasetDict), or a hub dataset
   ``hf:NAME[:CONFIG]:SPLIT`` (``hf:NAME`` means split ``train``). A list of specs is concatenated.
   Rows come in three formats, detected per source from the first row's keys with ``format="auto"``:

   * ``messages``:  ``{"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}``
     (the OpenAI fine-tuning format; an assistant message may carry ``"weight": 0`` to be shown
     but not trained, as in OpenAI's format);
   * ``prompt_completion``: ``{"prompt": "...", "completion": "..."}``: the prompt becomes a user
     turn, the completion an assistant turn (either may also be a list of messages, as in TRL);
   * ``text``: ``{"text": "..."}``: every token is trained.

   Each example is normalised to ``{"messages": [...], "source": "FILE:LINE"}`` or
   ``{"text": "...", "source": "FILE:LINE"}``. Any bad row raises one :class:`DataError` naming
   the file and line (or dataset row) and saying how to fix it.

2. ``tokenize_examples(examples, tokenizer, max_len, mask_prompt=True, drop_long=False,
   template="auto", name="train") -> (list[TokenizedExample], DataStats)``
   A :class:`TokenizedExample` holds ``ids`` (int32 [n]) and ``trained`` (bool [n]):
   ``trained[t]`` means token ``ids[t]`` is a loss target, predicted from ``ids[:t]``
   (``trained[0]`` is always False). ``template`` is ``"auto"`` (the tokenizer's chat template),
   ``"none"`` (raw concatenation, see below) or a Jinja chat template string.

   Chat examples are rendered with ``tokenizer.apply_chat_template(..., tokenize=False)`` and
   tokenised without adding special tokens (what transformers itself does). Assistant spans are
   found by rendering prefixes: for the assistant message ``i`` the tokens of
   ``render(messages[:i], add_generation_prompt=True)`` end where its content starts, the tokens
   of ``render(messages[:i+1])`` end where its turn ends. Both must be token prefixes of the full
   rendering, otherwise a DataError explains why (templates that render earlier turns differently
   from the last one, e.g. by dropping reasoning). Trained: the assistant content and the tokens
   that close the turn (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ...); not trained: the
   generation header (``<|im_start|>assistant\\n``) and trailing whitespace tokens after the
   closing token (the ``\\n`` after ``<|im_end|>`` in ChatML). ``return_assistant_tokens_mask`` is
   not used: most templates lack ``{% generation %}``.
   Templates that ignore ``add_generation_prompt`` (Llama-2 / Mistral ``[INST]`` style) close the
   user turn themselves, so the assistant span still starts right after ``[/INST]``.

   With ``template="none"`` a conversation is the raw concatenation of its contents (each one
   tokenised on its own, the tokenizer's leading special tokens such as BOS first) and every
   assistant content is followed by EOS; for prompt/completion rows that is
   ``prompt + completion + EOS``. Text rows are ``BOS? + text + EOS``, all trained.
   ``mask_prompt=False`` trains every token.

   Examples longer than ``max_len`` are cut on the right (or dropped with ``drop_long=True``);
   examples left without any trained token are dropped. :class:`DataStats` counts all of it and a
   warning is logged.

3. Batches (``make_batch``, :class:`Batcher`, ``eval_batches``) follow the Batch contract: dicts of
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
   all-pad rows (loss_mask 0).

4. ``build_datasets(config_data, tokenizer) -> Datasets`` runs 1-2 for ``config.data``
   (keys ``train``, ``eval``, ``format``, ``template``, ``max_len``, ``mask_prompt``,
   ``drop_long``; ``packing`` is read by whoever builds the Batcher) and returns the tokenized
   train/eval sets, their :class:`DataStats` and the pad id.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

import jaxtune

logger = logging.getLogger("jaxtune.data")

FORMATS = ("auto", "messages", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
FORMAT_HELP = ('one JSON object per line, in one of the formats '
               '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}, '
               '{"prompt": "...", "completion": "..."} or {"text": "..."}')
# Padded batches: rows of one global batch are drawn from windows of this many batches, sorted by
# length inside the window, so that batches hold similar lengths (less padding) yet stay random.
LENGTH_GROUP_BATCHES = 32


class DataError(ValueError):
    """Bad training data: the message names the file and line (or dataset row) and the fix."""


# ----------------------------------------------------------------------------------------------
# 1. Loading and validating examples
# ----------------------------------------------------------------------------------------------

def load_examples(spec: str | Sequence[str], format: str = "auto") -> list[dict]:
    """Loads and validates the examples of one spec (or a list of specs), normalised.

    Returns dicts ``{"messages": [{"role", "content"[, "weight"]}...], "source": str}`` or
    ``{"text": str, "source": str}``; ``source`` is ``FILE:LINE`` / ``SPEC row N`` for errors.
    """
    if format not in FORMATS and format != "prompt-completion":
        raise DataError(f"unknown data format {format!r}; use one of {', '.join(FORMATS)}")
    format = "prompt_completion" if format == "prompt-completion" else format
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise DataError("no data source given")
    examples = []
    for one_spec in specs:
        examples.extend(_load_source(one_spec, format))
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


# ----------------------------------------------------------------------------------------------
# 2. Tokenisation and loss masks
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """ids: int32 [n]; trained: bool [n], trained[t] = ids[t] is a loss target (predicted from ids[:t])."""
    ids: np.ndarray
    trained: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass
class DataStats:
    """What tokenisation kept, cut and dropped (counts after truncation unless said otherwise)."""
    name: str = "data"
    max_len: int = 0
    examples: int = 0              # examples kept
    tokens: int = 0                # tokens of the kept examples
    trained_tokens: int = 0        # loss targets of the kept examples
    longest: int = 0               # longest example before truncation, in tokens
    truncated_examples: int = 0    # kept but cut to max_len
    truncated_tokens: int = 0      # tokens cut from them
    dropped_long: int = 0          # longer than max_len, dropped (drop_long=True)
    dropped_untrained: int = 0     # no trained token left (all cut away by truncation)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        share = self.trained_tokens / self.tokens if self.tokens else 0.0
        mean = self.tokens / self.examples if self.examples else 0.0
        text = (f"{self.name}: {self.examples:,} examples, {self.tokens:,} tokens "
                f"({self.trained_tokens:,} trained, {share:.1%}), mean {mean:.1f} / longest {self.longest:,} "
                f"tokens (max_len {self.max_len:,})")
        if self.truncated_examples:
            text += f"; {self.truncated_examples:,} truncated ({self.truncated_tokens:,} tokens cut)"
        if self.dropped_long:
            text += f"; {self.dropped_long:,} dropped as too long"
        if self.dropped_untrained:
            text += f"; {self.dropped_untrained:,} dropped with no trained token left"
        return text


def tokenize_examples(examples: Iterable[dict], tokenizer, max_len: int, mask_prompt: bool = True,
                      drop_long: bool = False, template: str = "auto",
                      name: str = "train") -> tuple[list[TokenizedExample], DataStats]:
    """Token ids + trained masks of normalised examples, truncated to max_len, with stats."""
    if max_len < 2:
        raise DataError(f"data.max_len must be at least 2, got {max_len}")
    examples = list(examples)
    has_chat = any("messages" in example for example in examples)
    chat_template = resolve_chat_template(tokenizer, template) if has_chat else None
    leading_ids = leading_special_ids(tokenizer)
    closing_ids = special_ids(tokenizer)
    stats = DataStats(name=name, max_len=max_len)
    kept = []
    for example in examples:
        source = example.get("source", "")
        if "text" in example:
            ids, trained = text_ids(example["text"], tokenizer, leading_ids, source)
        elif chat_template is None:
            ids, trained = raw_chat_ids(example["messages"], tokenizer, leading_ids, mask_prompt, source)
        else:
            ids, trained = chat_ids(example["messages"], tokenizer, chat_template, closing_ids, mask_prompt,
                                    source)
        trained[0] = False
        stats.longest = max(stats.longest, len(ids))
        if len(ids) > max_len:
            if drop_long:
                stats.dropped_long += 1
                continue
            stats.truncated_examples += 1
            stats.truncated_tokens += len(ids) - max_len
            ids, trained = ids[:max_len], trained[:max_len]
        if not trained.any():
            stats.dropped_untrained += 1
            continue
        kept.append(TokenizedExample(ids=ids, trained=trained, source=source))
        stats.examples += 1
        stats.tokens += len(ids)
        stats.trained_tokens += int(trained.sum())
    if stats.truncated_examples or stats.dropped_long or stats.dropped_untrained:
        logger.warning("%s data, max_len=%d: %d examples truncated (%d tokens cut), %d dropped as too long, "
                       "%d dropped with no trained token left; raise data.max_len or set data.drop_long",
                       name, max_len, stats.truncated_examples, stats.truncated_tokens,
                       stats.dropped_long, stats.dropped_untrained)
    return kept, stats


def resolve_chat_template(tokenizer, template: str) -> str | None:
    """The Jinja chat template to render with, or None for raw concatenation (template 'none')."""
    if template == "none":
        return None
    if template == "auto":
        chat_template = getattr(tokenizer, "chat_template", None)
        if not chat_template:
            raise DataError("the tokenizer has no chat template: set data.template='none' to train on raw "
                            "text (prompt + completion + EOS), or data.template to a Jinja chat template")
        if isinstance(chat_template, dict):  # several named templates: the default one renders chats.
            chat_template = chat_template.get("default") or next(iter(chat_template.values()))
        return chat_template
    if "{%" in template or "{{" in template:
        return template
    raise DataError(f"unknown data.template {template!r}: use 'auto' (the tokenizer's chat template), "
                    f"'none' (raw concatenation) or a Jinja chat template string")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text as rendered (special tokens in the text stay special, none are added)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    """encode() of several texts in one tokenizer call (batched, parallel in fast tokenizers)."""
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def render(tokenizer, chat_template: str, messages: Sequence[dict], add_generation_prompt: bool,
           source: str) -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        return tokenizer.apply_chat_template(plain, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except ImportError as e:  # the environment lacks a package (transformers renders with jinja2): not the data
        raise jaxtune.MissingPackageError(e.name or "jinja2", "rendering chat templates (transformers' "
                                          "apply_chat_template)", cause=e) from e
    except Exception as e:  # jinja's raise_exception, missing variables, ...
        raise DataError(f"{source}: the chat template cannot render this conversation "
                        f"({type(e).__name__}: {e}); fix the conversation (e.g. roles must alternate "
                        f"user/assistant for some models) or set data.template") from e


def chat_ids(messages: Sequence[dict], tokenizer, chat_template: str, closing_ids: set[int], mask_prompt: bool,
             source: str) -> tuple[np.ndarray, np.ndarray]:
    """Ids of a rendered conversation; trained = assistant contents and the tokens closing them."""
    turns = trained_assistant_turns(messages, source) if mask_prompt else []
    if turns and turns[0] == 0:
        raise DataError(f"{source}: the conversation starts with an assistant message; put a user "
                        f"(or system) message before it")
    texts = [render(tokenizer, chat_template, messages, False, source)]
    for i in turns:  # where turn i starts (after its header) and where it ends
        texts.append(render(tokenizer, chat_template, messages[:i], True, source))
        texts.append(render(tokenizer, chat_template, messages[:i + 1], False, source))
    full_ids, *boundary_ids = encode_many(tokenizer, texts)
    if not full_ids:
        raise DataError(f"{source}: the chat template rendered this conversation as empty text")
    trained = np.zeros(len(full_ids), dtype=bool)
    if not mask_prompt:
        trained[1:] = True
    for i, start_ids, end_ids in zip(turns, boundary_ids[0::2], boundary_ids[1::2]):
        _check_prefix(start_ids, end_ids, source, f"the generation prompt before message {i}",
                      f"the conversation up to message {i}")
        _check_prefix(end_ids, full_ids, source, f"the conversation up to message {i}",
                      "the whole conversation")
        end = _strip_trailing_whitespace(tokenizer, end_ids, len(start_ids), closing_ids)
        trained[len(start_ids):end] = True
    return np.asarray(full_ids, np.int32), trained


def trained_assistant_turns(messages: Sequence[dict], source: str) -> list[int]:
    """Indices of assistant messages to train (weight != 0); a DataError if there is none."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise DataError(f"{source}: the conversation has no assistant message, so nothing to train on; "
                        f"add one, or set data.mask_prompt=False to train on all tokens")
    turns = [i for i in assistant if messages[i].get("weight", 1) != 0]
    if not turns:
        raise DataError(f"{source}: every assistant message has weight 0, so nothing to train on")
    return turns


def _check_prefix(prefix: list[int], ids: list[int], source: str, prefix_name: str, name: str) -> None:
    if ids[:len(prefix)] != prefix:
        at = next(t for t in range(len(prefix)) if t >= len(ids) or ids[t] != prefix[t])
        raise DataError(f"{source}: the chat template is not prefix-consistent: the tokens of {prefix_name} "
                        f"are not a prefix of the tokens of {name} (they differ at token {at}), so the "
                        f"assistant tokens cannot be located. This happens with templates that render "
                        f"earlier turns differently from the last one (e.g. dropping reasoning); split such "
                        f"conversations into one example per assistant turn, or set data.template")


def special_ids(tokenizer) -> set[int]:
    """Ids of special and added tokens (turn markers such as <|im_end|>, <|eot_id|>)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids


def _strip_trailing_whitespace(tokenizer, ids: list[int], start: int, closing_ids: set[int]) -> int:
    """End of a turn's trained span: drops whitespace-only tokens after its last visible or special token."""
    end = len(ids)
    while end > start and ids[end - 1] not in closing_ids and not tokenizer.decode([ids[end - 1]]).strip():
        end -= 1
    return end


def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before text by default (e.g. BOS for Llama), maybe none."""
    probe = "a"
    with_specials = list(tokenizer(probe)["input_ids"])
    plain = encode(tokenizer, probe)
    for start in range(len(with_specials) - len(plain) + 1):
        if with_specials[start:start + len(plain)] == plain:
            return with_specials[:start]
    return []


def _eos_id(tokenizer, source: str) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(f"{source}: the tokenizer has no eos_token, needed to end raw text and completions")
    return int(tokenizer.eos_token_id)


def text_ids(text: str, tokenizer, leading_ids: list[int], source: str) -> tuple[np.ndarray, np.ndarray]:
    """leading_ids (e.g. BOS) + text + EOS, everything trained."""
    ids = list(leading_ids) + encode(tokenizer, text) + [_eos_id(tokenizer, source)]
    trained = np.ones(len(ids), dtype=bool)
    trained[0] = False
    return np.asarray(ids, np.int32), trained


def raw_chat_ids(messages: Sequence[dict], tokenizer, leading_ids: list[int], mask_prompt: bool,
                 source: str) -> tuple[np.ndarray, np.ndarray]:
    """Template 'none': contents concatenated raw, EOS after each assistant content."""
    train_turns = set(trained_assistant_turns(messages, source)) if mask_prompt else None
    eos = _eos_id(tokenizer, source)
    ids = list(leading_ids)
    trained = [not mask_prompt] * len(ids)
    pieces = encode_many(tokenizer, [message["content"] for message in messages])
    for i, (message, piece) in enumerate(zip(messages, pieces)):
        if message["role"] == "assistant":
            piece.append(eos)
        ids += piece
        trained += [not mask_prompt or i in train_turns] * len(piece)
    if not ids:
        raise DataError(f"{source}: the conversation has no tokens")
    return np.asarray(ids, np.int32), np.asarray(trained, dtype=bool)


def pad_id_for(tokenizer) -> int:
    """The pad id for batches: the tokenizer's pad token, else EOS, else 0 (pads are never trained)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


# ----------------------------------------------------------------------------------------------
# 3. Rows and batches
# ----------------------------------------------------------------------------------------------

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
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by the process count {process_count}")
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
            raise ValueError("no training examples to batch")
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
        try:
            epoch, index = int(state["epoch"]), int(state["index"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"a Batcher state is {{'epoch': int, 'index': int}}, got {state!r}") from None
        if epoch < 0 or not 0 <= index <= self.steps_per_epoch:
            raise ValueError(f"Batcher state {state!r} is out of range ({self.steps_per_epoch} steps per epoch); "
                             f"was it saved with another dataset or batch size?")
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


# ----------------------------------------------------------------------------------------------
# 4. From config.data
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Datasets:
    train: list[TokenizedExample]
    eval: list[TokenizedExample] | None
    train_stats: DataStats
    eval_stats: DataStats | None
    pad_id: int


def _config_value(config_data, key: str, default: Any) -> Any:
    if isinstance(config_data, Mapping):
        return config_data.get(key, default)
    value = getattr(config_data, key, default)
    return default if value is None and default is not None else value


def _split_specs(spec: str | Sequence[str]) -> list[str]:
    if isinstance(spec, str):
        return [part.strip() for part in spec.split(",") if part.strip()]
    return list(spec)


def build_datasets(config_data, tokenizer) -> Datasets:
    """Loads and tokenizes config.data.train (and .eval, '' for none); several specs: comma-separated."""
    train_spec = _split_specs(_config_value(config_data, "train", ""))
    if not train_spec:
        raise DataError("config.data.train is empty: set --config.data.train=PATH.jsonl (or hf:NAME:SPLIT)")
    options = dict(max_len=int(_config_value(config_data, "max_len", 2048)),
                   mask_prompt=bool(_config_value(config_data, "mask_prompt", True)),
                   drop_long=bool(_config_value(config_data, "drop_long", False)),
                   template=_config_value(config_data, "template", "auto"))
    data_format = _config_value(config_data, "format", "auto")
    train, train_stats = tokenize_examples(load_examples(train_spec, data_format), tokenizer, name="train",
                                           **options)
    if not train:
        raise DataError(f"no training example left after tokenisation: {train_stats}")
    eval_spec = _split_specs(_config_value(config_data, "eval", "") or "")
    eval_set, eval_stats = None, None
    if eval_spec:
        eval_set, eval_stats = tokenize_examples(load_examples(eval_spec, data_format), tokenizer, name="eval",
                                                 **options)
    return Datasets(train=train, eval=eval_set, train_stats=train_stats, eval_stats=eval_stats,
                    pad_id=pad_id_for(tokenizer))
