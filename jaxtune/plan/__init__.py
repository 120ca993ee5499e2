"""`python -m jaxtune.plan`: will this run fit on that TPU or GPU, and how fast? Memory and speed plans.

    python -m jaxtune.plan --config=configs/lora_llama.py --config.model.path=arch:llama-3.1-8b \\
        --config.data.max_len=2048 --config.model.dtype=bfloat16 --config.model.compute_dtype=bfloat16 \\
        --target=tpu:v5e-8 --search --json=plan.json

For one run config on one target, per device, the package answers with:

* an analytic estimate (`estimate.estimate_memory`): frozen weights, float32 trained masters,
  gradients, optimizer state, FSDP all-gathered weights, activations kept under the remat policy,
  one layer's attention scores, LoRA dropout copies, the chunked cross-entropy, the batch. Any target.
* the compiler's figures (`compiled.compile_step`): the real `jaxtune.step.train_step`, jitted by
  `compiled.jit_train_step` (which jaxtune.train runs too) over the abstract state that
  `jaxtune.state.build` gives under jax.eval_shape (`run.abstract_train_state`), compiled ahead of
  time for the target's devices: deviceless TPU devices from libtpu, or this machine's CPU devices.
  GPU targets are analytic only.
* a roofline speed (`speed.estimate_speed`): step time, tokens/s, MFU; estimates, not measurements.
* `planner.search`: the largest batch and the remat policy that fit.

Modules: targets (what a target is), run (what a config trains; its state as shapes), estimate,
compiled, speed, planner (make_plan, search), report (text, JSON, training's start-up lines),
measured (what a live process holds and used), calibration (the tiny shapes the estimate's constants
are fitted on), cli / __main__ (the command line).
"""

from jaxtune.plan.compiled import compile_step, jit_train_step
from jaxtune.plan.estimate import COMPILER_HABITS, estimate_memory
from jaxtune.plan.measured import measured_peak_memory
from jaxtune.plan.planner import make_plan, search
from jaxtune.plan.report import format_plan, gib, startup_report
from jaxtune.plan.run import Run, model_config
from jaxtune.plan.targets import GiB, PlanError, Target, parse_target

__all__ = ["COMPILER_HABITS", "GiB", "PlanError", "Run", "Target", "compile_step", "estimate_memory", "format_plan",
           "gib", "jit_train_step", "make_plan", "measured_peak_memory", "model_config", "parse_target", "search",
           "startup_report"]
