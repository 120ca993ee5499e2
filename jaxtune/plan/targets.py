"""What a plan is for: the target's devices (`cpu`, TPU slices, GPUs by name) and their per-chip figures.

    cpu                this machine (its RAM shared by its CPU devices; compiled by XLA:CPU)
    tpu:v5e-8          a TPU slice by name (v5e / v6e count chips, v5p counts TensorCores, 2 per chip)
    tpu:v5e:2x4        any topology libtpu knows
    gpu:h100-80gb      a GPU by name, analytic only; gpu:8xh100-80gb for eight

TPU devices come from libtpu without a TPU (`jax.experimental.topologies.get_topology_desc`): the
TPU compiler then compiles for them on any Linux x86-64 machine ("deviceless"). The topology is
always requested explicitly, so a CPU process (JAX_PLATFORMS=cpu) never starts a TPU runtime.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
from jax.experimental.topologies import get_topology_desc

from jaxtune.errors import JaxtuneError

GiB = 1024**3
LIBTPU_INSTALL = "pip install 'libtpu==0.0.42.*' (the version jax[tpu] 0.10.2 pins; it is in jaxtune's test extra)"


class PlanError(JaxtuneError, ValueError):
    """A target or plan request that cannot be answered; the message says what would work."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-device figures of one accelerator (public spec sheets; bf16 dense peak)."""

    kind: str
    memory_bytes: int
    peak_flops: float  # bf16 dense FLOP/s (CPU: a measured float32 matmul rate)
    memory_bandwidth: float  # bytes/s
    interconnect_bandwidth: float  # bytes/s per device, one direction (ICI / NVLink / PCIe)


TPU_CHIPS = {
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9, 200e9),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9, 600e9),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1640e9, 448e9),
}
GPU_CHIPS = {
    "h100-80gb": Chip("NVIDIA H100 80GB (SXM)", 80 * GiB, 989e12, 3350e9, 450e9),
    "a100-80gb": Chip("NVIDIA A100 80GB (SXM)", 80 * GiB, 312e12, 2039e9, 300e9),
    "a100-40gb": Chip("NVIDIA A100 40GB (SXM)", 40 * GiB, 312e12, 1555e9, 300e9),
    "l4": Chip("NVIDIA L4", 24 * GiB, 121e12, 300e9, 32e9),
    "rtx4090": Chip("NVIDIA GeForce RTX 4090", 24 * GiB, 165e12, 1008e9, 32e9),
}
# Slice shapes by chip count (v5e / v6e: 2-D tori; v5p: 3-D).
SLICES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
SLICES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}
# Chips one host holds, per axis (a slice larger than that spans hosts).
HOST_BOUNDS = {"v5e": (2, 4, 1), "v6e": (2, 4, 1), "v5p": (2, 2, 1)}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as given: 'tpu:v5e-8', 'gpu:h100-80gb', 'cpu'
    platform: str  # 'tpu' | 'gpu' | 'cpu'
    num_devices: int
    chip: Chip
    topology: str | None = None  # TPU: 'v5e:2x4'

    @property
    def compiled(self) -> bool:
        """Whether the real compiler can be asked on this machine (GPU targets: analytic only)."""
        return self.platform in ("tpu", "cpu")


def target_names() -> list[str]:
    return (["cpu", "tpu:v5e-1", "tpu:v5e-4", "tpu:v5e-8", "tpu:v5p-8", "tpu:v6e-1", "tpu:v6e-4", "tpu:v6e-8"]
            + [f"gpu:{name}" for name in GPU_CHIPS])


def _slice_shape(spec: str, generation: str, count: str) -> tuple[int, str]:
    """A slice name's (chips, topology shape): v5e-8 -> (8, '2x4'), v5p-8 -> (4, '2x2x1')."""
    per_chip = 2 if generation == "v5p" else 1
    if not count.isdigit():
        raise PlanError(f"--target={spec}: expected tpu:GEN-N, e.g. tpu:v5e-8")
    shapes = SLICES_3D if generation == "v5p" else SLICES_2D
    chips = int(count) // per_chip
    if chips not in shapes or int(count) % per_chip:
        raise PlanError(f"--target={spec}: no {generation} slice of that size; try "
                        + ", ".join(f"tpu:{generation}-{n * per_chip}" for n in shapes)
                        + f", or a topology such as tpu:{generation}:{shapes[4]}")
    return chips, shapes[chips]


def _tpu_target(spec: str) -> Target:
    body = spec[len("tpu:"):].strip().lower()
    if ":" in body:  # a topology: tpu:v5e:4x4, tpu:v5p:2x2x2
        generation, shape = body.split(":", 1)
        sizes = shape.split("x")
        if not all(s.isdigit() and int(s) > 0 for s in sizes) or len(sizes) not in (2, 3):
            raise PlanError(f"--target={spec}: topology {shape!r} is not AxB or AxBxC")
        chips = math.prod(int(s) for s in sizes)
    elif "-" in body:
        generation, count = body.split("-", 1)
        if generation not in TPU_CHIPS:
            raise PlanError(f"--target={spec}: unknown TPU generation {generation!r}; known: {', '.join(TPU_CHIPS)}")
        chips, shape = _slice_shape(spec, generation, count)
    else:
        raise PlanError(f"--target={spec}: expected tpu:GEN-N (tpu:v5e-8) or tpu:GEN:TOPOLOGY (tpu:v5e:2x4)")
    if generation not in TPU_CHIPS:
        raise PlanError(f"--target={spec}: unknown TPU generation {generation!r}; known: {', '.join(TPU_CHIPS)}")
    return Target(spec, "tpu", chips, TPU_CHIPS[generation], f"{generation}:{shape}")


def _gpu_target(spec: str) -> Target:
    body = spec[len("gpu:"):].strip().lower()
    count = 1
    head, _, rest = body.partition("x")
    if head.isdigit() and rest:  # gpu:8xh100-80gb
        count, body = int(head), rest
    if body not in GPU_CHIPS or count < 1:
        raise PlanError(f"--target={spec}: unknown GPU {body!r}; known: "
                        + ", ".join(f"gpu:{name}" for name in GPU_CHIPS) + " (gpu:8xh100-80gb for 8 of them)")
    return Target(spec, "gpu", count, GPU_CHIPS[body])


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@functools.cache
def cpu_matmul_flops() -> float:
    """FLOP/s of a float32 1024 x 1024 matmul on this machine's CPU, best of 3 (a measured ceiling)."""
    x = jnp.ones((1024, 1024), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best


def parse_target(spec: str) -> Target:
    """'cpu' | 'tpu:v5e-8' | 'tpu:v5e:2x4' | 'gpu:h100-80gb' | 'gpu:8xh100-80gb' -> Target."""
    spec = (spec or "").strip()
    if spec == "cpu":
        n = len(jax.devices("cpu"))
        # One process's CPU devices share this machine's RAM; 20 GB/s is a typical DRAM stream rate.
        return Target("cpu", "cpu", n, Chip("CPU (this machine)", physical_memory_bytes() // n,
                                            cpu_matmul_flops(), 20e9, 20e9))
    if spec.startswith("tpu:"):
        return _tpu_target(spec)
    if spec.startswith("gpu:"):
        return _gpu_target(spec)
    raise PlanError(f"--target={spec!r}: choose one of {', '.join(target_names())} (or tpu:GEN:TOPOLOGY, gpu:Nx<gpu>)")


def target_devices(target: Target) -> list:
    """The devices to build the mesh over: this process's CPU devices, or deviceless TPU devices from libtpu."""
    if target.platform == "cpu":
        return jax.devices("cpu")
    if target.platform != "tpu":
        raise PlanError(f"{target.name}: no compiler for this target on this machine (analytic plan only)")
    generation, shape = target.topology.split(":")
    bounds = [int(s) for s in shape.split("x")] + [1] * (3 - len(shape.split("x")))
    host_bounds = tuple(min(b, h) for b, h in zip(bounds, HOST_BOUNDS[generation]))
    try:
        return list(topology_devices(target.topology, host_bounds))
    except Exception as e:  # libtpu missing, or a topology it does not know
        first_line = (str(e).strip().splitlines() or [repr(e)])[0]
        raise PlanError(f"{target.name}: libtpu could not describe the TPU topology {target.topology} "
                        f"({type(e).__name__}: {first_line}). Deviceless TPU compilation needs libtpu: "
                        f"{LIBTPU_INSTALL}; or plan with --analytic") from e


@functools.cache
def topology_devices(topology: str, host_bounds: tuple[int, ...]) -> tuple:
    # Other jax processes on this machine (tests in parallel, a training run) may hold libtpu's lock file;
    # without a TPU VM's metadata libtpu logs an error for every unknown worker hostname.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    desc = get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                             chips_per_host_bounds=host_bounds, num_slices=1)
    return tuple(desc.devices)
