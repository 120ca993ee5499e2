"""The analytic memory estimate: per-device bytes of one train step, by term, for any target.

Weights, gradients and optimizer state are counted from the run's abstract train state (the shapes
and shardings `jaxtune.state.build` gives, see plan/run.py). Activations, attention, the chunked
cross-entropy and the FSDP weight copies are formulas in the model's sizes (`counted_units`); how many
of each buffer the compiler keeps alive at once is a per-platform constant (`HABITS`, values in
compiler_habits.json), fitted by `python benchmarks/fit_plan.py --write` to the compilers' own memory
analyses of today's `jaxtune.step.train_step` (tests/test_plan.py holds the estimate to within 15% of
them). This module is the one owner of the activation estimate.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib

import jax
import ml_collections
import numpy as np

from jaxtune import step
from jaxtune.models.llama import DTYPES, LINEAR_TARGETS, ModelConfig
from jaxtune.params import merge_trees
from jaxtune.plan.run import Run, abstract_train_state

LAYER_PREFIX = ("model", "layers")


@dataclasses.dataclass(frozen=True)
class Habit:
    """One fitted constant: how many `unit`s (a key of `counted_units`) the compiled program holds at its
    peak, added to the estimate's `term`; `bounds` keep the count physical in the fit."""

    unit: str
    term: str
    bounds: tuple[float, float]
    meaning: str


# The per-platform constants, in the order benchmarks/fit_plan.py fits them.
HABITS = {
    "update_buffers": Habit("trainable_f32", "optimizer_update_f32", (0.0, 3.0),
                            "trainable-sized float32 temporaries of the optimizer update besides the gradient"),
    "gathered_layers": Habit("gathered_layer", "gathered_weights", (0.0, 4.0),
                             "FSDP: all-gathered copies of one layer's weights (compute dtype) live at once"),
    "gathered_head": Habit("gathered_head", "gathered_weights", (0.0, 4.0),
                           "FSDP: all-gathered copies of the output head / tied embedding"),
    "kept_none": Habit("saved_none", "activations", (0.5, 8.0),
                       "remat none: the per-layer values the backward reads (`activation_widths`), as kept"),
    "kept_dots": Habit("saved_dots", "activations", (0.5, 8.0), "remat dots: the same for the matmul outputs kept"),
    "kept_dots_no_batch": Habit("saved_dots_no_batch", "activations", (0.5, 8.0),
                                "remat dots_no_batch: the same for the unbatched matmul outputs kept"),
    "kept_full": Habit("saved_full", "activations", (0.5, 12.0), "remat full: the same for each layer's input"),
    "masks_per_layer": Habit("mask_per_layer", "activations", (0.0, 2.0),
                             "remat none: [T, T] boolean attention masks kept per layer and row"),
    "working_layers": Habit("working_layer", "activations", (0.0, 4.0),
                            "one layer's whole activation set live while its backward runs (recomputed under remat)"),
    "score_buffers": Habit("score_buffer", "attention_scores", (0.0, 6.0),
                           "float32 [rows, H, T, T] score-sized buffers of one layer's attention backward"),
    "logits_buffers": Habit("logits_buffer", "logits_cross_entropy", (0.0, 6.0),
                            "float32 [rows, chunk, V] buffers of the chunked head + cross-entropy"),
    "hidden_buffers": Habit("hidden_buffer", "logits_cross_entropy", (0.0, 8.0),
                            "float32 [rows, T, D] buffers around the loss (final hidden states, their gradient)"),
    "dropout_copies": Habit("dropout_input", "lora_dropout_masks", (0.0, 4.0),
                            "LoRA dropout: the dropped inputs (one per adapted linear) as kept"),
}
GPU_HABITS_FROM = "tpu"  # no GPU compiler runs here: GPU plans assume the TPU compiler's habits
HABITS_FILE = pathlib.Path(__file__).with_name("compiler_habits.json")


def load_compiler_habits(path: pathlib.Path = HABITS_FILE) -> dict[str, dict[str, float]]:
    """{platform: {habit: value}} as benchmarks/fit_plan.py wrote them (gpu: the TPU's)."""
    fitted = json.loads(path.read_text())["habits"]
    habits = {platform: {name: float(values[name]) for name in HABITS} for platform, values in fitted.items()}
    habits.setdefault("gpu", habits[GPU_HABITS_FROM])
    return habits


# Fitted by `python benchmarks/fit_plan.py --write` (the largest relative error of the per-device total
# minimised against the compilers' memory analyses of today's train step, within each habit's bounds); the
# file records the commit, the cases fitted, the grid's cases not compiled, and the fit's errors. What the
# fit at 7cfcacf says (24 of the grid's 38 cases compiled on a quiet machine, the rest not yet: see the JSON):
#  - CPU (13 cases, worst 7.1%): XLA:CPU keeps 0.84 of the counted remat-none values (some are fused
#    away) and about 2.2 layers' whole set while one layer's backward runs; 2.5 score-sized float32
#    buffers; the optimizer's update and the chunked cross-entropy's buffers vanish into the rest.
#  - TPU (11 cases, worst 14.2%: the remat-none step grows faster than linearly in the rows, 357 MiB at 2
#    rows per chip, 900 at 4, so a linear count misses both by ~14%, and the minimax fit spreads that
#    error over the others): 2.3x the counted remat-none values and 2.1 layers' whole set during a
#    layer's backward; 1.8 copies of each layer's input under remat full; 3.6 score-sized buffers; no
#    separate gathered copies under FSDP and no optimizer temporaries (both absorbed by the rest).
#  - dots / dots_no_batch and LoRA dropout had no TPU compile here: they count their buffers once (1).
COMPILER_HABITS = load_compiler_habits()


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


def activation_widths(cfg: ModelConfig, tensor: int, seq_len: int) -> dict[str, float]:
    """Per token and layer, in compute-dtype elements (float32 values counted as 4 / itemsize of them): what
    the backward of today's layer (models/llama.py, models/kernels.py, models/attention.py) reads, by remat
    policy.

      none            each RMSNorm's input and its output (the norm is rematerialised: llama.rms_norm; its
                      output saved once for all projections reading it, LoRA or full fine-tuning:
                      kernels.shared_input_lora_dense), q after RoPE, k, v, the attention output and its
                      [T, H * Dh] copy that o_proj reads, the softmax's row max and sum (float32; the
                      probabilities are recomputed), the MLP's gate and up (their product is recomputed
                      for down_proj's backward: kernels.gated_lora_dense), the adapters' [T, r] products
      dots            the matmul outputs: q, k, v, o, gate, up, down, and attention's two batched dots
                      (its float32 scores, the probabilities x v)
      dots_no_batch   the unbatched matmul outputs (attention's dots have a batch axis: recomputed)
      full            each layer's input only
    """
    itemsize = np.dtype(DTYPES[cfg.compute_dtype]).itemsize
    f32 = 4 / itemsize
    D = cfg.hidden_size
    q, kv, F = cfg.num_heads * cfg.head_dim / tensor, cfg.num_kv_heads * cfg.head_dim / tensor, cfg.intermediate_size / tensor
    heads = cfg.num_heads / tensor
    adapters = sum(cfg.lora.rank for name in cfg.lora.targets if name in LINEAR_TARGETS) if cfg.lora else 0
    norms = 2 * 2 * D
    matmuls = q + 2 * kv + D + 2 * F + D
    return {"none": norms + 3 * q + 2 * kv + 2 * heads * f32 + 2 * F + adapters,
            "dots": matmuls + heads * seq_len * f32 + q, "dots_no_batch": matmuls, "full": D}


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
    """Per-device bytes of everything the estimate counts, before the compiler's habits weigh them: the
    state's leaves (from the abstract train state, counted once each), and one unit of each buffer kind a
    habit counts (`HABITS`; a unit the run does not have, e.g. another remat policy's, is 0)."""
    cfg = run.cfg
    held = state_bytes(run.replace(batch_size=1, remat="none"), mesh)
    sizes = dict(mesh.shape)
    tensor = sizes["tensor"]
    batch_shards = math.prod(sizes[a] for a in dict(run.rules)["batch"])
    rows = run.micro_batch / batch_shards
    tokens = rows * run.seq_len
    itemsize = np.dtype(DTYPES[cfg.compute_dtype]).itemsize
    trainable = held["trainable"]
    widths = activation_widths(cfg, tensor, run.seq_len)
    recomputed = cfg.remat != "none"
    gathered = itemsize / tensor if sizes.get("fsdp", 1) > 1 else 0.0
    saved = {f"saved_{policy}": tokens * itemsize * cfg.num_layers * width * (policy == cfg.remat)
             for policy, width in widths.items()}
    return {
        "frozen_weights": held["frozen"],
        "trainable_weights_f32": trainable,
        "gradients_f32": trainable * (2 if run.grad_accum > 1 else 1),
        "optimizer_state": held["opt_state"],
        "batch": run.batch_size / batch_shards * run.seq_len * 4 * len(step.BATCH_KEYS),
        "trainable_f32": trainable,
        "gathered_layer": gathered * held["layer_elements"],
        "gathered_head": gathered * held["head_elements"],
        **saved,
        "mask_per_layer": 0.0 if recomputed else tokens * cfg.num_layers * run.seq_len,
        "working_layer": tokens * itemsize * widths["none"],
        "score_buffer": rows * cfg.num_heads / tensor * run.seq_len ** 2 * 4,
        "logits_buffer": rows * cross_entropy_chunk(run) * cfg.vocab_size / tensor * 4,
        "hidden_buffer": tokens * cfg.hidden_size * 4,
        "dropout_input": tokens * itemsize * lora_dropout_width(cfg, tensor) * (1 if recomputed else cfg.num_layers),
    }


# The state's terms, counted once each from the abstract train state (not fitted); the step's arguments.
ARGUMENT_TERMS = ("frozen_weights", "trainable_weights_f32", "optimizer_state", "batch")
COUNTED_TERMS = ("frozen_weights", "trainable_weights_f32", "gradients_f32", "optimizer_state")
TERMS = COUNTED_TERMS + ("optimizer_update_f32", "gathered_weights", "activations", "attention_scores",
                         "lora_dropout_masks", "logits_cross_entropy", "batch")


def weigh(units: dict[str, float], habits: dict[str, float]) -> dict[str, int]:
    """The estimate's terms from counted units and a platform's habits, and `total`."""
    estimate = {term: 0.0 for term in TERMS}
    for term in COUNTED_TERMS + ("batch",):
        estimate[term] = units[term]
    for name, habit in HABITS.items():
        estimate[habit.term] += habits[name] * units[habit.unit]
    estimate = {name: int(value) for name, value in estimate.items()}
    estimate["total"] = sum(estimate.values())
    return estimate


# What a process holds beyond the compiler's buffers, as a share of the step's own memory (the estimate less
# the arguments): XLA:CPU's runtime keeps scratch that its memory analysis does not assign. Measured by
# tests/test_plan.py's real CPU run (LoRA, 8 x 1024, remat none; peak VmHWM reset after the compile): the
# steps added 1048 to 1107 MiB of resident memory over 5 runs against 908 MiB of compiled temporaries and
# outputs, 1.15x to 1.22x; glibc's allocator settings (MALLOC_ARENA_MAX=1 or 2, MALLOC_MMAP_THRESHOLD_=128k)
# moved it by 5% at most (1048-1051 against 1101-1107 by default), so the rest is the runtime's.
RUNTIME_SCRATCH = {"cpu": 0.18}


def estimate_memory(run: Run, mesh, platform: str) -> dict[str, int]:
    """Per-device bytes of one train step of `run` on `mesh` (a Mesh or an AbstractMesh), by term, and `total`.

    `platform` ('tpu', 'gpu', 'cpu') picks the compiler habits; on CPU the estimate adds `runtime_scratch`
    (what the process holds beyond the compiled program's buffers; the compiler's figure is `total` less
    it). Not modelled: TPU tile padding of narrow arrays (models with few or narrow heads use more)."""
    estimate = weigh(counted_units(run, mesh), COMPILER_HABITS[platform])
    compiled = estimate.pop("total")
    held = sum(estimate[term] for term in ARGUMENT_TERMS)
    estimate["runtime_scratch"] = int(RUNTIME_SCRATCH.get(platform, 0.0) * (compiled - held))
    estimate["total"] = compiled + estimate["runtime_scratch"]
    return estimate


def compiled_total(estimate: dict[str, int]) -> int:
    """The estimate of the figure the compiler reports: its total without the runtime's scratch."""
    return estimate["total"] - estimate.get("runtime_scratch", 0)
