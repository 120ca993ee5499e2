"""Multi-process (multi-host) start-up: when to call jax.distributed.initialize, and the batch layout check.

This module owns two things and nothing else:

1. `maybe_initialize()`: joins the jax.distributed job when a launcher asked for one, before any
   JAX backend exists. `launch_plan(environ)` decides from the environment alone:

   - JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (our launch/ scripts, Ray,
     hand-written launchers): initialize with exactly these values (JAX_NUM_PROCESSES=1: nothing).
   - a SLURM job step with more than one task (`srun`, SLURM_STEP_NUM_TASKS > 1): initialize()
     with no arguments; JAX reads the coordinator, process count and id from SLURM itself.
   - JAXTUNE_DISTRIBUTED=auto (launch/tpu_pod.sh sets it; also Open MPI, Kubernetes jobs):
     initialize() with no arguments, JAX's own cluster detection (Cloud TPU pods, OMPI, K8s).
   - JAXTUNE_DISTRIBUTED=off, or none of the above: a single process, nothing to do.

   Before initializing it selects gloo for CPU collectives (`jax_cpu_collectives_implementation`),
   which cross-process computations on CPU devices need; it does not affect GPU or TPU devices.

2. `check_batch_layout(mesh, rules, batch_size)`: every process reads its own contiguous slice of
   each global batch (data.Batcher with process_index / process_count) and
   `sharding.device_batch` stitches the slices together. That is only right when the devices of
   process p hold exactly rows [p * B/P, (p+1) * B/P) of the batch. A mesh whose batch axes
   (data x fsdp by default) are fewer than the processes, or whose tensor axis spans hosts,
   breaks this; the check raises `sharding.ShardingError` naming a mesh that works, before any
   compute.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import jax
from jax.sharding import Mesh

from jaxtune import sharding
from jaxtune.errors import JaxtuneError

log = logging.getLogger(__name__)

ENV_SWITCH = "JAXTUNE_DISTRIBUTED"  # "auto" | "off" (unset: decide from the launcher's variables)
EXPLICIT_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


class LaunchError(JaxtuneError, RuntimeError):
    """The launcher's variables are inconsistent (e.g. only some of JAX_* set, a non-integer id)."""


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How to call jax.distributed.initialize: `kwargs` (empty = JAX detects everything) and why."""

    kwargs: dict
    reason: str


# --------------------------------------------------------------------------------------------
# Initialization


def _int_var(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise LaunchError(f"{name}={environ[name]!r} is not an integer") from None


def launch_plan(environ: Mapping[str, str]) -> LaunchPlan | None:
    """The jax.distributed.initialize call the environment asks for, or None for a single process."""
    switch = environ.get(ENV_SWITCH, "").strip().lower()
    if switch in ("off", "0", "false", "no"):
        return None
    present = [name for name in EXPLICIT_VARS if environ.get(name)]
    if present and len(present) < len(EXPLICIT_VARS):
        missing = [name for name in EXPLICIT_VARS if name not in present]
        raise LaunchError(f"{', '.join(present)} set but {', '.join(missing)} missing: a multi-process launch "
                          f"sets all of {', '.join(EXPLICIT_VARS)} (or none of them)")
    if present:
        num_processes, process_id = _int_var(environ, "JAX_NUM_PROCESSES"), _int_var(environ, "JAX_PROCESS_ID")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise LaunchError(f"JAX_PROCESS_ID={process_id} is out of range for JAX_NUM_PROCESSES={num_processes}")
        if num_processes == 1:
            return None
        return LaunchPlan({"coordinator_address": environ["JAX_COORDINATOR_ADDRESS"],
                           "num_processes": num_processes, "process_id": process_id},
                          f"JAX_* variables: process {process_id} of {num_processes}, "
                          f"coordinator {environ['JAX_COORDINATOR_ADDRESS']}")
    if switch == "auto":
        return LaunchPlan({}, f"{ENV_SWITCH}=auto: JAX's cluster detection (TPU pod, SLURM, Open MPI, Kubernetes)")
    if switch:
        raise LaunchError(f"{ENV_SWITCH}={environ[ENV_SWITCH]!r}: use auto, off, or leave it unset")
    if environ.get("SLURM_JOB_ID") and environ.get("SLURM_STEP_NUM_TASKS", "1").isdigit() \
            and int(environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return LaunchPlan({}, f"SLURM job {environ['SLURM_JOB_ID']} step with "
                              f"{environ['SLURM_STEP_NUM_TASKS']} tasks")
    return None


def maybe_initialize(environ: Mapping[str, str] | None = None) -> bool:
    """Join the multi-process job the launcher set up (see the module docstring); True if joined.

    Call it first thing in a process, before anything asks JAX for devices. Calling it again, or
    after the job is initialized elsewhere, does nothing.
    """
    plan = launch_plan(os.environ if environ is None else environ)
    if plan is None or jax.distributed.is_initialized():
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("jax.distributed.initialize (%s)", plan.reason)
    jax.distributed.initialize(**plan.kwargs)
    log.info("process %d of %d: %d local devices of %d", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


# --------------------------------------------------------------------------------------------
# Batch rows per process


def rows_by_process(mesh: Mesh, rules, batch_size: int) -> dict[int, list[int]]:
    """process index -> the sorted global batch rows its devices hold under `batch_sharding`."""
    index_map = sharding.batch_sharding(mesh, rules).devices_indices_map((batch_size,))
    rows: dict[int, set[int]] = {}
    for device, index in index_map.items():
        rows.setdefault(device.process_index, set()).update(range(batch_size)[index[0]])
    return {process: sorted(held) for process, held in rows.items()}


def _working_shapes(num_devices: int, num_processes: int) -> str:
    local = num_devices // num_processes
    return (f"--config.mesh.shape={num_processes},-1,1 (data over hosts, FSDP within) or 1,-1,1 (FSDP), "
            f"or 1,{num_processes},{local} (tensor within each host)")


def layout_problem(held: Mapping[int, list[int]], batch_size: int) -> str | None:
    """Why `held` (process -> batch rows its devices hold) breaks the per-process Batcher slices, or None."""
    processes = sorted(held)
    count = len(processes)
    if batch_size % count:
        return f"the batch of {batch_size} rows does not split evenly over {count} processes"
    per_process = batch_size // count
    for position, process in enumerate(processes):
        expected = list(range(position * per_process, (position + 1) * per_process))
        if held[process] != expected:
            return (f"the devices of process {process} hold rows {_span(held[process])} of each batch of "
                    f"{batch_size}, but each process reads its own {per_process} rows ({_span(expected)} for it)")
    return None


def check_batch_layout(mesh: Mesh, rules, batch_size: int) -> None:
    """ShardingError unless process p's devices hold exactly rows [p*B/P, (p+1)*B/P) of each batch."""
    held = rows_by_process(mesh, rules, batch_size)
    if len(held) <= 1:
        return
    problem = layout_problem(held, batch_size)
    if problem:
        batch_axes = dict(sharding.make_rules(rules))["batch"]
        split = " x ".join(f"{a}={mesh.shape[a]}" for a in batch_axes) or "no mesh axis"
        raise sharding.ShardingError(
            f"mesh {sharding.describe_mesh(mesh)} over {len(held)} processes, batch split over {split}: {problem}. "
            f"Split the batch over a multiple of {len(held)} devices and keep the tensor axis within a host: "
            f"{_working_shapes(mesh.size, len(held))}")


def _span(rows: list[int]) -> str:
    if rows and rows == list(range(rows[0], rows[-1] + 1)):
        return f"{rows[0]}..{rows[-1]}"
    return ",".join(map(str, rows)) or "none"
