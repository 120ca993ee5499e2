"""The real program, compiled ahead of time: `jaxtune.step.train_step` under the jit training uses.

`jit_train_step` is the one definition of how the train step is jitted (shardings in and out, the
state donated); jaxtune.train runs what it returns, and `compile_step` lowers the same function over
the abstract state of `run.abstract_train_state` and an abstract batch, for the target's devices:
deviceless TPU devices from libtpu, or this process's CPU devices. Nothing is allocated. The
compiler's `memory_analysis()` then gives arguments, outputs, aliases (the donated state updated in
place) and temporaries per device; its `cost_analysis()` counts FLOPs with a scanned layer body
counted once (`compiler_flops`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import jax

from jaxtune import sharding, state, step
from jaxtune.models.llama import ModelConfig
from jaxtune.plan.run import Run, abstract_batch, abstract_train_state

COMPILED_FIELDS = ("argument", "output", "alias", "temp", "total")


def jit_train_step(cfg: ModelConfig, train_state: state.TrainState, mesh, rules, grad_accum: int):
    """`step.train_step` jitted with the state's, the frozen weights' and the batch's shardings; the
    state is donated (its buffers are reused for the new state)."""
    batch_sh = sharding.batch_sharding(mesh, rules)
    batch_shardings = {key: batch_sh for key in step.BATCH_KEYS}
    return jax.jit(functools.partial(step.train_step, cfg=cfg, tx=train_state.tx, grad_accum=grad_accum),
                   in_shardings=(train_state.shardings, train_state.frozen_shardings, batch_shardings),
                   out_shardings=(train_state.shardings, sharding.replicated(mesh)), donate_argnums=0)


def compile_step(run: Run, devices: Sequence):
    """The train step of `run` compiled for `devices` (nothing allocated)."""
    mesh = sharding.make_mesh(run.config.mesh.shape, devices=devices)
    train_state = abstract_train_state(run, mesh)
    train_fn = jit_train_step(run.cfg, train_state, mesh, run.rules, run.grad_accum)
    return train_fn.lower(train_state.state, train_state.frozen, abstract_batch(run, mesh)).compile()


def compiled_figures(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled program (`jax.jit(f).lower(...).compile()`): argument, output,
    alias (donated arguments, counted in both arguments and outputs), temp, and total."""
    stats = compiled.memory_analysis()
    memory = {name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0) for name in COMPILED_FIELDS[:-1]}
    memory["total"] = memory["argument"] + memory["output"] + memory["temp"] - memory["alias"]
    return memory


def compiler_flops(compiled) -> float | None:
    """FLOPs the compiler's cost model counts for the program, per device (a scanned layer body counted once)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without a cost model
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def refused_temporaries_bytes(error: Exception) -> int | None:
    """The temporaries the TPU compiler said a refused program needs ('... HLO temporaries (18.20G) exceeds
    available HBM ...'), in bytes; None when the message does not say."""
    found = re.search(r"temporaries \(([\d.]+)([KMGT])\)", str(error))
    if not found:
        return None
    return int(float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024)


def is_out_of_memory(error: Exception) -> bool:
    """Whether a compile failed because the program does not fit (the TPU compiler refuses those)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or ("exceeds" in text and "memory" in text)
