"""The command line of `python -m jaxtune.plan` (see jaxtune/plan/__main__.py)."""

from __future__ import annotations

import json
import logging
import pathlib
import sys

import jaxtune
from jaxtune import config as config_lib
from jaxtune.errors import JaxtuneError
from jaxtune.plan.planner import make_plan, search
from jaxtune.plan.report import format_plan, json_ready
from jaxtune.plan.run import Run
from jaxtune.plan.targets import GPU_CHIPS, parse_target

log = logging.getLogger("jaxtune.plan")


def main(argv) -> None:
    from absl import flags

    del argv
    FLAGS = flags.FLAGS
    jaxtune.setup_logging()
    try:
        config_lib.check_known_keys(FLAGS.config)
        target = parse_target(FLAGS.target)
        run = Run.from_config(FLAGS.config)
        plan = (search if FLAGS.search else make_plan)(run, target, compile=not FLAGS.analytic)
    except JaxtuneError as e:
        log.error("%s", e)
        sys.exit(2)
    print(format_plan(plan))
    if FLAGS.json:
        pathlib.Path(FLAGS.json).write_text(json.dumps(json_ready(plan), indent=2) + "\n")


def define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file (configs/*.py), as for jaxtune.train", lock_config=True)
    flags.DEFINE_string("target", "cpu", "cpu | tpu:v5e-1/4/8 | tpu:v5p-8 | tpu:v6e-8 | tpu:GEN:TOPOLOGY | "
                        + " | ".join(f"gpu:{name}" for name in GPU_CHIPS) + " | gpu:Nx<gpu>")
    flags.DEFINE_bool("search", False, "find the largest batch (and remat policy) that fits")
    flags.DEFINE_string("json", "", "also write the plan to this JSON file")
    flags.DEFINE_bool("analytic", False, "skip the compiler (analytic estimate only)")
    flags.mark_flags_as_required(["config"])
