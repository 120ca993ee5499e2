"""The param tree: the nested dict of arrays every jaxtune model, adapter and checkpoint uses.

This module owns the tree as data, for every layer above it:
  * paths: `path_of(key_path)` turns a JAX key path into a tuple of strings, the one spelling of a
    parameter's name ('model', 'layers', 'self_attn', 'q_proj', 'kernel'); `path_str` joins it
    with '/' (checkpoint metadata); `trailing_dict_path` reads a parameter path at the end of an
    optimizer-state key path.
  * get / set: `get_leaf`, `set_leaf`.
  * subtrees: `filter_tree` (keep leaves by a path predicate), `split` (by a predicate, into the
    kept and the rest), `merge_trees` (union of disjoint trees), `overlay` (one tree's leaves put
    over another's), `cast_tree`, `count_params`.
  * the one shape check: `check_shapes` (a tree against the shapes a model expects) and
    `raise_mismatch`, the one "missing / unexpected / wrong shape" report, also used by the HF and
    PEFT readers for their tensor names.
Nothing here knows about models, LoRA or files; imported by everything from models up, so that
imports only jax, numpy and jaxtune.errors.

Callers import it as `from jaxtune import params as params_lib`, since `params` names the tree itself
almost everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.errors import JaxtuneError

Path = tuple[str, ...]
Shape = tuple[int, ...]

REPORT_LIMIT = 20  # items listed per group of a mismatch report; the rest are counted


# ============================================================================================
# Paths


def _key_name(key) -> str:
    """One entry of a JAX key path: DictKey.key, GetAttrKey.name, SequenceKey.idx, as a string."""
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def path_of(key_path) -> Path:
    """A JAX key path (from tree_flatten_with_path / tree_map_with_path) -> ('model', 'layers', ...)."""
    return tuple(_key_name(k) for k in key_path)


def path_str(key_path_or_path) -> str:
    """'model/layers/self_attn/q_proj/kernel' for a key path or a path tuple."""
    if all(isinstance(k, str) for k in key_path_or_path):
        return "/".join(key_path_or_path)
    return "/".join(path_of(key_path_or_path))


def trailing_dict_path(key_path) -> Path:
    """The dict keys at the end of a key path: an optimizer-state leaf's parameter path (optax nests
    param-shaped statistics as `...mu['model']['layers']...['kernel']`)."""
    keys: list[str] = []
    for key in reversed(key_path):
        if not isinstance(key, jax.tree_util.DictKey):
            break
        keys.append(str(key.key))
    return tuple(reversed(keys))


def flat(tree) -> dict[Path, Any]:
    """{path: leaf} of a tree."""
    return {path_of(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shapes(tree) -> dict[Path, Shape]:
    """{path: shape} of a tree of arrays or ShapeDtypeStructs."""
    return {path: tuple(np.shape(leaf)) for path, leaf in flat(tree).items()}


# ============================================================================================
# Get / set


def get_leaf(tree: Mapping, path: Sequence[str]):
    """tree[p0][p1]...; KeyError naming the whole path when any part is absent."""
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError("/".join(path))
        node = node[key]
    return node


def set_leaf(tree: dict, path: Sequence[str], value) -> None:
    """tree[p0][p1]... = value, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ============================================================================================
# Subtrees


def filter_tree(tree: Mapping, keep: Callable[[Path], bool], prefix: Path = ()) -> dict:
    """The leaves whose path satisfies `keep`, empty dicts dropped."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            sub = filter_tree(value, keep, prefix + (key,))
            if sub:
                out[key] = sub
        elif keep(prefix + (key,)):
            out[key] = value
    return out


def split(tree: Mapping, predicate: Callable[[Path], bool]) -> tuple[dict, dict]:
    """tree -> (leaves where predicate(path), the others); `merge_trees` puts them back together."""
    return filter_tree(tree, predicate), filter_tree(tree, lambda path: not predicate(path))


def merge_trees(*trees: Mapping) -> dict:
    """Union of nested dicts with disjoint leaves."""
    out: dict = {}
    for tree in trees:
        for key, value in tree.items():
            if isinstance(value, Mapping):
                out[key] = merge_trees(out.get(key, {}), value)
            elif key in out:
                raise ValueError(f"leaf {key!r} present in two trees")
            else:
                out[key] = value
    return out


def overlay(base: Mapping, top: Mapping) -> dict:
    """`base` with every leaf of `top` put in (added, or replacing the base leaf)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = overlay(base.get(key, {}), value) if isinstance(value, Mapping) else value
    return out


def cast_tree(tree, dtype) -> Any:
    """Every floating leaf as a jax array of `dtype` (integer leaves unchanged, as jax arrays)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(np.asarray(x).dtype, jnp.floating) else jnp.asarray(x),
        tree)


def count_params(tree: Any) -> int:
    """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


# ============================================================================================
# The one shape check


def mismatch_report(title: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                    wrong_shape: Sequence[str] = (), hint: str = "") -> str | None:
    """The one report of a tree or file that does not fit a model, or None when all lists are empty:

        TITLE:
          missing (N): a; b; ...
          unexpected (N): ...
          wrong shape (N): name: file (..), model expects (..); ...
        HINT
    """
    if not (missing or unexpected or wrong_shape):
        return None
    lines = [f"{title}:"]
    for group, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if items:
            more = " ..." if len(items) > REPORT_LIMIT else ""
            lines.append(f"  {group} ({len(items)}): " + "; ".join(items[:REPORT_LIMIT]) + more)
    if hint:
        lines.append(hint)
    return "\n".join(lines)


def raise_mismatch(error: type[JaxtuneError], title: str, missing: Sequence[str] = (),
                   unexpected: Sequence[str] = (), wrong_shape: Sequence[str] = (), hint: str = "") -> None:
    """Raise `error(mismatch_report(...))` when any list is non-empty."""
    report = mismatch_report(title, missing, unexpected, wrong_shape, hint)
    if report is not None:
        raise error(report)


def check_shapes(tree, expected: Mapping[Path, Shape] | Any, what: str, error: type[JaxtuneError],
                 complete: bool = False, saved: str = "saved") -> None:
    """Every leaf of `tree` is in `expected` ({path: shape}, or a tree of arrays / ShapeDtypeStructs)
    with the same shape (and, if `complete`, every expected path is there), or one `error` lists
    the differences (`mismatch_report`)."""
    want = dict(expected) if isinstance(expected, Mapping) and all(
        isinstance(k, tuple) for k in expected) else shapes(expected)
    have = shapes(tree)
    unexpected = [path_str(path) for path in have if path not in want]
    wrong = [f"{path_str(path)}: {saved} {shape}, model expects {tuple(want[path])}"
             for path, shape in have.items() if path in want and shape != tuple(want[path])]
    missing = [path_str(path) for path in want if path not in have] if complete else []
    raise_mismatch(error, what, missing, unexpected, wrong)
