"""`python -m jaxtune.plan --config=configs/lora_llama.py [--config.KEY=VALUE ...] --target=T [--search]
[--json=FILE] [--analytic]`: the plan of the run that config trains, on target T."""

import os

# The planner runs jax on the CPU whatever is installed: TPU targets are compiled deviceless from
# libtpu's topology description, which needs no TPU runtime (and jax would otherwise try to start one
# wherever libtpu is installed).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app  # noqa: E402

from jaxtune.plan.cli import define_flags, main  # noqa: E402
from jaxtune.config import parse_flags  # noqa: E402

if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
