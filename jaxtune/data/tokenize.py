"""Tokenisation and loss masks: normalised examples -> token ids + trained mask, with stats.

``tokenize_examples(examples, tokenizer, max_len, mask_prompt=True, drop_long=False,
template="auto", name="train") -> (list[TokenizedExample], DataStats)``.
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
warning is logged. This module also owns the special-token ids (closing and leading ones) and
the pad id of batches (:func:`pad_id_for`). It needs a transformers tokenizer, never JAX.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

import numpy as np

from jaxtune.data.sources import DataError
from jaxtune.errors import MissingPackageError

log = logging.getLogger(__name__)


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
        log.warning("%s data, max_len=%d: %d examples truncated (%d tokens cut), %d dropped as too long, "
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
    if is_jinja_template(template):
        return template
    raise DataError(f"unknown data.template {template!r}: use 'auto' (the tokenizer's chat template), "
                    f"'none' (raw concatenation) or a Jinja chat template string")


def is_jinja_template(template: str) -> bool:
    """Whether a data.template value is a Jinja chat template (not 'auto' / 'none')."""
    return "{%" in template or "{{" in template


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
        raise MissingPackageError(e.name or "jinja2", "rendering chat templates (transformers' "
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
