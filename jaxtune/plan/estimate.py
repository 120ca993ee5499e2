"""The analytic memory estimate: per-device bytes of one train step, by term, for any target.

Weights, gradients and optimizer state are counted from the run's abstract train state (the shapes
and shardings `jaxtune.state.build` gives, see plan/run.py). Activations, attention, the chunked
cross-entropy and the FSDP weight copies are formulas in the model's sizes; how many of each
buffer the compiler keeps alive at once is a per-platform habit (`COMPILER_HABITS`), fitted to the
compiler's own memory analysis of today's `jaxtune.step.train_step` (tests/test_plan.py holds the
estimate to within 15% of it). This module is the one owner of the activation estimate.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import ml_collections
import numpy as np

from jaxtune import step
from jaxtune.models.llama import DTYPES, ModelConfig
from jaxtune.params import merge_trees
from jaxtune.plan.run import Run, abstract_train_state

LAYER_PREFIX = ("model", "layers")


@dataclasses.dataclass(frozen=True)
class CompilerHabits:
    """How many buffers of each kind a platform's XLA compiler keeps alive at the step's peak.

    kept_scale: by remat policy, the share of the counted per-layer saved values (`saved_per_token`)
      that the compiled program really keeps for the backward pass (fusion drops some, e.g. the
      SiLU output recomputed from gate; layout copies add some).
    working_layers: one layer's whole activation set (`layer_all`) live at once while the backward
      runs it (recomputed inputs, their gradients), in units of that set.
    score_buffers: float32 [rows, H, T, T] score-sized buffers live while one layer's attention
      runs backward (scores, probabilities, their gradient; jaxtune's attention keeps none across
      layers: only the softmax's row max and sum).
    logits_buffers: float32 [rows, chunk, V] buffers live at once in the chunked cross-entropy
      (one chunk's logits, softmax and gradient; the other chunks do not exist then).
    hidden_buffers: [rows, T, D] float32 buffers around the loss (the final hidden states cut into
      chunks, their accumulated gradient).
    gathered_layers: FSDP: all-gathered (unsharded over fsdp) copies of one layer's weights in the
      compute dtype live at once (the layer being run and the next one, prefetched).
    gathered_head: FSDP: all-gathered copies of the output head / tied embedding.
    update_buffers: trainable-sized float32 temporaries of the optimizer update besides the gradient
      (clipped gradient, the Adam update before it replaces the donated weights).
    """

    kept_scale: dict[str, float]
    working_layers: float
    score_buffers: float
    logits_buffers: float
    hidden_buffers: float
    gathered_layers: float
    gathered_head: float
    update_buffers: float


# Fitted (least squares on the relative error, bounds that keep each count physical) to the compilers'
# memory analyses of today's train step: TPU: deviceless v5e-4 compiles of a 4-layer model (LoRA and
# full, remat none and full, 2 and 4 rows per chip at 512 tokens) and Llama-3.1-8B at 2048 tokens
# (LoRA r8 on v5e-8 at 4 rows per chip, the compiler's refusal naming its temporaries; full on v5p-8 at
# 4 rows per chip); CPU: XLA:CPU on one device, float32, LoRA and full, remat none and full, 512 and
# 1024 tokens. What the fits say about the compilers:
#  - the kept share is far above one under remat full on TPU (6.4 layer inputs' worth per layer and
#    token): besides each layer's input the scanned backward keeps per-layer copies the count does
#    not name (its own layouts of the input, the dropout bits); remat none keeps 3.3 times the counted
#    values (float32 norm and RoPE intermediates, the LoRA kernels' residuals);
#  - the FSDP all-gathered weights are not separable from that in these fits (the 8B LoRA and full
#    programs are within 2% without them); at 8B they are 0.4 GiB a layer, 1 GiB for the head;
#  - two score-sized float32 buffers live during one layer's attention backward (TPU and CPU);
#  - the chunked cross-entropy keeps one chunk's logits (TPU), about 1.3 on CPU;
#  - "dots" policies had no compile in the fits: they take remat none's share.
COMPILER_HABITS = {
    "tpu": CompilerHabits(kept_scale={"none": 3.3, "dots": 3.3, "dots_no_batch": 3.3, "full": 6.4}, working_layers=0.2,
                          score_buffers=2.0, logits_buffers=1.0, hidden_buffers=0.1, gathered_layers=0.0,
                          gathered_head=0.0, update_buffers=0.5),
    # CPU: fitted to XLA:CPU's memory analysis, then raised ~11% (the plans come out 9-12% above the
    # compiler's figure): a real run's step adds ~17% more resident memory than the temporaries the
    # compiler assigns (runtime scratch, the allocator; tests/test_plan.py's real run measures it), and
    # this keeps the plan within 15% of both.
    "cpu": CompilerHabits(kept_scale={"none": 1.4, "dots": 1.4, "dots_no_batch": 1.4, "full": 1.6},
                          working_layers=1.0, score_buffers=2.0, logits_buffers=1.35, hidden_buffers=0.1,
                          gathered_layers=0.0, gathered_head=0.0, update_buffers=0.0),
}
COMPILER_HABITS["gpu"] = COMPILER_HABITS["tpu"]


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying NamedShardings."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree_util.tree_leaves(tree))


def _layer_and_head_elements(params) -> tuple[float, float]:
    """(elements of one decoder layer's weights, elements of the output head or tied embedding)."""
    layer, head = 0.0, 0.0
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = tuple(getattr(k, "key", getattr(k, "name", "")) for k in key_path)
        if names[:2] == LAYER_PREFIX:
            layer += math.prod(leaf.shape[1:])
        elif names[0] == "lm_head" or names[:2] == ("model", "embed_tokens"):
            head = max(head, math.prod(leaf.shape))
    return layer, head


def cross_entropy_chunk(run: Run) -> int:
    """Sequence positions per cross-entropy chunk: jaxtune.step's formula (global micro-batch rows)."""
    return max(1, min(run.seq_len, step.LOSS_CHUNK_LOGITS // (run.micro_batch * run.cfg.vocab_size)))


def activation_widths(cfg: ModelConfig, tensor: int) -> dict[str, float]:
    """Per token and layer, in compute-dtype elements (float32 values counted as two when the compute
    dtype is 16-bit): what the backward reads, by remat policy, and one layer's whole working set.

      saved_none      residual stream and both norms' inputs and outputs, q/k/v before and after
                      RoPE (which runs in float32), the attention output, the MLP's gate, up, SiLU
                      and product, the o/down outputs, the attention's row max and sum (float32)
      saved_dots      only matmul outputs (q, k, v, o, gate, up, down) and the attention output
      saved_dots_no_batch  the same (jaxtune's attention dots have a batch axis: recomputed anyway)
      saved_full      each layer's input only
    """
    itemsize = np.dtype(DTYPES[cfg.compute_dtype]).itemsize
    f32 = 4 / itemsize
    D, Dh = cfg.hidden_size, cfg.head_dim
    q, kv, F = cfg.num_heads * Dh / tensor, cfg.num_kv_heads * Dh / tensor, cfg.intermediate_size / tensor
    qkv = q + 2 * kv
    softmax_stats = 2 * cfg.num_heads / tensor * f32
    layer_all = 2 * D + 2 * D * (1 + f32) + qkv * (1 + f32) + q + 4 * F + 2 * D + softmax_stats
    matmuls = qkv + D + 2 * F + D
    return {"none": layer_all, "dots": matmuls + q, "dots_no_batch": matmuls + q, "full": D, "layer_all": layer_all}


def lora_dropout_width(cfg: ModelConfig, tensor: int) -> float:
    """Elements per token and layer of the dropped inputs LoRA keeps (one per adapted linear, dropout > 0)."""
    if cfg.lora is None or cfg.lora.dropout <= 0:
        return 0.0
    D, q, F = cfg.hidden_size, cfg.num_heads * cfg.head_dim / tensor, cfg.intermediate_size / tensor
    widths = {"q_proj": D, "k_proj": D, "v_proj": D, "o_proj": q, "gate_proj": D, "up_proj": D, "down_proj": F}
    return sum(width for name, width in widths.items() if name in cfg.lora.targets)


def state_bytes(run: Run, mesh) -> dict[str, float]:
    """Per-device bytes of the run's trained, frozen and optimizer leaves, and the elements of one layer's
    and of the head's weights (what the FSDP gathers materialise); cached, since neither the batch nor
    the remat policy changes them (a search asks for many batches)."""
    return dict(_state_bytes(run.config.to_json(sort_keys=True), run.cfg, run.vocab_ext, mesh))


@functools.lru_cache(maxsize=32)
def _state_bytes(config_json: str, cfg: ModelConfig, vocab_ext, mesh) -> tuple:
    run = Run(ml_collections.ConfigDict(json.loads(config_json)), cfg, vocab_ext)
    train_state = abstract_train_state(run, mesh)
    layer_elements, head_elements = _layer_and_head_elements(merge_trees(train_state.state["params"], train_state.frozen))
    return (("trainable", shard_bytes(train_state.state["params"])), ("frozen", shard_bytes(train_state.frozen)),
            ("opt_state", shard_bytes(train_state.state["opt_state"])), ("layer_elements", layer_elements),
            ("head_elements", head_elements))


def counted_units(run: Run, mesh) -> dict[str, float]:
    """Per-device bytes of everything the estimate counts, before the compiler's habits weigh them:
    the state's leaves (from the abstract train state), and one unit of each activation-like buffer."""
    cfg = run.cfg
    held = state_bytes(run.replace(batch_size=1, remat="none"), mesh)
    sizes = dict(mesh.shape)
    tensor = sizes["tensor"]
    batch_shards = math.prod(sizes[a] for a in dict(run.rules)["batch"])
    rows = run.micro_batch / batch_shards
    tokens = rows * run.seq_len
    itemsize = np.dtype(DTYPES[cfg.compute_dtype]).itemsize
    trainable = held["trainable"]
    widths = activation_widths(cfg, tensor)
    recomputed = cfg.remat != "none"
    gathered = itemsize / tensor if sizes.get("fsdp", 1) > 1 else 0.0
    return {
        "frozen_weights": held["frozen"],
        "trainable_weights_f32": trainable,
        "gradients_f32": trainable * (2 if run.grad_accum > 1 else 1),
        "optimizer_state": held["opt_state"],
        "batch": run.batch_size / batch_shards * run.seq_len * 4 * len(step.BATCH_KEYS),
        "gathered_layer": gathered * held["layer_elements"],
        "gathered_head": gathered * held["head_elements"],
        "saved": tokens * itemsize * cfg.num_layers * widths[cfg.remat],
        # remat none also keeps each layer's [T, T] attention mask (bool) for the backward
        "mask": 0.0 if recomputed else tokens * cfg.num_layers * run.seq_len,
        "working_layer": tokens * itemsize * widths["layer_all"] * recomputed,
        "score_buffer": rows * cfg.num_heads / tensor * run.seq_len ** 2 * 4,
        "logits_buffer": rows * cross_entropy_chunk(run) * cfg.vocab_size / tensor * 4,
        "hidden_buffer": tokens * cfg.hidden_size * 4,
        "lora_dropout_masks": tokens * itemsize * lora_dropout_width(cfg, tensor) * (1 if recomputed else cfg.num_layers),
    }


def weigh(units: dict[str, float], remat: str, habits: CompilerHabits) -> dict[str, int]:
    """The estimate's terms from counted units and a platform's habits, and `total`."""
    estimate = {
        "frozen_weights": units["frozen_weights"],
        "trainable_weights_f32": units["trainable_weights_f32"],
        "gradients_f32": units["gradients_f32"],
        "optimizer_state": units["optimizer_state"],
        "optimizer_update_f32": habits.update_buffers * units["trainable_weights_f32"],
        "gathered_weights": habits.gathered_layers * units["gathered_layer"] + habits.gathered_head * units["gathered_head"],
        "activations": habits.kept_scale[remat] * units["saved"] + units["mask"]
        + habits.working_layers * units["working_layer"],
        "attention_scores": habits.score_buffers * units["score_buffer"],
        "lora_dropout_masks": units["lora_dropout_masks"],
        "logits_cross_entropy": habits.logits_buffers * units["logits_buffer"]
        + habits.hidden_buffers * units["hidden_buffer"],
        "batch": units["batch"],
    }
    estimate = {name: int(value) for name, value in estimate.items()}
    estimate["total"] = sum(estimate.values())
    return estimate


def estimate_memory(run: Run, mesh, platform: str) -> dict[str, int]:
    """Per-device bytes of one train step of `run` on `mesh` (a Mesh or an AbstractMesh), by term, and `total`.

    `platform` ('tpu', 'gpu', 'cpu') picks the compiler habits. Not modelled: TPU tile padding of
    narrow arrays (models with few or narrow heads use more than estimated)."""
    return weigh(counted_units(run, mesh), run.cfg.remat, COMPILER_HABITS[platform])
