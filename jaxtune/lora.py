"""LoRA: target selection, adapter init, the trainable predicate, tree splitting, merging.

The adapter of a kernel W [in, out] is `lora_a` [in, r] (PEFT's kaiming-uniform init) and `lora_b`
[r, out] (zeros), stored next to the kernel; the model adds `scaling * dropout(x) a b`. Embedding
adapters follow PEFT (`lora_a` [V, r] zeros, `lora_b` [r, D] normal). Scanned layers carry a
leading layer axis L on both. Adapters are float32 whatever the base weights' dtype (see
`jaxtune.models.llama.ADAPTER_DTYPE`).

DoRA (`LoRAConfig.dora`, jaxtune/models/dora.py) adds `lora_magnitude` [out] next to a linear target's
lora_a / lora_b, initialised from the base kernel (`init_adapters(cfg, rng, base)`): ||W + scaling a b||
per output feature. It is an adapter leaf like the other two (trainable, checkpointed, exported).
Embedding and lm_head adapters stay plain LoRA: DoRA on them is refused by name (`lora_config`).

Trainable vs frozen is ONE predicate over parameter paths (`is_trainable`): optimizer labels,
the train/frozen split, adapter-only checkpoints and exports all derive from it. A LoRA run that
added tokens to the vocabulary (config.data.add_tokens, jaxtune/vocab.py) also trains the
embedding table and an untied lm_head kernel (`train_embeddings=True`); the optimizer then updates
only their new-token rows (`vocab.only_rows`).
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp

from jaxtune import params as params_lib
from jaxtune.models import dora
from jaxtune.models.llama import ALL_TARGETS, LINEAR_TARGETS, LoRAConfig, ModelConfig, abstract_params, lora_a_init

LORA_LEAVES = ("lora_a", "lora_b", "lora_magnitude")
# The vocabulary-sized weights: their rows (columns of the [D, V] head kernel) are token ids.
EMBEDDING_PATHS = (("model", "embed_tokens", "embedding"), ("lm_head", "kernel"))
VOCABULARY_TARGETS = ("embed_tokens", "lm_head")
_SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                "up": "up_proj", "down": "down_proj", "embed": "embed_tokens", "head": "lm_head"}

Path = tuple[str, ...]


def parse_targets(spec: str | Iterable[str]) -> tuple[str, ...]:
    """'q,v' / 'q_proj,v_proj' / 'all-linear' / 'all' / a tuple -> HF module names in ALL_TARGETS order.

    Targets are a set: 'v,q' and 'q_proj,v_proj' give the same tuple, so every comparison (lora.init_from,
    the checkpoint fingerprint) and every listing sees one canonical order.
    """
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    targets: set[str] = set()
    for name in names:
        expanded = {"all-linear": LINEAR_TARGETS, "all": ALL_TARGETS}.get(name, (_SHORT_NAMES.get(name, name),))
        for target in expanded:
            if target not in ALL_TARGETS:
                raise ValueError(f"lora.targets: unknown module {name!r}; choose from {', '.join(ALL_TARGETS)} "
                                 f"(or q,k,v,o,gate,up,down,embed,head, 'all-linear', 'all')")
            targets.add(target)
    if not targets:
        raise ValueError("lora.targets is empty: name at least one module, e.g. --config.lora.targets=all-linear")
    return tuple(target for target in ALL_TARGETS if target in targets)


def lora_config(rank: int, alpha: float, dropout: float, targets, rslora: bool, dora: bool = False) -> LoRAConfig:
    if rank < 1:
        raise ValueError(f"lora.rank={rank}: the rank must be >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora.dropout={dropout}: must be in [0, 1)")
    targets = parse_targets(targets)
    vocabulary = [t for t in targets if t in VOCABULARY_TARGETS]
    if dora and vocabulary:
        raise ValueError(f"lora.dora=True with lora.targets including {', '.join(vocabulary)}: jaxtune's DoRA adapts "
                         f"linear layers of the blocks only; drop {', '.join(vocabulary)} from lora.targets "
                         f"(e.g. --config.lora.targets=all-linear) or set --config.lora.dora=false")
    return LoRAConfig(rank=int(rank), alpha=float(alpha), dropout=float(dropout),
                      targets=targets, rslora=bool(rslora), dora=bool(dora))


def is_lora_path(path: Path) -> bool:
    return path[-1] in LORA_LEAVES


def is_trainable(path: Path, full_finetune: bool, train_embeddings: bool = False) -> bool:
    """THE predicate: full fine-tuning trains everything; LoRA trains the adapter leaves, plus the
    embedding table and untied lm_head kernel when `train_embeddings` (new tokens were added)."""
    return full_finetune or is_lora_path(path) or (train_embeddings and tuple(path) in EMBEDDING_PATHS)


def split_trainable(params: dict, full_finetune: bool, train_embeddings: bool = False) -> tuple[dict, dict]:
    """params -> (trainable subtree, frozen subtree); `params.merge_trees` puts them back together."""
    return params_lib.split(params, lambda path: is_trainable(path, full_finetune, train_embeddings))


def adapter_shapes(cfg: ModelConfig) -> dict:
    """ShapeDtypeStruct tree of only the LoRA leaves of `cfg` (which must have cfg.lora set)."""
    return params_lib.filter_tree(abstract_params(cfg), is_lora_path)


def init_adapters(cfg: ModelConfig, rng: jax.Array, base: dict | None = None) -> dict:
    """Fresh adapters for cfg.lora: linear a ~ PEFT kaiming-uniform, b = 0; embedding a = 0, b ~ N(0, 1);
    DoRA magnitudes ||W|| per output feature, read from `base` (the base param tree; required for DoRA).

    Always float32 (models.llama.ADAPTER_DTYPE), whatever cfg.param_dtype: they are trained."""
    shapes = adapter_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(rng, len(flat))

    def init_leaf(path: Path, leaf, key):
        is_embedding = path[:2] == ("model", "embed_tokens")
        if path[-1] == "lora_a" and not is_embedding:
            # lora_a_init expects [in, r]; scanned leaves carry a leading layer axis.
            return jax.vmap(lambda k: lora_a_init(k, leaf.shape[-2:], leaf.dtype))(
                jax.random.split(key, leaf.shape[0])) if len(leaf.shape) == 3 else lora_a_init(key, leaf.shape, leaf.dtype)
        if path[-1] == "lora_b" and is_embedding:
            return jax.random.normal(key, leaf.shape, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    leaves = [init_leaf(params_lib.path_of(kp), leaf, key) for (kp, leaf), key in zip(flat, keys)]
    adapters = jax.tree_util.tree_unflatten(treedef, leaves)
    if cfg.lora.dora:
        if base is None:
            raise ValueError("init_adapters: DoRA magnitudes are the base kernels' norms: pass the base params")
        adapters = with_dora_magnitudes(adapters, base, cfg)
    return adapters


def with_dora_magnitudes(adapters: dict, base: dict, cfg: ModelConfig) -> dict:
    """`adapters` with every `lora_magnitude` set to ||W + scaling a b|| of its base kernel W (PEFT's
    DoRA init: with b = 0 the adapted model equals the base model)."""
    def set_magnitude(key_path, leaf):
        path = params_lib.path_of(key_path)
        if path[-1] != "lora_magnitude":
            return leaf
        module = path[:-1]
        kernel = params_lib.get_leaf(base, module + ("kernel",))
        a, b = (params_lib.get_leaf(adapters, module + (name,)) for name in ("lora_a", "lora_b"))
        return dora.weight_norm(kernel, a, b, cfg.lora.scaling).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(set_magnitude, adapters)


def lora_delta(a, b, scaling: float):
    """scaling * a b in float32, for [in, r] x [r, out] or stacked [L, in, r] x [L, r, out]."""
    return scaling * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))



def merge_unties(cfg: ModelConfig) -> bool:
    """Whether merging cfg's adapters must untie the head: a tied model with any vocabulary adapter.

    Training computes the head from the base E (plus its own lm_head delta) and the embedding from
    E + dE; one shared matrix can hold both only when neither carries an adapter.
    """
    return cfg.tie_word_embeddings and cfg.lora is not None and bool(set(VOCABULARY_TARGETS) & set(cfg.lora.targets))


def merge_adapters(params: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """Fold every adapter into its base weight (float32, then cast back) -> (base params, cfg).
    A DoRA target becomes m (W + scaling a b) / ||W + scaling a b|| (PEFT's DoRA merge).

    A tied model with an embed_tokens or lm_head adapter comes back untied (`merge_unties`): the
    lm_head kernel is the base E^T plus the head's own delta, the embedding E plus its own delta,
    tie_word_embeddings False.
    """
    if cfg.lora is None:
        return params, cfg
    scaling = cfg.lora.scaling
    base, adapters = split_trainable(params, full_finetune=False)[1], params_lib.filter_tree(params, is_lora_path)
    merged = jax.tree_util.tree_map(lambda x: x, base)
    untie = merge_unties(cfg)
    if untie:  # taken before any fold: the head never sees the embedding's delta
        merged["lm_head"] = {"kernel": base["model"]["embed_tokens"]["embedding"].T}

    def fold(node: dict, adapter: dict):
        for key, sub in adapter.items():
            if "lora_magnitude" in sub:  # DoRA: W' = m (W + s a b) / ||W + s a b||
                node[key]["kernel"] = dora.merged_kernel(node[key]["kernel"], sub["lora_a"], sub["lora_b"],
                                                         sub["lora_magnitude"], scaling)
            elif "lora_a" in sub:
                weight_key = "embedding" if "embedding" in node[key] else "kernel"
                weight = node[key][weight_key]
                node[key][weight_key] = (weight.astype(jnp.float32)
                                         + lora_delta(sub["lora_a"], sub["lora_b"], scaling)).astype(weight.dtype)
            else:
                fold(node[key], sub)

    # The tied head's adapter is folded into the untied copy; the embedding keeps only its own.
    fold(merged, adapters)
    return merged, cfg.replace(lora=None, tie_word_embeddings=cfg.tie_word_embeddings and not untie)

