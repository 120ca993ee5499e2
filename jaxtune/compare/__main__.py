"""`python -m jaxtune.compare --config=configs/compare.py [--config.KEY=VALUE ...] --workdir=DIR`.

Validates the compare config and every arm's train config before any compute, runs the base
evaluation and the arms (jaxtune.compare.run; rerun the command to resume), then writes
DIR/report.json, DIR/report.md and DIR/report.html (plots under DIR/plots/ with matplotlib), also
after each arm. `--report_only` runs nothing and writes the report of what is done.
"""

from __future__ import annotations

import logging
import pathlib
import sys

import jaxtune

from jaxtune import config as config_lib
from jaxtune.compare import arms as arms_lib
from jaxtune.compare import report, run
from jaxtune.errors import JaxtuneError

log = logging.getLogger("jaxtune.compare")


def compare(config, workdir: str | pathlib.Path, report_only: bool = False) -> dict[str, pathlib.Path]:
    """The whole command: arms -> runs -> report files (their paths). report_only: run no job, write
    the report of what is done."""
    workdir = pathlib.Path(workdir)
    arms = arms_lib.arm_configs(config)
    log.info("%d arms: %s", len(arms), ", ".join(a.name for a in arms))
    task_names = arms_lib.scored_tasks(config)

    def write_report(runs: dict) -> tuple[dict, dict]:  # after each arm: a report of what is done so far
        full = report.assemble(config.to_dict(), task_names, runs)
        return full, report.write(full, workdir)

    runs = run.collect(config, arms, workdir) if report_only else run.run_all(config, arms, workdir,
                                                                               after_each=write_report)
    full, paths = write_report(runs)
    for sentence in full["verdict"]["sentences"]:
        log.info("verdict: %s", sentence)
    if full["plots_skipped"]:
        log.warning("plots skipped: %s", full["plots_skipped"])
    log.info("report: %s, %s, %s", paths["md"], paths["html"], paths["json"])
    return paths


def parse_flags(argv: list[str]) -> list[str]:
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        problems = [config_lib.unknown_key_problem(key, arg) for arg in argv[1:] if arg.startswith("--config.")
                    for key in [arg[len("--config."):].split("=", 1)[0]] if not key.startswith("compare.")]
        problems = [p for p in problems if p] or [f"bad command line: {str(e).strip(chr(39))}"]
        print("error: " + "\n".join(problems) + "\nSee configs/compare.py and jaxtune/config.py for every key.",
              file=sys.stderr)
        sys.exit(2)


def main(argv):
    from absl import flags

    del argv
    jaxtune.setup_logging()
    FLAGS = flags.FLAGS
    workdir = FLAGS.workdir or str(pathlib.Path("runs") / pathlib.Path(FLAGS["config"].config_filename).stem)
    try:
        compare(FLAGS.config, workdir, report_only=FLAGS.report_only)
    except JaxtuneError as e:
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "compare config file (configs/compare.py)", lock_config=True)
    flags.DEFINE_string("workdir", "", "compare directory (default runs/<config name>); rerun to resume")
    flags.DEFINE_bool("report_only", False, "run nothing: write the report of the jobs already done")
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
