"""One-call Python API for notebooks and tests: load a model, compute logits, generate.

The top of the package: `load` / `LoadedModel` / `load_tokenizer` come from jaxtune.loading,
`generate_text` from jaxtune.generate; `logits` (and its padding helpers) live here.

    from jaxtune import api
    model = api.load("smollm2-135m-instruct")            # or an HF folder / hub id
    logits_BxTxV = api.logits(model, [[1, 2, 3], [4, 5]])   # ragged rows are right-padded
    print(api.generate_text(model, ["What is the capital of France?"], max_new_tokens=32))
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.generate import generate_text
from jaxtune.loading import LoadedModel, load, load_tokenizer
from jaxtune.models.llama import Llama, LoRAConfig

__all__ = ["LoadedModel", "generate_text", "load", "load_tokenizer", "logits", "pad_rows", "positions_from_mask"]


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int = 0, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Ragged token rows -> (tokens [B, T] int32, mask [B, T] bool), right-padded unless `left`."""
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        tokens[i, span] = row
        mask[i, span] = True
    return tokens, mask


def positions_from_mask(mask_BxT: np.ndarray) -> np.ndarray:
    """Position ids counting only real tokens (left padding shifts them), 0 on pad."""
    return np.maximum(np.cumsum(mask_BxT, axis=1) - 1, 0).astype(np.int32)


@functools.partial(jax.jit, static_argnames="cfg")
def _forward(params, tokens, positions, segments, cfg):
    return Llama(cfg).apply({"params": params}, tokens, positions, segments)[0]


def logits(
    model: LoadedModel,
    tokens: Sequence[Sequence[int]] | np.ndarray,
    attention_mask: np.ndarray | None = None,
    params: dict | None = None,
    lora: LoRAConfig | None = None,
) -> np.ndarray:
    """Float32 logits [B, T, V] for token ids. Rows of a list may differ in length (right-padded);
    with an array, `attention_mask` [B, T] marks real tokens (left or right padding both work).
    `params`/`lora` override the model's params (e.g. base + adapters) and adapter settings."""
    if isinstance(tokens, np.ndarray) or attention_mask is not None:
        tokens_BxT = np.asarray(tokens, np.int32)
        mask_BxT = np.ones_like(tokens_BxT, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    else:
        tokens_BxT, mask_BxT = pad_rows(tokens)
    cfg = model.cfg if lora is None else model.cfg.replace(lora=lora)
    out = _forward(params if params is not None else model.params, jnp.asarray(tokens_BxT),
                   jnp.asarray(positions_from_mask(mask_BxT)), jnp.asarray(mask_BxT.astype(np.int32)), cfg)
    return np.asarray(out)
