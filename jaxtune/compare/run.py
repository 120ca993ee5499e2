"""Run a compare: the base model's figures, then each arm trained and evaluated, each job a subprocess.

    DIR/base/            base.json (input), base_reference.json (the base model's answers), result.json
    DIR/arms/NAME/       an ordinary jaxtune.train workdir (config.json, metrics.jsonl, checkpoints/, ...)
    DIR/arms/NAME/compare/  arm.json (input), attempts.jsonl, train.json, result.json

Every job runs in its own process (`python -m jaxtune.compare.worker ...`): an arm's peak memory is
its own, memory is freed between arms, and a killed compare leaves only files that a rerun can read.
A job is done when its output file exists (written last, atomically); a rerun of the command skips
done jobs and restarts the others, where jaxtune.train resumes the arm's latest checkpoint. A rerun
with a changed arm (its train config differs from DIR/arms/NAME/compare/arm.json) is refused.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable

import ml_collections

from jaxtune import checkpoint
from jaxtune import config as config_lib
from jaxtune.compare import worker
from jaxtune.compare.arms import Arm, CompareConfigError, scored_tasks
from jaxtune.errors import JaxtuneError

log = logging.getLogger("jaxtune.compare")


class ArmFailed(JaxtuneError, RuntimeError):
    """A job's process failed; the message names the arm, the job and the last lines it printed."""


def arm_dir(workdir: pathlib.Path, name: str) -> pathlib.Path:
    return workdir / "arms" / name


def evaluation_settings(config: ml_collections.ConfigDict) -> dict:
    """The compare group without the list of arms: adding or removing an arm leaves the others' jobs valid."""
    return {k: v for k, v in config.compare.to_dict().items() if k != "arms"}


def arm_spec(arm: Arm, config: ml_collections.ConfigDict) -> dict:
    """What the worker of `arm` reads: its name, mode, changes, train config, the evaluation settings."""
    return {"name": arm.name, "mode": arm.mode, "changes": arm.changes, "config": arm.config.to_dict(),
            "compare": evaluation_settings(config), "tasks": scored_tasks(config)}


def write_spec(path: pathlib.Path, spec: dict, what: str) -> None:
    """Write the job's input, or check that an earlier attempt's input is the same job."""
    if path.exists():
        old = json.loads(path.read_text())
        new = config_lib.flatten(json.loads(json.dumps(spec)))
        old = config_lib.flatten(old)
        if old != new:
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise CompareConfigError(
                f"{what} in {path.parent.parent} was started with another config ({', '.join(changed)} differ): "
                f"use a new --workdir, or delete {path.parent.parent} to redo it")
        return
    worker.write_json(path, spec)


def run_job(job: str, folder: pathlib.Path, log_file: pathlib.Path) -> None:
    """`python -m jaxtune.compare.worker JOB FOLDER`, its output appended to log_file; ArmFailed if it fails."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    package_root = str(pathlib.Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"  # the job's log is readable while it runs
    with open(log_file, "a") as out:
        code = subprocess.call([sys.executable, "-m", "jaxtune.compare.worker", job, str(folder)], stdout=out,
                               stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-12:])
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"  # SIGKILL: often the OOM killer
        raise ArmFailed(f"{job} of {folder} failed ({how}); see {log_file}:\n{tail}")


def base_figures(config: ml_collections.ConfigDict, arms: list[Arm], workdir: pathlib.Path) -> dict:
    """DIR/base/result.json, computed unless it exists."""
    folder = workdir / "base"
    spec = {"config": arms[0].config.to_dict(), "compare": evaluation_settings(config), "tasks": scored_tasks(config)}
    spec["config"] = {k: spec["config"][k] for k in ("model", "data", "train")}  # what the base figures depend on
    write_spec(folder / worker.BASE_SPEC, spec, "the base evaluation")
    result = folder / worker.RESULT_OUT
    ran = not result.exists()
    if ran:
        log.info("base model: evaluating (log: %s)", folder / "log.txt")
        run_job("base", folder, folder / "log.txt")
    else:
        log.info("base model: done (%s)", result)
    return {**worker.read_json(result), "ran": ran}


def run_arm(arm: Arm, config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    """Train (or resume) and evaluate one arm, skipping what is done -> {spec, train, result}."""
    folder = arm_dir(workdir, arm.name)
    spec = arm_spec(arm, config)
    write_spec(folder / "compare" / worker.ARM_SPEC, spec, f"arm {arm.name}")
    train_out, result_out = folder / "compare" / worker.TRAIN_OUT, folder / "compare" / worker.RESULT_OUT
    log_file = folder / "compare" / "log.txt"
    ran = not (train_out.exists() and result_out.exists())
    if train_out.exists():
        log.info("arm %s: trained (skipped)", arm.name)
    else:
        resumed = bool(checkpoint.step_dirs(checkpoint.checkpoint_dir(folder)))
        log.info("arm %s: %s (log: %s)", arm.name, "resuming training" if resumed else "training", log_file)
        run_job("train", folder, log_file)
    trained = worker.read_json(train_out)
    if trained["status"] != "finished":
        log.info("arm %s: %s, not evaluated", arm.name, trained["status"])
        return {"spec": spec, "train": trained, "result": None, "ran": ran}
    if result_out.exists():
        log.info("arm %s: evaluated (skipped)", arm.name)
    else:
        log.info("arm %s: evaluating", arm.name)
        run_job("evaluate", folder, log_file)
    return {"spec": spec, "train": trained, "result": worker.read_json(result_out), "ran": ran}


def pending(arm: Arm, config: ml_collections.ConfigDict, workdir: pathlib.Path | None = None) -> dict:
    """An arm not done yet, as run_arm's record (train status 'pending'), with its loss curves so far
    when it has started (its metrics.jsonl in `workdir`)."""
    record = {"spec": arm_spec(arm, config), "result": None, "ran": True,
              "train": {"status": "pending", "message": None, "wall_s": None, "peak_rss_bytes": None, "attempts": 0}}
    if workdir is not None and (arm_dir(workdir, arm.name) / "metrics.jsonl").exists():
        record["curves"] = worker.curves(arm_dir(workdir, arm.name))
    return record


def run_all(config: ml_collections.ConfigDict, arms: list[Arm], workdir: pathlib.Path,
            after_each: Callable[[dict], None] = lambda runs: None) -> dict:
    """The base figures and every arm's, in the config's order -> {base, arms: {name: ...}};
    `after_each(runs so far, the rest pending)` is called after the base and after each arm that
    ran a job (not after those found done). An arm whose job fails (ArmFailed: killed, out of
    memory, crashed) is reported 'failed' and the next arms run; a rerun retries it."""
    workdir.mkdir(parents=True, exist_ok=True)
    runs = {"base": base_figures(config, arms, workdir), "arms": {arm.name: pending(arm, config) for arm in arms}}
    if runs["base"]["ran"]:
        after_each(runs)
    for arm in arms:
        try:
            runs["arms"][arm.name] = run_arm(arm, config, workdir)
        except ArmFailed as e:  # killed (out of memory, ...) or crashed: the next arms still run
            log.error("arm %s failed; the compare goes on with the next arm (rerun to retry it): %s", arm.name, e)
            runs["arms"][arm.name] = pending(arm, config, workdir)
            runs["arms"][arm.name]["train"].update(status="failed", message=str(e).split("\n")[0])
        if runs["arms"][arm.name]["ran"]:
            after_each(runs)
    return runs


def collect(config: ml_collections.ConfigDict, arms: list[Arm], workdir: pathlib.Path) -> dict:
    """What run_all would return, from the jobs already done, running nothing (arms not done are
    pending; an arm trained but not evaluated is pending too)."""
    base = workdir / "base" / worker.RESULT_OUT
    if not base.exists():
        raise CompareConfigError(f"{workdir} has no base model figures ({base}): run the compare first")
    runs = {"base": worker.read_json(base), "arms": {}}
    for arm in arms:
        folder = arm_dir(workdir, arm.name) / "compare"
        trained = folder / worker.TRAIN_OUT
        done = trained.exists() and ((folder / worker.RESULT_OUT).exists()
                                     or worker.read_json(trained)["status"] != "finished")
        runs["arms"][arm.name] = pending(arm, config, workdir) if not done else {
            "spec": arm_spec(arm, config), "train": worker.read_json(trained), "ran": False,
            "result": worker.read_json(folder / worker.RESULT_OUT) if (folder / worker.RESULT_OUT).exists() else None}
    return runs
