"""New special tokens (`config.data.add_tokens`): tokenizer, resized embeddings, new-row-only updates.

What it owns:
  * `parse_tokens(spec)`: 'a,b' -> ('a', 'b') (stripped, empty and repeated names dropped).
  * `extend_tokenizer(tokenizer, tokens, vocab_size)`: adds the tokens that are not already in the
    tokenizer with `add_tokens(..., special_tokens=True)`, in config order (so their ids are the same
    as those `jaxtune.export` gets when it rebuilds the tokenizer), logs which were added and which
    skipped, and returns a `VocabExtension`: the new ids and the model's vocabulary size after.
  * `resize_params(params, ext)`: the embedding table [V, D] (and an untied lm_head kernel [D, V])
    resized to the new size, each new token's row set to the mean row.
  * `only_rows(ids, vocab_size)`: an optax transformation that zeroes every update of the
    vocabulary-sized weights except the rows of `ids`; `train_new_rows(tx, ext)` wraps an optimizer
    in it (before, so that clipping and Adam see only the new rows' gradients, and after, so that
    weight decay cannot move the old rows either).

Size: the model's vocabulary becomes exactly `len(tokenizer)` after the addition, as transformers'
`model.resize_token_embeddings(len(tokenizer))` without `pad_to_multiple_of` does. That is the call
a PEFT user makes before loading our adapter, so the shapes match; no rounding up to a multiple
(a vocab axis that does not divide the mesh falls back to replication, see jaxtune/sharding.py).
A model whose table had spare padding rows beyond the tokenizer (Qwen) is cut to the tokenizer's
length as transformers cuts it.

Initialisation: each new row is the mean of the rows of the tokens the tokenizer had before
(Hewitt 2021, "Initializing new word embeddings for pretrained language models"): the new token
then starts as an average token, its logit is about the mean logit, and the model's
predictions for existing text do not shift, unlike a random row whose norm can dominate the
softmax. transformers' `resize_token_embeddings` does the same by default (`mean_resizing=True`,
since 4.46), adding noise with 1e-9 times the rows' covariance; we leave that noise out, so the
rows are deterministic: identical new rows still train apart from the first step, because each
token gets its own gradient (its own occurrences as input, its own target positions as output).

Training: with LoRA, the embedding and an untied lm_head kernel become trainable leaves
(`lora.is_trainable(..., train_embeddings=True)`), saved with the adapter in every checkpoint, and
`only_rows` keeps every old row bit-identical. Full fine-tuning trains every row anyway.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import optax

from jaxtune.lora import EMBEDDING_PATHS
from jaxtune.params import path_of

log = logging.getLogger(__name__)

EMBEDDING, HEAD = EMBEDDING_PATHS


@dataclasses.dataclass(frozen=True)
class VocabExtension:
    """What `extend_tokenizer` did: the added tokens, their ids, the model vocabulary before / after,
    and `base_rows`, the rows that held real tokens before (their mean initialises the new ones)."""

    added: tuple[str, ...]
    new_ids: tuple[int, ...]
    old_size: int
    new_size: int
    base_rows: int

    @property
    def changed(self) -> bool:
        return bool(self.added)


def parse_tokens(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    names = spec.split(",") if isinstance(spec, str) else (spec or ())
    tokens: list[str] = []
    for name in (n.strip() for n in names):
        if name and name not in tokens:
            tokens.append(name)
    return tuple(tokens)


def extend_tokenizer(tokenizer, tokens: Iterable[str], vocab_size: int) -> VocabExtension:
    """Add the missing `tokens` to `tokenizer` (in place) as special tokens; `vocab_size` is the model's."""
    known = tokenizer.get_vocab()
    tokens = parse_tokens(tokens)
    present = [t for t in tokens if t in known]
    missing = [t for t in tokens if t not in known]
    if present:
        log.info("data.add_tokens: already in the tokenizer, not added: %s", ", ".join(present))
    base_rows = min(len(tokenizer), vocab_size)
    if not missing:
        return VocabExtension((), (), vocab_size, vocab_size, base_rows)
    tokenizer.add_tokens(missing, special_tokens=True)
    new_ids = tuple(int(i) for i in tokenizer.convert_tokens_to_ids(missing))
    new_size = len(tokenizer)
    log.info("data.add_tokens: added %s (ids %s); model vocabulary %d -> %d", ", ".join(missing),
             ", ".join(map(str, new_ids)), vocab_size, new_size)
    return VocabExtension(tuple(missing), new_ids, vocab_size, new_size, base_rows)


def resize_rows(table_VxD: jax.Array, new_size: int, new_ids: Iterable[int], base_rows: int) -> jax.Array:
    """`table` with `new_size` rows: old rows kept (cut or extended), the rows of `new_ids` (and any
    row past the old end) set to the float32 mean of rows [0, base_rows), cast to the table's dtype."""
    table_VxD = jnp.asarray(table_VxD)
    mean_D = jnp.mean(table_VxD[:base_rows].astype(jnp.float32), axis=0).astype(table_VxD.dtype)
    old_size, width = table_VxD.shape
    if new_size > old_size:
        table_VxD = jnp.concatenate([table_VxD, jnp.broadcast_to(mean_D, (new_size - old_size, width))])
    table_VxD = table_VxD[:new_size]
    ids = jnp.asarray(tuple(new_ids), jnp.int32)
    return table_VxD.at[ids].set(jnp.broadcast_to(mean_D, (ids.shape[0], width)))


def resize_params(params: dict, ext: VocabExtension, sharding_for=None) -> dict:
    """params with the embedding (and an untied lm_head kernel [D, V]) resized for `ext`; the other
    leaves are the same objects. Unchanged when nothing was added.

    `sharding_for(path, shape)`, if given, names where each resized leaf goes: it is then computed by
    a jit that writes it straight into that sharding (only the two vocabulary leaves are copied).
    """
    if not ext.changed:
        return params

    def resized(path, leaf):
        def fn(x):
            if path == HEAD:  # [D, V]: the vocabulary is the second axis
                return resize_rows(x.T, ext.new_size, ext.new_ids, ext.base_rows).T
            return resize_rows(x, ext.new_size, ext.new_ids, ext.base_rows)

        if sharding_for is None:
            return fn(leaf)
        return jax.jit(fn, out_shardings=sharding_for(path, jax.eval_shape(fn, leaf).shape))(leaf)

    model = params["model"]
    out = {**params, "model": {**model, "embed_tokens": {
        **model["embed_tokens"], "embedding": resized(EMBEDDING, model["embed_tokens"]["embedding"])}}}
    if "kernel" in params.get("lm_head", {}):
        out["lm_head"] = {**params["lm_head"], "kernel": resized(HEAD, params["lm_head"]["kernel"])}
    return out


def row_mask(ids: Iterable[int], vocab_size: int) -> jax.Array:
    """bool [vocab_size]: True at `ids`."""
    return jnp.zeros((vocab_size,), bool).at[jnp.asarray(tuple(ids), jnp.int32)].set(True)


def only_rows(ids: Iterable[int], vocab_size: int) -> optax.GradientTransformation:
    """Zero the updates of the embedding rows / untied head columns of every token not in `ids`;
    other leaves pass unchanged. Stateless."""
    ids = tuple(int(i) for i in ids)

    def mask_leaf(key_path, update):
        path = path_of(key_path)
        if path not in EMBEDDING_PATHS:
            return update
        keep = row_mask(ids, vocab_size)
        keep = keep[:, None] if path == EMBEDDING else keep[None, :]
        return jnp.where(keep, update, jnp.zeros_like(update))

    def update_fn(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(mask_leaf, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def train_new_rows(tx: optax.GradientTransformation, ext: VocabExtension) -> optax.GradientTransformation:
    """`tx` restricted to the new rows of the vocabulary-sized weights (masked before and after)."""
    if not ext.changed:
        return tx
    mask = only_rows(ext.new_ids, ext.new_size)
    return optax.chain(mask, tx, mask)
