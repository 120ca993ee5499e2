"""Bundled fine-tuning tasks: deterministic generators, scorers and public-dataset loaders.

Each task module (`viggo`, `sql`, `arithmetic`) exposes NAME, DESCRIPTION (the system prompt),
`generate(split, n, seed)` and `score(prediction, example)`. This package re-exports the
registry (`NAMES`, `get`, `score_all`, `data_file`, `load_examples`), the data writer
(`write_split_files`; CLI `python -m jaxtune.tasks.build`) and the public loaders
(`load_public`, `from_*_row`).
"""

from jaxtune.tasks.public import (from_gsm8k_row, from_sql_create_context_row, from_viggo_row,
                                  load_public)
from jaxtune.tasks.registry import (DATA_DIR, DEFAULT_SIZES, NAMES, data_file, get,
                                    load_examples, read_jsonl, score_all, write_split_files)

__all__ = ["NAMES", "DATA_DIR", "DEFAULT_SIZES", "get", "score_all", "data_file",
           "load_examples", "read_jsonl", "write_split_files", "load_public", "from_viggo_row",
           "from_gsm8k_row", "from_sql_create_context_row"]
