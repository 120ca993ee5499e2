"""The training state in the form orbax stores it: typed PRNG keys as raw key data (and back, with the
implementation read from the abstract state), abstract trees that carry the target shardings, one
position-weighted checksum per leaf (orbax stores none), JSON documents of meta and metrics, and the
eval loss that ranks the best checkpoint."""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.params import path_str

BEST_METRIC = "eval_loss"


def json_value(value: Any) -> Any:
    """Tuples -> lists, numpy/jax scalars -> Python numbers, recursively (what JSON round-trips to)."""
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        return np.asarray(value).item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _is_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _key_impl_name(abstract_key) -> str:
    names = []
    jax.eval_shape(lambda key: names.append(jax.random.key_impl(key)), abstract_key)
    return str(names[0])


def abstract_like(tree):
    """Arrays -> ShapeDtypeStruct with the array's sharding; ShapeDtypeStructs pass through."""
    def to_abstract(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        dtype = leaf.dtype if hasattr(leaf, "dtype") else jnp.asarray(leaf).dtype
        return jax.ShapeDtypeStruct(np.shape(leaf), dtype, sharding=getattr(leaf, "sharding", None))
    return jax.tree_util.tree_map(to_abstract, tree)


def keys_to_data(state):
    """Typed PRNG key leaves -> their uint32 key data (what orbax can write)."""
    return jax.tree_util.tree_map(lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, state)


def abstract_storage(abstract_state):
    """The abstract tree orbax restores into: key leaves become key data with the key's sharding."""
    def storage(leaf):
        if not _is_key(leaf):
            return leaf
        data = jax.eval_shape(jax.random.key_data, leaf)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=leaf.sharding)
    return jax.tree_util.tree_map(storage, abstract_state)


def data_to_keys(restored, abstract_state):
    """Inverse of keys_to_data, with each key's implementation read from the abstract state."""
    def rebuild(data, leaf):
        return jax.random.wrap_key_data(data, impl=_key_impl_name(leaf)) if _is_key(leaf) else data
    return jax.tree_util.tree_map(rebuild, restored, abstract_state)


_BITS_OF_WIDTH = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _leaf_checksum(leaf: jax.Array) -> jax.Array:
    """sum(bits * (2 * position + 1)) mod 2**32: any change of one element changes it (odd weights)."""
    if leaf.dtype == jnp.bool_:
        bits = leaf.astype(jnp.uint32)
    else:  # 64-bit leaves become two uint32 words along a new last axis
        bits = jax.lax.bitcast_convert_type(leaf, _BITS_OF_WIDTH[leaf.dtype.itemsize]).astype(jnp.uint32)
    position = jnp.zeros(bits.shape, jnp.uint32)
    for axis in range(bits.ndim):  # row-major position without reshaping (keeps the sharding)
        stride = int(np.prod(bits.shape[axis + 1:], dtype=np.uint64) % (1 << 32))
        position = position + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride)
    return jnp.sum(bits * (position * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _checksums_on_device(leaves: list) -> list:
    return [_leaf_checksum(jnp.asarray(leaf)) for leaf in leaves]


def state_checksums(stored_state) -> dict[str, int]:
    """{leaf path: checksum} of a state as stored (keys as key data); equal on any mesh or device count."""
    flat = jax.tree_util.tree_flatten_with_path(stored_state)[0]
    sums = _checksums_on_device([leaf for _, leaf in flat])
    return {path_str(kp): int(np.asarray(value)) for (kp, _), value in zip(flat, sums)}


def checksum_mismatches(expected: dict, actual: dict) -> list[str]:
    return sorted(path for path in set(expected) | set(actual) if expected.get(path) != actual.get(path))


def json_document(value: Any, what: str) -> Any:
    document = json_value(value)
    try:
        json.dumps(document, allow_nan=True)
    except (TypeError, ValueError) as error:
        raise TypeError(f"checkpoint {what} must be JSON-serialisable: {error}") from error
    return document


def metric_for_best(metrics) -> float:
    """The eval loss orbax ranks by; missing or non-finite counts as worst."""
    value = (metrics or {}).get(BEST_METRIC)
    return float(value) if value is not None and math.isfinite(float(value)) else math.inf
