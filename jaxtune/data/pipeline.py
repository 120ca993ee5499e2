"""From ``config.data`` to tokenized train/eval sets: the data pipeline's entry point for training.

``build_datasets(config_data, tokenizer) -> Datasets`` loads (:mod:`jaxtune.data.sources`) and
tokenizes (:mod:`jaxtune.data.tokenize`) ``config.data`` (keys ``train``, ``eval``, ``format``,
``template``, ``max_len``, ``mask_prompt``, ``drop_long``, read as given: their defaults live in
the config schema only; ``packing`` is read by whoever builds the Batcher) and returns the
tokenized train/eval sets, their :class:`DataStats` and the pad id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from jaxtune.data.sources import DataError, load_examples
from jaxtune.data.tokenize import DataStats, TokenizedExample, pad_id_for, tokenize_examples


@dataclasses.dataclass
class Datasets:
    train: list[TokenizedExample]
    eval: list[TokenizedExample] | None
    train_stats: DataStats
    eval_stats: DataStats | None
    pad_id: int


def _split_specs(spec: str | Sequence[str]) -> list[str]:
    if isinstance(spec, str):
        return [part.strip() for part in spec.split(",") if part.strip()]
    return list(spec)


def build_datasets(config_data: Mapping[str, Any], tokenizer) -> Datasets:
    """Loads and tokenizes config.data.train (and .eval, '' for none); several specs: comma-separated.

    `config_data` is ``config.data`` (or its ``to_dict()``) holding train, eval, format, template, max_len,
    mask_prompt and drop_long.
    """
    train_spec = _split_specs(config_data["train"])
    if not train_spec:
        raise DataError("config.data.train is empty: set --config.data.train=PATH.jsonl (or hf:NAME:SPLIT)")
    options = dict(max_len=int(config_data["max_len"]), mask_prompt=bool(config_data["mask_prompt"]),
                   drop_long=bool(config_data["drop_long"]), template=config_data["template"])
    data_format = config_data["format"]
    train, train_stats = tokenize_examples(load_examples(train_spec, data_format), tokenizer, name="train",
                                           **options)
    if not train:
        raise DataError(f"no training example left after tokenisation: {train_stats}")
    eval_spec = _split_specs(config_data["eval"] or "")
    eval_set, eval_stats = None, None
    if eval_spec:
        eval_set, eval_stats = tokenize_examples(load_examples(eval_spec, data_format), tokenizer, name="eval",
                                                 **options)
    return Datasets(train=train, eval=eval_set, train_stats=train_stats, eval_stats=eval_stats,
                    pad_id=pad_id_for(tokenizer))
