"""Speed: FLOPs of one step, bytes it moves, and a roofline step time (an estimate, not a measurement).

The compiler's own cost analysis counts a scanned layer body once (and its `optimal_seconds` came out
negative for some of these programs), so the step time is a roofline: the slowest of compute at the
chip's peak, memory traffic at its bandwidth and FSDP / data-parallel collectives at its interconnect
bandwidth, assumed overlapped. A lower bound on the real step time, so tokens/s and MFU are upper
bounds. `step_flops(run, num_layers=1)` is what the compiler's count is checked against.
"""

from __future__ import annotations

import math

import numpy as np

from jaxtune.models.llama import DTYPES, ModelConfig
from jaxtune.plan.run import Run
from jaxtune.plan.targets import Chip


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear of one decoder layer."""
    D, F, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}


def step_flops(run: Run, num_layers: int | None = None) -> dict[str, float]:
    """FLOPs of one optimizer step (all devices): `required` (forward + backward, what MFU counts) and
    `executed` (plus what the remat policy recomputes). Matmuls as 2 FLOPs per multiply-add; attention
    over the full T x T square (the XLA attention computes masked entries too; its backward recomputes
    the scores from the saved row statistics: one more QK^T).

    Frozen weights need a forward matmul and the gradient of their input (2 x 2 FLOPs per weight and
    token); trained weights also their own gradient (3 x 2). LoRA adds its two thin matmuls per target,
    trained. `num_layers` overrides the layer count (1: what the compiler counts for a scanned body).
    """
    cfg = run.cfg
    L = cfg.num_layers if num_layers is None else num_layers
    tokens = run.batch_size * run.seq_len
    linears = linear_shapes(cfg)
    layer_weights = sum(i * o for i, o in linears.values())
    head_weights = cfg.hidden_size * cfg.vocab_size
    passes = 3 if run.full_finetune else 2  # forward, input gradient, (weight gradient)
    head_passes = 3 if (run.full_finetune or run.trains_embeddings()) else 2
    adapter = head_adapter = 0.0
    if cfg.lora is not None:
        r = cfg.lora.rank
        adapter = sum(r * (i + o) for name, (i, o) in linears.items() if name in cfg.lora.targets)
        head_adapter = r * (cfg.hidden_size + cfg.vocab_size) if "lm_head" in cfg.lora.targets else 0
    attention_dot = 2 * run.seq_len * cfg.num_heads * cfg.head_dim  # one T x T dot, per token
    attention_forward = 2 * attention_dot  # QK^T and PV
    layer_forward = 2 * (layer_weights + adapter) + attention_forward
    layer_required = 2 * passes * layer_weights + 2 * 3 * adapter + 3 * attention_forward
    head_required = 2 * head_passes * head_weights + 2 * 3 * head_adapter
    recompute = {"none": 0.0, "dots": 0.0, "dots_no_batch": attention_forward, "full": layer_forward}[cfg.remat]
    required = tokens * (L * layer_required + head_required)
    executed = required + tokens * (L * (recompute + attention_dot) + 2 * head_weights)  # + scores, chunk logits
    return {"required": required, "executed": executed}


def step_bytes_moved(run: Run, mesh_sizes: dict[str, int], estimate: dict[str, int]) -> dict[str, float]:
    """Per-device bytes through memory and through the interconnect in one step (a rough lower bound).

    Memory: every layer's gathered weights are read once per pass (forward, backward, recompute); the
    optimizer reads and writes masters, moments and gradients; activations are written and read once.
    Interconnect: FSDP all-gathers each pass's weights and reduce-scatters the gradients; data
    parallelism all-reduces the gradients.
    """
    cfg = run.cfg
    weight_itemsize = np.dtype(DTYPES[cfg.compute_dtype]).itemsize
    num_params = cfg.num_layers * sum(i * o for i, o in linear_shapes(cfg).values()) + \
        cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    gathered_weights = num_params * weight_itemsize / mesh_sizes["tensor"]
    passes = 2 + (cfg.remat == "full")
    trainable = estimate["trainable_weights_f32"]
    optimizer_traffic = 7 * trainable  # read master, grad, 2 moments; write master, 2 moments
    activations = 2 * (estimate["activations"] + estimate["attention_scores"] + estimate["logits_cross_entropy"])
    memory = gathered_weights * passes * run.grad_accum + optimizer_traffic + activations * run.grad_accum
    f, d = mesh_sizes["fsdp"], mesh_sizes["data"]
    interconnect = 0.0
    if f > 1:
        interconnect += gathered_weights * (f - 1) / f * passes * run.grad_accum  # all-gathers
        interconnect += trainable * (f - 1)  # reduce-scatter of float32 gradients
    if d > 1:
        interconnect += 2 * trainable * (d - 1) / d * max(f, 1)
    return {"memory": memory, "interconnect": interconnect}


def estimate_speed(run: Run, mesh_sizes: dict[str, int], chip: Chip, estimate: dict[str, int]) -> dict[str, float]:
    """Roofline step time, tokens/s and MFU (an upper bound) of `run` on devices of `chip`."""
    devices = math.prod(mesh_sizes.values())
    flops = step_flops(run)
    moved = step_bytes_moved(run, mesh_sizes, estimate)
    seconds = {"compute": flops["executed"] / devices / chip.peak_flops,
               "memory": moved["memory"] / chip.memory_bandwidth,
               "interconnect": moved["interconnect"] / chip.interconnect_bandwidth}
    step_seconds = max(seconds.values())
    tokens = run.batch_size * run.seq_len
    return {"step_seconds": step_seconds, "bound_by": max(seconds, key=seconds.get),
            "compute_seconds": seconds["compute"], "memory_seconds": seconds["memory"],
            "interconnect_seconds": seconds["interconnect"], "tokens_per_second": tokens / step_seconds,
            "flops_required": flops["required"], "flops_executed": flops["executed"],
            "mfu": flops["required"] / (step_seconds * devices * chip.peak_flops)}
