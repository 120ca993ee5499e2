"""The plan as text and JSON, and the start-up lines of a training run."""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from jaxtune import sharding, vocab
from jaxtune.models.llama import ModelConfig
from jaxtune.plan.estimate import COMPILER_HABITS, estimate_memory
from jaxtune.plan.measured import device_memory_limit
from jaxtune.plan.run import Run
from jaxtune.plan.targets import GiB

ESTIMATE_LABELS = {
    "frozen_weights": "frozen weights",
    "trainable_weights_f32": "trained weights (float32 masters)",
    "gradients_f32": "gradients (float32)",
    "optimizer_state": "optimizer state (AdamW: 2 x float32)",
    "optimizer_update_f32": "optimizer update (float32)",
    "gathered_weights": "FSDP all-gathered weights",
    "activations": "activations kept for backward",
    "attention_scores": "attention scores (one layer)",
    "lora_dropout_masks": "LoRA dropout copies",
    "logits_cross_entropy": "logits + cross-entropy",
    "batch": "batch",
    "runtime_scratch": "runtime scratch (XLA:CPU, measured)",
}
COMPILED_LABELS = {"argument": "arguments", "output": "outputs", "alias": "aliased (donated state)",
                   "temp": "temporaries"}


def gib(n: float | None) -> str:
    """Bytes as GiB (MiB under 1 GiB), two decimals."""
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:.2f} MiB"


def _breakdown(plan: dict[str, Any]) -> list[str]:
    compiled = plan.get("compiled")
    source = {"tpu": "TPU compiler, deviceless", "cpu": "XLA CPU compiler"}.get(plan["platform"])
    right = [(COMPILED_LABELS[k], compiled[k] * (-1 if k == "alias" else 1)) for k in COMPILED_LABELS] if compiled else []
    left = [(ESTIMATE_LABELS[k], v) for k, v in plan["estimate"].items() if k != "total" and v]
    lines = [f"  {'per device':40s} {'estimate':>11s}   " + (f"compiled ({source})" if compiled else "")]
    for i in range(max(len(left), len(right))):
        l_name, l_value = left[i] if i < len(left) else ("", None)
        r_text = f"{right[i][0]:26s} {gib(right[i][1]):>11s}" if i < len(right) else ""
        lines.append(f"  {l_name:40s} {gib(l_value) if l_name else '':>11s}   {r_text}".rstrip())
    total_right = f"{'total':26s} {gib(compiled['total']):>11s}" if compiled else ""
    lines.append(f"  {'total':40s} {gib(plan['estimate']['total']):>11s}   {total_right}".rstrip())
    return lines


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as `python -m jaxtune.plan` prints it."""
    mesh = " x ".join(f"{k}={v}" for k, v in plan["mesh"].items())
    lines = [
        f"plan: {plan['model']}, {plan['mode']}, batch {plan['batch_size']} x {plan['seq_len']} tokens"
        + (f" (grad_accum {plan['grad_accum']})" if plan["grad_accum"] > 1 else "")
        + f", remat {plan['remat']}, weights {plan['param_dtype']}, compute {plan['compute_dtype']}",
        f"target: {plan['target']}: {plan['devices']} x {plan['device_kind']}, {gib(plan['device_memory_bytes'])} each"
        + (f" ({gib(plan['usable_memory_bytes'])} usable)" if plan["usable_memory_bytes"] != plan["device_memory_bytes"]
           else "") + f"; mesh {mesh}",
        *_breakdown(plan),
    ]
    compiled = plan.get("compiled")
    if plan.get("compile_error"):
        lines.append(f"  the compiler refused the program: {plan['compile_error']}")
    used = compiled["total"] if compiled else (None if plan.get("compile_error") else plan["estimate"]["total"])
    basis = "compiled" if compiled else "estimate" if used is not None else "compiler"
    share = f" ({used / plan['usable_memory_bytes']:.0%} of {gib(plan['usable_memory_bytes'])})" if used is not None else ""
    lines.append(f"{'fits' if plan['fits'] else 'does NOT fit'}: {basis} "
                 f"{gib(used) if used is not None else 'out of memory'}{share}")
    if plan["platform"] == "cpu":
        lines.append("  CPU speed: the peak is this CPU's measured float32 matmul rate; memory bandwidth assumed 20 GB/s.")
        if plan["devices"] > 1:
            lines.append("  Several CPU devices in one process (simulated): XLA:CPU's partitioned program holds several "
                         "times the activations the estimate splits over them (about 4x at 8 devices); trust the "
                         "compiled figure.")
    if plan["platform"] == "gpu":
        lines.append("  GPU targets are analytic only (no GPU compiler here; the TPU compiler's habits are assumed); "
                     "JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of GPU memory: set it to 0.95 "
                     "to use more.")
    speed = plan["speed"]
    lines.append(f"speed (roofline estimate, not a measurement): step {speed['step_seconds']:.3g} s "
                 f"({speed['bound_by']}-bound), {speed['tokens_per_second']:,.0f} tokens/s, "
                 f"MFU {speed['mfu']:.0%} at most")
    if plan.get("compiler_flops_layer_once"):
        ratio = plan["compiler_flops_layer_once"] / plan["analytic_flops_layer_once"]
        lines.append(f"  check: the compiler counts {plan['compiler_flops_layer_once']:.3g} FLOPs per device with the "
                     f"layer loop counted once; the analytic count for that is {plan['analytic_flops_layer_once']:.3g} "
                     f"(ratio {ratio:.2f})")
    if "search" in plan:
        found = plan["search"]
        lines.append(f"search: remat {found['chosen_remat']}, {found['rows_per_device']} rows per device; tried "
                     + ", ".join(f"batch {b} {'fits' if t['fits'] else 'does not fit'} ({t['by']}"
                                 + (f" {gib(t['total'])})" if t["total"] is not None else ")")
                                 for b, t in found["tried"].items()))
    return "\n".join(lines)


def json_ready(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan with plain JSON values (numpy scalars converted)."""
    return json.loads(json.dumps(plan, default=lambda x: x.item() if hasattr(x, "item") else str(x)))


def startup_report(config: ml_collections.ConfigDict, cfg: ModelConfig, vocab_ext: vocab.VocabExtension,
                   mesh) -> str:
    """What a run about to start on `mesh` expects each device to hold (the analytic plan), and whether
    that fits the device's memory."""
    run = Run.from_config(config, cfg, vocab_ext)
    device = mesh.devices.flat[0]
    platform = device.platform if device.platform in COMPILER_HABITS else "gpu"
    estimate = estimate_memory(run, mesh, platform)
    lines = [f"memory per device, planned (analytic estimate, jaxtune.plan; mesh {sharding.describe_mesh(mesh)}):"]
    lines += [f"  {ESTIMATE_LABELS[k]:40s} {gib(v):>11s}" for k, v in estimate.items() if k != "total" and v]
    lines.append(f"  {'total':40s} {gib(estimate['total']):>11s}")
    limit = device_memory_limit(device)
    if limit:
        verdict = ("fits" if estimate["total"] <= limit
                   else "may NOT fit (find a batch and remat policy that do: python -m jaxtune.plan --search)")
        lines.append(f"  {verdict}: {estimate['total'] / limit:.0%} of {gib(limit)} per device")
    return "\n".join(lines)
