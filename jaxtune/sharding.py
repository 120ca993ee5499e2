"""Mesh, logical axes of every parameter, logical -> mesh rules, and shardings for params/state/batch.

This module owns how arrays are laid out over devices. Nothing here computes a model.

Mesh. Three named axes, always in this order: ("data", "fsdp", "tensor"). `config.mesh.shape` gives
their sizes ("1,-1,1", [2, 2, 2], ...); one -1 takes the remaining devices. A shape that does not
use exactly all devices (`jax.devices()`: every process's devices in a multi-host run) raises
`ShardingError` before any compute, with a shape that works. Devices are ordered by `jax.make_mesh`
(topology-aware on TPU); with several processes jax.devices() is process-major, so the outer axes
(data, fsdp) span hosts first and "tensor" stays within a host when it fits there. Axis types are
`Auto`: jit in/out shardings place the arrays and XLA's SPMD partitioner does the rest, so the model
code carries no sharding annotations.

Logical axes. Every parameter dimension has a logical name, derived from its path alone
(`logical_axes`): "layers" (the nn.scan axis, never sharded), "vocab", "embed", "heads" (the
flattened H * head_dim dimension of q/o), "kv" (K * head_dim of k/v), "mlp", "head_dim" (q/k
norms). A LoRA pair of a kernel [in, out] is a [in, r] -> (in_axis, None) and b [r, out] ->
(None, out_axis): the base kernel's axis on the non-rank dimension, the rank always replicated.
The embedding's a [V, r] / b [r, D] follow the embedding [vocab, embed] the same way. The NF4
leaves of a quantised weight (model.quantize) carry the weight's axes in HF layout (`quantized_axes`).

Rules. A short list of (logical axis, mesh axes) pairs, `DEFAULT_RULES`: FSDP over "embed",
tensor parallelism over heads/kv/mlp/vocab, the batch over (data, fsdp), everything else
replicated. `config.mesh.rules` overrides single entries ("mlp=none,vocab=fsdp", or pairs).

Dimensions that do not divide. Default (`strict=False`): the dimension falls back to fewer mesh
axes - for a multi-axis rule the longest prefix of its axes whose size product divides the
dimension, else replicated - and ONE warning lists every parameter affected (it costs memory, never
correctness). The same fallback applies when a mesh axis is already used by an earlier dimension of
the same array (possible only with custom rules). `strict=True` raises `ShardingError` instead.

Optimizer state mirrors the parameter trees (optax), so `state_shardings` matches each state leaf
to a parameter by the trailing dict-key path of the leaf plus its rank; everything else (step
counts, and any statistic whose rank is not its parameter's, e.g. factored second moments) is
replicated. `jaxtune.state.build` creates the whole train state under jit in these shardings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune import lora
from jaxtune import params as params_lib
from jaxtune.errors import JaxtuneError
from jaxtune.models import quant

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXES = ("batch", "layers", "vocab", "embed", "heads", "kv", "mlp", "head_dim")

# logical axis -> mesh axis, tuple of mesh axes (sharded over their product), or None (replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
)

# module name -> logical axes of its weight [in, out] (an embedding table is [vocab, embed])
WEIGHT_AXES = {
    "embed_tokens": ("vocab", "embed"),
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv"),
    "v_proj": ("embed", "kv"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "lm_head": ("embed", "vocab"),
}
NORM_AXES = {
    "input_layernorm": "embed",
    "post_attention_layernorm": "embed",
    "norm": "embed",
    "q_norm": "head_dim",
    "k_norm": "head_dim",
}
SCANNED_PREFIX = ("model", "layers")
QUANTIZED_LEAVES = quant.ALL_LEAVES  # NF4 leaves (model.quantize), in place of a frozen kernel

Path = tuple[str, ...]
Rules = tuple[tuple[str, tuple[str, ...]], ...]


class ShardingError(JaxtuneError, ValueError):
    """A mesh or rule set that cannot work; the message says how to fix it."""


# --------------------------------------------------------------------------------------------
# Mesh


def parse_mesh_shape(shape: str | Sequence[int]) -> tuple[int, int, int]:
    """'1,-1,1' / '(2, 2, 2)' / [1, -1, 1] -> three ints (data, fsdp, tensor); -1 still unresolved."""
    try:
        if isinstance(shape, str):
            sizes = tuple(int(s) for s in shape.strip("()[] ").split(",") if s.strip())
        else:
            sizes = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ShardingError(f"mesh.shape={shape!r}: expected three integers 'data,fsdp,tensor', "
                            f"e.g. --config.mesh.shape=1,-1,1") from None
    if len(sizes) != len(MESH_AXES):
        raise ShardingError(f"mesh.shape={shape!r}: expected three sizes (data, fsdp, tensor), "
                            f"e.g. --config.mesh.shape=1,-1,1")
    return sizes  # type: ignore[return-value]


def _fix_hint(num_devices: int) -> str:
    return (f"{num_devices} devices: try --config.mesh.shape=1,{num_devices},1 (FSDP), "
            f"{num_devices},1,1 (data parallel) or 1,-1,1 (all devices on fsdp)")


def resolve_mesh_shape(shape: str | Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """Mesh sizes with the -1 filled in; ShardingError unless they use exactly `num_devices`."""
    sizes = parse_mesh_shape(shape)
    written = ",".join(map(str, sizes))
    if any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh.shape={written}: sizes must be >= 1 (or one -1). {_fix_hint(num_devices)}")
    if sizes.count(-1) > 1:
        raise ShardingError(f"mesh.shape={written}: at most one size may be -1. {_fix_hint(num_devices)}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ShardingError(f"mesh.shape={written}: the fixed sizes (product {fixed}) do not divide the "
                                f"{num_devices} devices. {_fix_hint(num_devices)}")
        sizes = tuple(num_devices // fixed if s == -1 else s for s in sizes)
    elif fixed != num_devices:
        raise ShardingError(f"mesh.shape={written} needs {fixed} devices but there are {num_devices}. "
                            f"{_fix_hint(num_devices)}")
    return sizes  # type: ignore[return-value]


def make_mesh(shape: str | Sequence[int] = "1,-1,1", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: every process's devices)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(shape, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)


def describe_mesh(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + f" ({mesh.size} devices)"


# --------------------------------------------------------------------------------------------
# Logical axes


def logical_axes(path: Path, ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of the param at `path` (e.g. ('model', 'layers', 'mlp', 'up_proj', 'kernel'))."""
    module, leaf = (path[-2], path[-1]) if len(path) >= 2 else ("", path[-1] if path else "")
    if leaf in QUANTIZED_LEAVES and module in WEIGHT_AXES:
        axes = quantized_axes(module, leaf)
    elif leaf in ("kernel", "embedding", "bias", "lora_a", "lora_b", "lora_magnitude") and module in WEIGHT_AXES:
        in_axis, out_axis = WEIGHT_AXES[module]
        axes = {"kernel": (in_axis, out_axis), "embedding": (in_axis, out_axis), "bias": (out_axis,),
                "lora_a": (in_axis, None), "lora_b": (None, out_axis), "lora_magnitude": (out_axis,)}[leaf]
    elif leaf == "scale" and module in NORM_AXES:
        axes = (NORM_AXES[module],)
    else:
        raise ShardingError(f"no logical axes known for param {'/'.join(path)}: add its module to "
                            f"jaxtune.sharding.WEIGHT_AXES or NORM_AXES")
    if path[:2] == SCANNED_PREFIX:
        axes = ("layers",) + axes
    if len(axes) != ndim:
        raise ShardingError(f"param {'/'.join(path)} has {ndim} dims but its logical axes are {axes}")
    return axes


def quantized_axes(module: str, leaf: str) -> tuple[str | None, ...]:
    """Logical axes of an NF4 leaf (jaxtune.models.quant): `nf4` [out, in/2], `absmax` and
    `absmax_code` [out, in/64] are in HF layout, so a kernel's are its (out, in) axes, an embedding's
    its (vocab, embed): sharded like the weight wherever the dimension divides. The second-level
    scales of double quantisation (`absmax_scale`, one float per 16384 weights) and `absmax_offset`
    are replicated."""
    in_axis, out_axis = WEIGHT_AXES[module]
    weight = (in_axis, out_axis) if module == "embed_tokens" else (out_axis, in_axis)
    return {"nf4": weight, "absmax": weight, "absmax_code": weight, "absmax_scale": (None,),
            "absmax_offset": ()}[leaf]


def logical_axes_tree(params) -> Any:
    """Tree of logical-axis tuples, one per leaf of `params` (arrays or ShapeDtypeStructs).

    The tuples are pytree nodes: flatten the result with `is_leaf=lambda x: isinstance(x, tuple)`.
    """
    return jax.tree_util.tree_map_with_path(lambda kp, x: logical_axes(params_lib.path_of(kp), len(x.shape)), params)


# --------------------------------------------------------------------------------------------
# Rules


def _mesh_axes_of(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        names = [] if value.strip().lower() in ("", "none") else value.replace("+", " ").split()
    else:
        names = list(value)
    for name in names:
        if name not in MESH_AXES:
            raise ShardingError(f"mesh.rules: {where} maps to unknown mesh axis {name!r}; "
                                f"mesh axes are {', '.join(MESH_AXES)} (or none)")
    if len(set(names)) != len(names):
        raise ShardingError(f"mesh.rules: {where} repeats a mesh axis ({'+'.join(names)})")
    return tuple(names)


def _rule_pairs(overrides: str | Mapping | Iterable | None) -> list[tuple[str, Any]]:
    if overrides is None or (isinstance(overrides, str) and not overrides.strip()):
        return []
    if isinstance(overrides, str):
        pairs = []
        for item in overrides.split(","):
            if not item.strip():
                continue
            if "=" not in item:
                raise ShardingError(f"mesh.rules: {item.strip()!r} is not LOGICAL=MESH_AXES "
                                    f"(e.g. --config.mesh.rules=mlp=none,vocab=fsdp,batch=data+fsdp)")
            logical, mesh_axes = item.split("=", 1)
            pairs.append((logical.strip(), mesh_axes.strip()))
        return pairs
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    return [tuple(pair) for pair in overrides]


def make_rules(overrides: str | Mapping | Iterable | None = None) -> Rules:
    """DEFAULT_RULES with the entries named in `overrides` replaced.

    overrides: '' / None (defaults), 'mlp=none,vocab=fsdp,batch=data+fsdp', a dict, or (logical,
    mesh axis | tuple of mesh axes | None) pairs. Every logical axis keeps exactly one rule.
    """
    rules = {logical: _mesh_axes_of(mesh_axes, logical) for logical, mesh_axes in DEFAULT_RULES}
    for pair in _rule_pairs(overrides):
        if len(pair) != 2:
            raise ShardingError(f"mesh.rules: {pair!r} is not a (logical axis, mesh axes) pair")
        logical, mesh_axes = pair
        if logical not in LOGICAL_AXES:
            raise ShardingError(f"mesh.rules: unknown logical axis {logical!r}; "
                                f"logical axes are {', '.join(LOGICAL_AXES)}")
        rules[logical] = _mesh_axes_of(mesh_axes, logical)
    if rules["layers"]:
        raise ShardingError("mesh.rules: 'layers' (the scanned layer axis) cannot be sharded; map it to none")
    return tuple(rules.items())


def _as_rules(rules) -> dict[str, tuple[str, ...]]:
    """Any accepted rules form (make_rules output included: it is idempotent) -> {logical: mesh axes}."""
    return dict(make_rules(rules))


# --------------------------------------------------------------------------------------------
# Logical axes + rules + shape -> PartitionSpec


def spec_for(path: Path, shape: Sequence[int], mesh: Mesh, rules=None) -> tuple[PartitionSpec, list[str]]:
    """PartitionSpec of one param, and a note for each dimension that fell back to fewer mesh axes."""
    rule_map = _as_rules(rules)
    axes = logical_axes(path, len(shape))
    used: set[str] = set()
    entries, notes = [], []
    for dim, (logical, size) in enumerate(zip(axes, shape)):
        wanted = rule_map.get(logical, ()) if logical is not None else ()
        free = tuple(a for a in wanted if a not in used)
        kept: tuple[str, ...] = ()
        for axis in free:  # longest prefix whose size product divides the dimension
            if size % (math.prod(mesh.shape[a] for a in kept + (axis,))) == 0:
                kept += (axis,)
            else:
                break
        if kept != wanted:
            dropped = [a for a in wanted if a not in kept]
            reason = ("already used by another dimension" if any(a in used for a in dropped)
                      else f"{size} not divisible by " + "*".join(f"{a}={mesh.shape[a]}" for a in free))
            notes.append(f"{'/'.join(path)} {tuple(shape)} dim {dim} ({logical}): "
                         f"{'+'.join(dropped)} dropped ({reason})")
        used.update(kept)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*entries), notes


def _report_fallbacks(notes: list[str], strict: bool) -> None:
    if not notes:
        return
    if strict:
        raise ShardingError("these param dimensions do not shard over the mesh:\n  " + "\n  ".join(notes)
                            + "\nChoose mesh sizes that divide them, or map their logical axis to none "
                              "(e.g. --config.mesh.rules=mlp=none)")
    log.warning("%d param dimension(s) replicated over some mesh axes (more memory per device, same results):\n  %s",
                len(notes), "\n  ".join(notes))


def param_shardings(params, mesh: Mesh, rules=None, *, strict: bool = False):
    """Tree of NamedSharding for `params` (arrays or ShapeDtypeStructs, any subtree of the param tree).

    Non-dividing dimensions fall back (one warning for all of them), or raise when `strict`.
    """
    rule_map = _as_rules(rules)
    notes: list[str] = []

    def sharding(key_path, leaf):
        spec, leaf_notes = spec_for(params_lib.path_of(key_path), leaf.shape, mesh, rule_map)
        notes.extend(leaf_notes)
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(sharding, params)
    _report_fallbacks(notes, strict)
    return shardings


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# --------------------------------------------------------------------------------------------
# Batch


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
    """Leading (batch) dim over the 'batch' rule's mesh axes (default data x fsdp); the rest replicated."""
    batch_axes = _as_rules(rules)["batch"]
    return NamedSharding(mesh, PartitionSpec(batch_axes if batch_axes else None))


def device_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh, rules=None) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global jax.Arrays sharded by `batch_sharding`.

    With one process `host_batch` is the whole batch; with N processes each passes its own
    contiguous 1/N of the rows (jax.make_array_from_process_local_data stitches them together).
    """
    sharding = batch_sharding(mesh, rules)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in host_batch.items()}


# --------------------------------------------------------------------------------------------
# Creating arrays directly in their sharding


def place_fn(mesh: Mesh, rules=None, *, strict: bool = False) -> Callable[[Path, np.ndarray], jax.Array]:
    """`place(path, numpy_array)` for `hf.load_params(place=...)`: the leaf straight into its sharding.

    Uses jax.make_array_from_callback, so each process copies to its devices only the shards they
    hold (multi-host safe); no device ever holds the full unsharded tensor. A dimension that falls
    back is warned about once per param as it is loaded (or raises when `strict`).
    """
    rule_map = _as_rules(rules)

    def place(path: Path, array: np.ndarray) -> jax.Array:
        spec, notes = spec_for(tuple(path), array.shape, mesh, rule_map)
        _report_fallbacks(notes, strict)
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index], dtype=array.dtype)

    return place


def create_sharded(fn: Callable, out_shardings, *args, static_argnums: int | Sequence[int] = ()):
    """fn(*args) computed under jit with `out_shardings`: outputs are born sharded, never gathered."""
    return jax.jit(fn, static_argnums=static_argnums, out_shardings=out_shardings)(*args)


def init_adapters_sharded(cfg, rng: jax.Array, mesh: Mesh, rules=None, *, strict: bool = False,
                          base: dict | None = None) -> dict:
    """jaxtune.lora.init_adapters(cfg, rng, base), each adapter created directly in its sharding
    (`base`: the base params, which DoRA's magnitudes are initialised from)."""
    shardings = param_shardings(lora.adapter_shapes(cfg), mesh, rules, strict=strict)
    return create_sharded(lora.init_adapters, shardings, cfg, rng, base, static_argnums=0)


# --------------------------------------------------------------------------------------------
# Optimizer state


def state_shardings(abstract_opt_state, param_shardings_tree, mesh: Mesh):
    """Tree of NamedSharding for an optimizer state (e.g. `jax.eval_shape(tx.init, params)`).

    A state leaf whose trailing dict-key path is a parameter's path (optax nests param-shaped
    statistics as `...mu['model']['layers']...['kernel']`) and whose rank equals that parameter's
    (AdamW mu/nu, momentum, ...) takes the parameter's sharding; every other leaf (step counts,
    schedule state, factored statistics of a lower rank) is replicated. Works on any optax chain /
    multi_transform / masked state without needing the optimizer itself.
    """
    by_path: dict[Path, NamedSharding] = {
        params_lib.path_of(kp): s for kp, s in jax.tree_util.tree_flatten_with_path(param_shardings_tree)[0]}

    def sharding(key_path, leaf):
        param_sharding = by_path.get(params_lib.trailing_dict_path(key_path))
        if param_sharding is not None and _mirrors(leaf.shape, param_sharding):
            return param_sharding
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(sharding, abstract_opt_state)


def _mirrors(shape: Sequence[int], sharding: NamedSharding) -> bool:
    """True when a state leaf of `shape` can take its parameter's sharding: same rank, even split."""
    if len(sharding.spec) != len(shape):
        return False
    for size, entry in zip(shape, sharding.spec):
        mesh_axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        if size % math.prod(sharding.mesh.shape[a] for a in mesh_axes):
            return False
    return True

