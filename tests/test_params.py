"""jaxtune.params: the param tree's paths, get/set, subtrees and the one shape report."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import params as params_lib
from jaxtune.errors import JaxtuneError

TREE = {"model": {"norm": {"scale": np.ones(4, np.float32)},
                  "layers": {"q_proj": {"kernel": np.ones((2, 4, 4), np.float32), "lora_a": np.ones((2, 4, 1))}}},
        "lm_head": {"kernel": np.ones((4, 8), np.float32)}}


class State(NamedTuple):
    count: np.ndarray
    mu: dict


class Mismatch(JaxtuneError, ValueError):
    pass


def test_paths_of_dicts_named_tuples_and_sequences():
    state = (State(np.zeros(()), {"model": {"norm": {"scale": np.zeros(4)}}}),)
    paths = [params_lib.path_of(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert paths == [("0", "count"), ("0", "mu", "model", "norm", "scale")]
    key_paths = [kp for kp, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert params_lib.path_str(key_paths[1]) == "0/mu/model/norm/scale"
    assert params_lib.path_str(("model", "norm")) == "model/norm"
    assert params_lib.trailing_dict_path(key_paths[1]) == ("model", "norm", "scale")
    assert params_lib.trailing_dict_path(key_paths[0]) == ()


def test_get_set_filter_split_merge_overlay():
    assert params_lib.get_leaf(TREE, ("model", "norm", "scale")).shape == (4,)
    with pytest.raises(KeyError, match="model/nope"):
        params_lib.get_leaf(TREE, ("model", "nope"))
    built: dict = {}
    params_lib.set_leaf(built, ("a", "b", "c"), 1)
    assert built == {"a": {"b": {"c": 1}}}
    adapters, rest = params_lib.split(TREE, lambda path: path[-1] == "lora_a")
    assert list(params_lib.flat(adapters)) == [("model", "layers", "q_proj", "lora_a")]
    assert ("model", "layers", "q_proj", "lora_a") not in params_lib.flat(rest)
    assert params_lib.flat(params_lib.merge_trees(rest, adapters)).keys() == params_lib.flat(TREE).keys()
    with pytest.raises(ValueError, match="present in two trees"):
        params_lib.merge_trees(TREE, adapters)
    assert params_lib.filter_tree(TREE, lambda path: False) == {}
    over = params_lib.overlay(TREE, {"lm_head": {"kernel": 0}, "extra": {"x": 1}})
    assert over["lm_head"]["kernel"] == 0 and over["extra"] == {"x": 1} and over["model"] is TREE["model"]
    assert TREE["lm_head"]["kernel"].shape == (4, 8)  # overlay copies, never writes into its inputs


def test_cast_and_count():
    cast = params_lib.cast_tree({"w": np.ones(3, np.float32), "ids": np.arange(2)}, jnp.bfloat16)
    assert cast["w"].dtype == jnp.bfloat16 and cast["ids"].dtype == jnp.asarray(np.arange(2)).dtype
    assert params_lib.count_params(TREE) == 4 + 32 + 8 + 32


def test_one_report_for_missing_unexpected_and_wrong_shapes():
    tree = {"model": {"norm": {"scale": np.ones(5)}}, "stray": np.ones(1)}
    with pytest.raises(Mismatch) as caught:
        params_lib.check_shapes(tree, TREE, "the checkpoint does not fit", Mismatch, complete=True)
    lines = str(caught.value).splitlines()
    assert lines[0] == "the checkpoint does not fit:"
    assert lines[1] == "  missing (3): lm_head/kernel; model/layers/q_proj/kernel; model/layers/q_proj/lora_a"
    assert lines[2] == "  unexpected (1): stray"
    assert lines[3] == "  wrong shape (1): model/norm/scale: saved (5,), model expects (4,)"
    params_lib.check_shapes({"lm_head": {"kernel": np.ones((4, 8))}}, TREE, "fits", Mismatch)  # partial is fine
    many = [f"t{i}" for i in range(25)]
    report = params_lib.mismatch_report("title", unexpected=many, hint="Try again.")
    assert report.splitlines()[1].endswith("t19 ...") and report.splitlines()[-1] == "Try again."
    assert params_lib.mismatch_report("title") is None
