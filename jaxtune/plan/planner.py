"""A plan, and the search for the largest batch that fits.

`make_plan(run, target)`: the analytic estimate (any target), the compiled figures (compiled
targets: `cpu`, TPU slices), whether it fits, and the roofline speed. `search(run, target)`: the
largest batch (rows per device a power of two) and the remat policy that fit.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from jaxtune import sharding
from jaxtune.plan import compiled as compiled_lib
from jaxtune.plan.estimate import estimate_memory
from jaxtune.plan.run import Run, abstract_mesh, mesh_sizes
from jaxtune.plan.speed import step_flops, estimate_speed
from jaxtune.plan.targets import Target, target_devices

# Policies in order of increasing recomputation (and decreasing activation memory).
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")
# A double whose estimate, scaled by the compiler-to-estimate ratio just measured, is beyond this
# share of the memory is reported as not fitting without compiling it (an 8B compile takes minutes).
SEARCH_MARGIN = 1.15


def usable_memory(target: Target) -> int:
    """Bytes a run may use on one device: all of a TPU's HBM; on a GPU the fraction JAX preallocates
    (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless set); on CPU this machine's RAM per device."""
    if target.platform == "gpu":
        return int(target.chip.memory_bytes * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")))
    return target.chip.memory_bytes


def plan_mesh(run: Run, target: Target, devices: Sequence | None):
    """The run's mesh over the target's devices, or an AbstractMesh where there are none (analytic)."""
    if devices is None:
        return abstract_mesh(run, target.num_devices)
    return sharding.make_mesh(run.config.mesh.shape, devices=devices)


def make_plan(run: Run, target: Target, *, compile: bool = True, devices: Sequence | None = None) -> dict[str, Any]:
    """The plan of `run` on `target`: analytic estimate, compiled figures (compiled targets), fit, speed."""
    compile = compile and target.compiled
    if compile and devices is None:
        devices = target_devices(target)
    sizes = mesh_sizes(run, target.num_devices)
    estimate = estimate_memory(run, plan_mesh(run, target, devices if compile else None), target.platform)
    usable = usable_memory(target)
    plan: dict[str, Any] = {
        "target": target.name, "platform": target.platform, "device_kind": target.chip.kind,
        "devices": target.num_devices, "device_memory_bytes": target.chip.memory_bytes,
        "usable_memory_bytes": usable, "mesh": sizes,
        "model": str(run.config.model.path), "mode": "full" if run.full_finetune else f"lora r{run.cfg.lora.rank}",
        "batch_size": run.batch_size, "grad_accum": run.grad_accum, "seq_len": run.seq_len,
        "remat": run.cfg.remat, "param_dtype": run.cfg.param_dtype, "compute_dtype": run.cfg.compute_dtype,
        "estimate": estimate,
    }
    total = estimate["total"]
    if compile:
        start = time.perf_counter()
        try:
            compiled = compiled_lib.compile_step(run, devices)
        except Exception as e:  # the TPU compiler refuses a program that does not fit in HBM
            if not compiled_lib.is_out_of_memory(e):
                raise
            plan["compile_error"] = str(e).strip().splitlines()[0][:500]
            if compiled_lib.refused_temporaries_bytes(e):
                plan["refused_temp_bytes"] = compiled_lib.refused_temporaries_bytes(e)
            total = None
        else:
            plan["compiled"] = compiled_lib.compiled_figures(compiled)
            total = plan["compiled"]["total"]
            counted = compiled_lib.compiler_flops(compiled)
            if counted:
                plan["compiler_flops_layer_once"] = counted
                plan["analytic_flops_layer_once"] = step_flops(run, num_layers=1)["executed"] / target.num_devices
        plan["compile_seconds"] = round(time.perf_counter() - start, 1)
    plan["fits"] = total is not None and total <= usable
    speed = estimate_speed(run, sizes, target.chip, estimate)
    plan["speed"] = speed
    plan["step_seconds_estimate"] = speed["step_seconds"]
    plan["tokens_per_second_estimate"] = speed["tokens_per_second"]
    plan["mfu_estimate"] = speed["mfu"]
    return plan


def _largest_rows(fits, limit: int = 1 << 16) -> int:
    """Largest power of two r >= 1 with fits(r) (a larger batch never fits better); 0 if none."""
    if not fits(1):
        return 0
    rows = 1
    while rows < limit and fits(rows * 2):
        rows *= 2
    return rows


def _tried_entry(plan: dict[str, Any]) -> dict[str, Any]:
    if "compile_error" in plan:
        return {"fits": False, "by": "the compiler: out of memory", "total": None}
    if "compiled" in plan:
        return {"fits": plan["fits"], "by": "compiled", "total": plan["compiled"]["total"]}
    return {"fits": plan["fits"], "by": "estimate", "total": plan["estimate"]["total"]}


def search(run: Run, target: Target, *, compile: bool = True, devices: Sequence | None = None) -> dict[str, Any]:
    """The largest batch (rows per device a power of two, times the batch shards and grad_accum) and the
    remat policy that fit `target`.

    The analytic estimate picks the policy: the one fitting the most rows, the least recomputation on
    a tie. On compiled targets the compiler then decides the batch for that policy, starting from the
    estimate's choice: a batch that does not fit is halved until one does; a batch that fits is doubled
    while the double's estimate, scaled by the compiler-to-estimate ratio just measured, is within
    SEARCH_MARGIN of the memory (a double beyond that is reported as not fitting by that scaled
    estimate, without compiling it). Returns the plan of the chosen batch with `search`: rows by
    estimate per policy, the batches tried, and for each whether it fits and by which figure.
    """
    compile = compile and target.compiled
    if compile and devices is None:
        devices = target_devices(target)
    sizes = mesh_sizes(run, target.num_devices)
    shards = 1
    for axis in dict(run.rules)["batch"]:
        shards *= sizes[axis]
    usable = usable_memory(target)
    mesh = plan_mesh(run, target, devices if compile else None)

    def with_rows(candidate: Run, rows: int) -> Run:
        return candidate.replace(batch_size=rows * shards * run.grad_accum)

    def estimate_of(candidate: Run, rows: int) -> int:
        return estimate_memory(with_rows(candidate, rows), mesh, target.platform)["total"]

    by_policy = {remat: _largest_rows(lambda r, remat=remat: estimate_of(run.replace(remat=remat), r) <= usable)
                 for remat in REMAT_ORDER}
    best_rows = max(by_policy.values())
    chosen = run.replace(remat=next((p for p in REMAT_ORDER if by_policy[p] == best_rows), "full") if best_rows
                         else "full")
    tried: dict[int, dict[str, Any]] = {}

    def plan_of(rows: int) -> dict[str, Any]:
        if rows not in tried:
            tried[rows] = make_plan(with_rows(chosen, rows), target, compile=compile, devices=devices)
        return tried[rows]

    def scaled_estimate_of_double(rows: int) -> float:
        measured = plan_of(rows)
        ratio = measured["compiled"]["total"] / measured["estimate"]["total"] if "compiled" in measured else 1.0
        return ratio * estimate_of(chosen, 2 * rows)

    rows = max(best_rows, 1)
    if plan_of(rows)["fits"]:
        while scaled_estimate_of_double(rows) <= SEARCH_MARGIN * usable and plan_of(2 * rows)["fits"]:
            rows *= 2
    else:
        while rows > 1 and not plan_of(rows)["fits"]:
            rows //= 2
    found = rows if plan_of(rows)["fits"] else 0
    result = dict(plan_of(rows))
    result["search"] = {
        "rows_per_device_by_estimate": by_policy,
        "chosen_remat": chosen.cfg.remat,
        "rows_per_device": found,
        "tried": {str(r * shards * run.grad_accum): _tried_entry(p) for r, p in sorted(tried.items())},
    }
    if found and 2 * found not in tried:  # the double was not compiled: its scaled estimate is beyond memory
        result["search"]["tried"][str(2 * found * shards * run.grad_accum)] = {
            "fits": False, "by": "estimate scaled by the compiler's ratio" if compile else "estimate",
            "total": int(scaled_estimate_of_double(found))}
    return result
