"""Training data: files or datasets -> chat template -> token ids + loss mask -> packed/padded batches.

This package owns everything between a data spec in the config and the numpy batches that
`step.py` consumes (see the Batch contract in docs/architecture.md). It needs numpy and a
transformers tokenizer, never JAX. One module per stage, each importing only the ones before it:

1. :mod:`jaxtune.data.sources`: ``load_examples(spec, format)``: JSONL / JSON array / parquet /
   csv files, ``save_to_disk`` directories and hub datasets -> validated examples in normal form;
   :class:`DataError` names the file and line (or dataset row) of a bad row and the fix.
2. :mod:`jaxtune.data.tokenize`: ``tokenize_examples(examples, tokenizer, max_len, ...)``: chat
   template rendering, loss masks (:class:`TokenizedExample`), truncation counted in
   :class:`DataStats`; the pad id (``pad_id_for``).
3. :mod:`jaxtune.data.batching`: the Batch contract: ``make_batch``, packing
   (``pack_first_fit``), bucketed padding (``bucket_len``), the resumable per-host training
   iterator :class:`Batcher` and ``eval_batches``.
4. :mod:`jaxtune.data.pipeline`: ``build_datasets(config.data, tokenizer) -> Datasets``: 1-2 for
   the config's train and eval specs.

Of jaxtune it imports only ``jaxtune.errors``, so it sits low in the import layers (with
``tasks``, below ``config``): ``config.validate`` checks data.format and data.template with this
package's ``format_name`` and ``is_jinja_template``, the one definition of each.

The names below are the public API: ``from jaxtune import data; data.Batcher(...)``.
"""

from jaxtune.data.batching import (LENGTH_GROUP_BATCHES, Batcher, bucket_len, eval_batches, make_batch,
                                   pack_first_fit, plan_rows)
from jaxtune.data.pipeline import Datasets, build_datasets
from jaxtune.data.sources import (FORMAT_ALIASES, FORMAT_HELP, FORMATS, ROLES, DataError, detect_format,
                                  format_name, load_examples, normalise_row, validate_messages)
from jaxtune.data.tokenize import (DataStats, TokenizedExample, chat_ids, encode, encode_many, is_jinja_template,
                                   leading_special_ids, pad_id_for, raw_chat_ids, render, resolve_chat_template,
                                   special_ids, text_ids, tokenize_examples, trained_assistant_turns)

__all__ = [
    "FORMATS", "FORMAT_ALIASES", "FORMAT_HELP", "ROLES", "DataError", "detect_format", "format_name",
    "load_examples", "normalise_row",
    "validate_messages",
    "DataStats", "TokenizedExample", "chat_ids", "encode", "encode_many", "is_jinja_template", "leading_special_ids",
    "pad_id_for",
    "raw_chat_ids", "render", "resolve_chat_template", "special_ids", "text_ids", "tokenize_examples",
    "trained_assistant_turns",
    "LENGTH_GROUP_BATCHES", "Batcher", "bucket_len", "eval_batches", "make_batch", "pack_first_fit", "plan_rows",
    "Datasets", "build_datasets",
]
