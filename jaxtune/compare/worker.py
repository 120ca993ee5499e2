"""One compare job in its own process: train an arm, evaluate an arm, or evaluate the base model.

    python -m jaxtune.compare.worker train ARM_DIR      # jaxtune.train.run -> ARM_DIR/compare/train.json
    python -m jaxtune.compare.worker evaluate ARM_DIR   # jaxtune.evaluate's pieces -> .../compare/result.json
    python -m jaxtune.compare.worker base BASE_DIR      # the base model's figures -> BASE_DIR/result.json

jaxtune.compare.run starts these (one process per job: each arm's memory is measured alone, freed
when it ends, and a kill leaves a workdir that the next attempt resumes). Each job reads its input
from JOB_DIR/compare/arm.json (BASE_DIR/base.json) and writes its output last, atomically: an output
file exists only for a finished job.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys
import time

import jaxtune

from jaxtune import config as config_lib
from jaxtune import checkpoint, evaluate, generate, lora, loading, metrics, tasks, train
from jaxtune import params as params_lib
from jaxtune.compare import spectra
from jaxtune.plan import measured
from jaxtune.errors import JaxtuneError

log = logging.getLogger("jaxtune.compare")

ARM_SPEC, TRAIN_OUT, RESULT_OUT, ATTEMPTS = "arm.json", "train.json", "result.json", "attempts.jsonl"
BASE_SPEC = "base.json"
PREDICTIONS = "task_predictions.json"  # each task's answers next to the expected ones


def write_json(path: pathlib.Path, record: dict) -> None:
    """Write `record` to `path` atomically (a temp file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=float))
    tmp.replace(path)


def read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def settings_for(spec: dict) -> evaluate.Settings:
    """The evaluation settings of a compare config (the arm's data.template / max_len / seed)."""
    c, run = spec["compare"], spec["config"]
    return evaluate.Settings(split="test", limit=c["task_examples"], max_new_tokens=c["task_max_new_tokens"],
                             batch_size=c["eval_batch_size"], max_len=run["data"]["max_len"],
                             template=run["data"]["template"], mask_prompt=run["data"]["mask_prompt"],
                             forget_max_new_tokens=c["forget_max_new_tokens"], samples=c["samples"],
                             seed=run["train"]["seed"])


# ============================================================================================
# Jobs


def train_arm(arm_dir: pathlib.Path) -> dict:
    """jaxtune.train.run on the arm's config (resuming its checkpoint if any); wall time of this
    attempt and this process's peak memory (measured.measured_peak_memory: its own peak RSS, not its
    parent's, and the busiest device's peak where the platform reports one): the whole train.run,
    i.e. model load, data, compiling the train and eval steps, the held-out evaluations, the steps and
    the checkpoint saves, on top of Python and JAX themselves. A diverged run is a finished outcome,
    recorded as such."""
    spec = read_json(arm_dir / "compare" / ARM_SPEC)
    config = config_lib.from_json(json.dumps(spec["config"]))
    with open(arm_dir / "compare" / ATTEMPTS, "a") as f:
        f.write(json.dumps({"start": time.time()}) + "\n")
    attempts = len((arm_dir / "compare" / ATTEMPTS).read_text().splitlines())
    start = time.perf_counter()
    status, message = "finished", None
    try:
        train.run(config, arm_dir)
    except train.TrainingError as e:
        status, message = "diverged", str(e)
        log.warning("arm %s diverged: %s", spec["name"], e)
    record = {"status": status, "message": message, "wall_s": time.perf_counter() - start,
              **measured.measured_peak_memory(), "attempts": attempts}
    write_json(arm_dir / "compare" / TRAIN_OUT, record)
    return record


def task_scores(model, params, lora_cfg, task_names: list[str], settings: evaluate.Settings,
                predictions_file: pathlib.Path) -> dict:
    """task -> its scores (accuracy, the task's metrics, n) on the first settings.limit test examples;
    the answers themselves go to predictions_file."""
    out, predictions = {}, {}
    for name in task_names:
        examples = tasks.load_examples(name, settings.split)[:settings.limit]
        scores = evaluate.task_accuracy(model, name, examples, params=params, lora=lora_cfg,
                                        max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                                        template=settings.template)
        out[name] = {k: v for k, v in scores.items() if k != "predictions"}
        predictions[name] = scores["predictions"]
        log.info("task %s: accuracy %.3f", name, scores["accuracy"])
    write_json(predictions_file, predictions)
    return out


def general_inputs(settings: evaluate.Settings) -> tuple[list[str], list[dict]]:
    prompts = [row["prompt"] for row in evaluate.read_jsonl(pathlib.Path(settings.general_prompts))]
    return prompts, evaluate.read_jsonl(pathlib.Path(settings.general_questions))


def base_job(base_dir: pathlib.Path) -> dict:
    """The base model alone: task scores, diversity, its answers to the general prompts and questions
    (cached in BASE_DIR/base_reference.json: every arm's drift and QA retention is measured on them)."""
    spec = read_json(base_dir / BASE_SPEC)
    settings = settings_for(spec)
    model = loading.load(spec["config"]["model"]["path"], revision=spec["config"]["model"]["revision"] or None)
    generate.prompt_template(model.tokenizer, settings.template, "jaxtune.compare", evaluate.TEMPLATE_FIX)
    prompts, questions = general_inputs(settings)
    key = evaluate.reference_key(spec["config"]["model"]["path"], prompts, questions, settings)
    reference = evaluate.base_reference(model, model.params, prompts, questions, settings,
                                        base_dir / evaluate.BASE_CACHE, key)
    known = evaluate.questions_base_knows(questions, reference["question_answers"])
    record = {"tasks": task_scores(model, model.params, None, spec["tasks"], settings, base_dir / PREDICTIONS),
              "diversity": evaluate.diversity(model, model.params, None, prompts, settings),
              "general_qa": {"n_questions": len(questions), "n_base_correct": len(known)},
              "model_params": params_lib.count_params(model.params)}
    write_json(base_dir / RESULT_OUT, record)
    return record


def evaluate_arm(arm_dir: pathlib.Path, base_dir: pathlib.Path) -> dict:
    """The trained arm's figures: task scores, forgetting (drift, general-QA retention, diversity) on
    the base model's cached answers, its weight-change spectra, its cost (metrics.jsonl, checkpoint)."""
    spec = read_json(arm_dir / "compare" / ARM_SPEC)
    settings = settings_for(spec)
    info = loading.load_with_info(None, arm_dir)
    model, params, lora_cfg = info["model"], info["params"], info["lora"]
    prompts, questions = general_inputs(settings)
    reference = read_json(base_dir / evaluate.BASE_CACHE)
    record = {"step": info["step"], "tasks": task_scores(model, params, lora_cfg, spec["tasks"], settings,
                                                         arm_dir / "compare" / PREDICTIONS),
              "drift": evaluate.drift(model, model.params, params, lora_cfg, prompts, reference["prompt_answers"],
                                      settings),
              "general_qa": evaluate.general_qa(model, params, lora_cfg, questions, reference["question_answers"],
                                                settings),
              "diversity": evaluate.diversity(model, params, lora_cfg, prompts, settings)}
    trained = params_lib.filter_tree(params, lora.is_lora_path) if lora_cfg else params
    record["trainable_params"] = params_lib.count_params(trained)
    record["checkpoint_bytes"] = folder_bytes(checkpoint.checkpoint_dir(arm_dir) / str(info["step"]))
    if spec["compare"]["spectra"]:
        log.info("weight-change spectra of %s", spec["name"])
        record["spectra"] = spectra.weight_change(model.params, params, lora_cfg.scaling if lora_cfg else None)
    record["curves"] = curves(arm_dir)
    write_json(arm_dir / "compare" / RESULT_OUT, record)
    return record


def folder_bytes(folder: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def curves(arm_dir: pathlib.Path) -> dict:
    """The run's train and eval records from metrics.jsonl (the last record of each step: a resumed
    run may have logged a step twice)."""
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    path = arm_dir / metrics.METRICS_FILE
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if record.get("kind") in by_kind:
            by_kind[record["kind"]][int(record["step"])] = record
    train_records = [by_kind["train"][s] for s in sorted(by_kind["train"])]
    return {"train_steps": [r["step"] for r in train_records], "train_loss": [r["loss"] for r in train_records],
            "tokens_per_s": [r["tokens_per_s"] for r in train_records],
            "eval_steps": sorted(by_kind["eval"]), "eval_loss": [by_kind["eval"][s]["loss"] for s in sorted(by_kind["eval"])]}


def main(argv: list[str]) -> int:
    jaxtune.setup_logging()
    if len(argv) < 2 or argv[0] not in ("train", "evaluate", "base"):
        print("usage: python -m jaxtune.compare.worker train|evaluate ARM_DIR | base BASE_DIR", file=sys.stderr)
        return 2
    job, folder = argv[0], pathlib.Path(argv[1])
    try:
        if job == "train":
            train_arm(folder)
        elif job == "evaluate":
            evaluate_arm(folder, folder.parent.parent / "base")
        else:
            base_job(folder)
    except JaxtuneError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
