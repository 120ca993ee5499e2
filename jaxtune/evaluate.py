"""`python -m jaxtune.evaluate`: held-out loss/perplexity, task accuracy and forgetting, base vs fine-tuned.

This module owns evaluation of a model, or of a fine-tuned model next to its base:

    python -m jaxtune.evaluate --workdir=runs/lora_llama [--step=last|best|N] [--task=viggo]
    python -m jaxtune.evaluate --model=smollm2-135m-instruct [--adapter=PEFT_DIR|WORKDIR] --task=viggo \
        [--split=test] [--limit=N] [--eval_file=held_out.jsonl] [--out=FILE] [--samples=16] [--dtype=float32] \
        [--max_len=N] [--mask_prompt=true|false]

Sections of the report (WORKDIR/reports/eval_<task>.json by default, plus a table on stdout):

  * heldout: loss and perplexity on the task's split (or --eval_file), through jaxtune.data and
    step.eval_step: the token-normalised cross-entropy of assistant tokens, as in training.
  * task: accuracy (and the task's other metrics) of batched greedy answers, scored by the task.
  * forgetting (only with a fine-tuned model next to its base):
      drift      the fine-tuned model's loss on the BASE model's own greedy answers to bundled general
                 prompts (evaluate_data/general_prompts.jsonl), next to the base model's loss on them;
      general_qa accuracy on bundled short-answer questions (evaluate_data/general_questions.jsonl),
                 restricted to those the base model answers correctly;
      diversity  distinct-1 / distinct-2 of --samples generations at temperature 1.0.
    The base model's answers are cached in REPORTS/base_reference.json, keyed by what produced them.

Every prompt and every scored conversation is rendered the way the run trained: with data.template
(the tokenizer's chat template for `auto`, the raw concatenation of the contents for `none`, or a
given Jinja template), read from the run's config.json (--workdir, or a run given as --adapter) or
given with --template; the held-out loss tokenizes with the run's data.max_len and data.mask_prompt
the same way (--max_len, --mask_prompt override them; without a run: 512 and true). Prompts are
rendered by generate.prompt_ids, as `generate --adapter` renders them. Task prompts and forgetting prompts need a template: with `auto` and a tokenizer without a chat
template the evaluation stops before it generates or scores anything, with one error naming the fix.

From training, `evaluate_run(model, params, lora_cfg, ...)` runs the same report on in-memory params.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import math
import pathlib
import re
import sys
from collections.abc import Sequence

import jax
import ml_collections

import jaxtune

from jaxtune import config as config_lib
from jaxtune import data as data_lib
from jaxtune import generate as generate_lib
from jaxtune import step as step_lib
from jaxtune import tasks
from jaxtune import workdir as workdir_lib
from jaxtune.loading import LoadedModel, adapter_template, load_with_info
from jaxtune.errors import JaxtuneError
from jaxtune.models.llama import LoRAConfig

log = logging.getLogger("jaxtune.evaluate")  # not __name__: that is "__main__" under python -m

DATA_DIR = pathlib.Path(__file__).resolve().parent / "evaluate_data"
GENERAL_PROMPTS = DATA_DIR / "general_prompts.jsonl"
GENERAL_QUESTIONS = DATA_DIR / "general_questions.jsonl"
QUESTION_SUFFIX = " Answer in one or two words."
BASE_CACHE = "base_reference.json"
TEMPLATE_FIX = ("give the template the model was trained with (data.template=none / --template=none for raw "
                "text, or a Jinja chat template), or use a tokenizer that has one")


# ============================================================================================
# Task accuracy and loss (also used by jaxtune.train)


def prompt_messages(example: dict) -> list[dict]:
    """The conversation up to (not including) the final assistant turn: what the model must answer."""
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def greedy_answers(model: LoadedModel, prompts: Sequence[str] | Sequence[Sequence[dict]], *, params: dict | None = None,
                   lora: LoRAConfig | None = None, max_new_tokens: int = 64, batch_size: int = 16,
                   temperature: float = 0.0, seed: int = 0, template: str = "auto") -> list[str]:
    """Generated text per prompt (a user message or a message list, rendered with `template` as in
    training: see generate.prompt_ids), in batches, stripped.

    Every batch is padded (with copies of its first prompt) to one row count, so that a whole
    evaluation compiles one decoding program per length bucket."""
    answers: list[str] = []
    rows_per_batch = min(batch_size, 1 << max(0, len(prompts) - 1).bit_length())
    for start in range(0, len(prompts), batch_size):
        ids = generate_lib.prompt_ids(model.tokenizer, prompts[start:start + batch_size], template)
        padded = ids + [ids[0]] * (rows_per_batch - len(ids))
        rows = generate_lib.generate(model, padded, max_new_tokens, temperature=temperature, seed=seed + start,
                                     params=params, lora=lora)
        answers += [model.tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows[:len(ids)]]
    return answers


def task_accuracy(model: LoadedModel, task_name: str, examples: Sequence[dict], *, params: dict | None = None,
                  lora: LoRAConfig | None = None, max_new_tokens: int = 64, batch_size: int = 16,
                  template: str = "auto") -> dict:
    """Greedy answers for `examples` (prompted with `template`) scored by the task's scorer
    -> {accuracy, <metrics>, predictions}."""
    task = tasks.get(task_name)
    predictions = greedy_answers(model, [prompt_messages(e) for e in examples], params=params, lora=lora,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, template=template)
    scores = tasks.score_all(task, predictions, list(examples))
    scores["predictions"] = [{"prediction": p, "answer": e.get("answer")} for p, e in zip(predictions, examples)]
    return scores


def loss_report(loss_sum: float, tokens: float) -> dict:
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "target_tokens": tokens}


def write_report(path: pathlib.Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True, default=float))


@functools.lru_cache(maxsize=8)
def _eval_fn(cfg):
    return jax.jit(functools.partial(step_lib.eval_step, cfg=cfg))


def tokenized_loss(model: LoadedModel, examples: Sequence[data_lib.TokenizedExample], *, params: dict | None = None,
                   lora: LoRAConfig | None = None, batch_size: int = 8, max_len: int = 512) -> dict:
    """loss_report of tokenized examples (each once, dropout off) under params / lora."""
    cfg = model.cfg.replace(lora=lora)
    eval_fn = _eval_fn(cfg)
    loss_sum, tokens = 0.0, 0.0
    for batch in data_lib.eval_batches(examples, batch_size, max_len, data_lib.pad_id_for(model.tokenizer)):
        s, n = eval_fn(model.params if params is None else params, {}, batch)
        loss_sum, tokens = loss_sum + float(s), tokens + float(n)
    return loss_report(loss_sum, tokens)


def tokenize(model: LoadedModel, examples: Sequence[dict], max_len: int, name: str = "eval", template: str = "auto",
             mask_prompt: bool = True) -> list[data_lib.TokenizedExample]:
    """Normalised examples ({"messages": [...]} or {"text": ...}) -> tokenized as training does with
    data.template / data.mask_prompt (default: chat template, assistant-only loss masks)."""
    tokenized, _ = data_lib.tokenize_examples(examples, model.tokenizer, max_len, mask_prompt=mask_prompt,
                                              template=template, name=name)
    return tokenized


# ============================================================================================
# Forgetting: pure pieces


def read_jsonl(path: pathlib.Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, apostrophes) of a text."""
    return re.findall(r"[a-z0-9']+", text.lower())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams / all word n-grams, pooled over texts (0.0 when there are none)."""
    grams = [tuple(ws[i:i + n]) for ws in map(words, texts) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def answer_matches(prediction: str, answers: Sequence[str]) -> bool:
    """True when one of the accepted answers appears in the prediction as whole words (case-insensitive)."""
    said = f" {' '.join(words(prediction))} "
    return any(f" {' '.join(words(answer))} " in said for answer in answers if words(answer))


def questions_base_knows(questions: Sequence[dict], base_predictions: Sequence[str]) -> list[int]:
    """Indices of the questions the base model answered correctly."""
    return [i for i, (q, p) in enumerate(zip(questions, base_predictions)) if answer_matches(p, q["answers"])]


def drift_examples(prompts: Sequence[str], answers: Sequence[str]) -> list[dict]:
    """(prompt, base answer) pairs as chat examples; empty answers are left out."""
    return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            for p, a in zip(prompts, answers) if a]


def sample_prompts(prompts: Sequence[str], samples: int) -> list[str]:
    """`samples` prompts, cycling through the list."""
    return [prompts[i % len(prompts)] for i in range(samples)]


# ============================================================================================
# Forgetting: with models


@dataclasses.dataclass(frozen=True)
class Settings:
    """What an evaluation runs; the defaults are the CLI's."""

    split: str = "test"
    limit: int = 0  # task examples (0 = all)
    max_new_tokens: int = 64  # task answers
    batch_size: int = 16
    max_len: int = 512
    template: str = "auto"  # data.template of the run: auto | none | a Jinja chat template
    mask_prompt: bool = True  # data.mask_prompt of the run (held-out loss on assistant tokens only)
    forget_max_new_tokens: int = 48  # base answers to general prompts
    samples: int = 16  # diversity samples
    seed: int = 0
    general_prompts: str = str(GENERAL_PROMPTS)  # JSONL of {"prompt": ...}
    general_questions: str = str(GENERAL_QUESTIONS)  # JSONL of {"question": ..., "answers": [...]}


def base_reference(model: LoadedModel, params: dict, prompts: Sequence[str], questions: Sequence[dict],
                   settings: Settings, cache_file: pathlib.Path | None, key: str) -> dict:
    """The base model's greedy answers to the general prompts and questions, from the cache when its key matches."""
    if cache_file is not None and cache_file.exists():
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("key") == key:
                return cached
        except (OSError, ValueError):
            log.warning("%s is unreadable: regenerating the base answers", cache_file)
    reference = {
        "key": key,
        "prompt_answers": greedy_answers(model, list(prompts), params=params, max_new_tokens=settings.forget_max_new_tokens,
                                         batch_size=settings.batch_size, template=settings.template),
        "question_answers": greedy_answers(model, [q["question"] + QUESTION_SUFFIX for q in questions], params=params,
                                           max_new_tokens=16, batch_size=settings.batch_size,
                                           template=settings.template),
    }
    if cache_file is not None:
        write_report(cache_file, reference)
    return reference


def reference_key(model_path: str, prompts: Sequence[str], questions: Sequence[dict], settings: Settings) -> str:
    text = json.dumps([model_path, list(prompts), list(questions), settings.forget_max_new_tokens, QUESTION_SUFFIX,
                       settings.template])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def drift(model: LoadedModel, base_params: dict, params: dict, lora: LoRAConfig | None, prompts: Sequence[str],
          base_answers: Sequence[str], settings: Settings) -> dict:
    """Loss of the base and the fine-tuned model on the base model's own answers; delta = tuned - base."""
    examples = tokenize(model, drift_examples(prompts, base_answers), settings.max_len, name="general_prompts",
                        template=settings.template)
    if not examples:
        return {"n_prompts": 0, "base_loss": None, "finetuned_loss": None, "delta": None}
    base = tokenized_loss(model, examples, params=base_params, max_len=settings.max_len)
    tuned = tokenized_loss(model, examples, params=params, lora=lora, max_len=settings.max_len)
    return {"n_prompts": len(examples), "base_loss": base["loss"], "finetuned_loss": tuned["loss"],
            "delta": tuned["loss"] - base["loss"], "target_tokens": base["target_tokens"]}


def general_qa(model: LoadedModel, params: dict, lora: LoRAConfig | None, questions: Sequence[dict],
               base_answers: Sequence[str], settings: Settings) -> dict:
    """Fine-tuned accuracy on the general questions the base model gets right."""
    known = questions_base_knows(questions, base_answers)
    kept = [questions[i] for i in known]
    answers = greedy_answers(model, [q["question"] + QUESTION_SUFFIX for q in kept], params=params, lora=lora,
                             max_new_tokens=16, batch_size=settings.batch_size,
                             template=settings.template) if kept else []
    correct = [answer_matches(a, q["answers"]) for a, q in zip(answers, kept)]
    return {"n_questions": len(questions), "n_base_correct": len(kept),
            "base_accuracy": len(kept) / len(questions) if questions else None,
            "finetuned_accuracy_on_base_correct": sum(correct) / len(kept) if kept else None,
            "forgotten": [q["question"] for q, ok in zip(kept, correct) if not ok]}


def diversity(model: LoadedModel, params: dict, lora: LoRAConfig | None, prompts: Sequence[str],
              settings: Settings) -> dict:
    """distinct-1 / distinct-2 of settings.samples generations at temperature 1.0."""
    texts = greedy_answers(model, sample_prompts(prompts, settings.samples), params=params, lora=lora,
                           max_new_tokens=settings.forget_max_new_tokens, batch_size=settings.batch_size,
                           temperature=1.0, seed=settings.seed, template=settings.template)
    return {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2), "samples": len(texts)}


def forgetting(model: LoadedModel, base_params: dict, params: dict, lora: LoRAConfig | None, settings: Settings,
               cache_file: pathlib.Path | None, model_path: str) -> dict:
    """drift, general_qa and diversity (base and fine-tuned) of a fine-tuned model against its base."""
    prompts = [row["prompt"] for row in read_jsonl(pathlib.Path(settings.general_prompts))]
    questions = read_jsonl(pathlib.Path(settings.general_questions))
    key = reference_key(model_path, prompts, questions, settings)
    reference = base_reference(model, base_params, prompts, questions, settings, cache_file, key)
    return {
        "drift": drift(model, base_params, params, lora, prompts, reference["prompt_answers"], settings),
        "general_qa": general_qa(model, params, lora, questions, reference["question_answers"], settings),
        "diversity": {"temperature": 1.0,
                      "base": diversity(model, base_params, None, prompts, settings),
                      "finetuned": diversity(model, params, lora, prompts, settings)},
    }


# ============================================================================================
# The report


def heldout_rows(task: str | None, split: str, eval_file: str | None, limit: int) -> tuple[list[dict], str]:
    """(normalised rows, their source): eval_file if given (comma-separated specs; `task:NAME` is that
    task's `split`), else the task's bundled split."""
    source = eval_file or f"{config_lib.TASK_SPEC}{task}"
    rows = data_lib.load_examples(data_specs(source, split))
    return (rows[:limit] if limit else rows), source


def data_specs(source: str, split: str) -> list[str]:
    """Comma-separated data specs -> specs for data.load_examples; `task:A+B` -> those tasks' `split` files."""
    specs = []
    for part in filter(None, (part.strip() for part in source.split(","))):
        if part.startswith(config_lib.TASK_SPEC):
            specs += [str(tasks.data_file(name, split)) for name in part[len(config_lib.TASK_SPEC):].split("+")]
        else:
            specs.append(part)
    return specs


def evaluate_run(model: LoadedModel, params: dict, lora: LoRAConfig | None = None, *, task: str | None,
                 base_params: dict | None = None, compare: bool = True, eval_file: str | None = None,
                 settings: Settings = Settings(), reports_dir: str | pathlib.Path | None = None,
                 model_path: str | None = None, extra: dict | None = None, out: str | pathlib.Path | None = None,
                 print_table: bool = True) -> dict:
    """The whole report for `params` (+ `lora`) on the base `model`; written to `out` (default
    REPORTS/eval_<task>.json when reports_dir is given) and printed.

    base_params: the base weights (default model.params); compare=False evaluates `params` alone
    (no base column, no forgetting). Everything is rendered with settings.template (see
    generate.prompt_ids); a template the prompts cannot use is a ConfigError before any compute."""
    if task or compare:
        generate_lib.prompt_template(model.tokenizer, settings.template,
                                     f"task {task}" if task else "the forgetting metrics", TEMPLATE_FIX)
    base_params = model.params if base_params is None else base_params
    columns = {"base": (base_params, None), "finetuned": (params, lora)} if compare else {"model": (params, lora)}
    report: dict = {"task": task, "split": settings.split, "model": model_path or str(model.folder),
                    "settings": dataclasses.asdict(settings), **(extra or {})}

    rows, source = heldout_rows(task, settings.split, eval_file, settings.limit)
    examples = tokenize(model, rows, settings.max_len, name="heldout", template=settings.template,
                        mask_prompt=settings.mask_prompt)
    report["heldout"] = {"source": source, "n_examples": len(examples),
                         **{name: tokenized_loss(model, examples, params=p, lora=lo, max_len=settings.max_len)
                            for name, (p, lo) in columns.items()}}
    if task:
        task_rows = tasks.load_examples(task, settings.split)
        task_rows = task_rows[:settings.limit] if settings.limit else task_rows
        scores = {name: task_accuracy(model, task, task_rows, params=p, lora=lo, max_new_tokens=settings.max_new_tokens,
                                      batch_size=settings.batch_size, template=settings.template)
                  for name, (p, lo) in columns.items()}
        report["task"] = task
        report["task_scores"] = {name: {k: v for k, v in s.items() if k != "predictions"} for name, s in scores.items()}
        report["task_predictions"] = scores["finetuned" if compare else "model"]["predictions"]
    reports = pathlib.Path(reports_dir) if reports_dir else None
    if compare:
        cache = reports / BASE_CACHE if reports else None
        report["forgetting"] = forgetting(model, base_params, params, lora, settings, cache,
                                          model_path or str(model.folder))
    out = pathlib.Path(out) if out else (reports / f"eval_{task or 'heldout'}.json" if reports else None)
    if out is not None:
        write_report(out, report)
        report["path"] = str(out)
    if print_table:
        print(format_table(report))
    return report


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def table_rows(report: dict) -> tuple[list[str], list[tuple[str, ...]]]:
    """(column names, rows of (metric, value per column)) of a report."""
    columns = [c for c in ("base", "finetuned", "model") if c in report["heldout"]]
    rows = [(f"held-out {key}", *(_fmt(report["heldout"][c][key]) for c in columns)) for key in ("loss", "perplexity")]
    scores = report.get("task_scores")  # absent without a task
    for key in ("accuracy",) + tuple(k for k in scores[columns[0]] if k not in ("accuracy", "task", "n", "errors")) \
            if scores else ():
        rows.append((f"{report['task']} {key}", *(_fmt(scores[c].get(key)) for c in columns)))
    forgot = report.get("forgetting")
    if forgot:
        d, qa, div = forgot["drift"], forgot["general_qa"], forgot["diversity"]
        rows.append((f"drift loss ({d['n_prompts']} prompts)", _fmt(d["base_loss"]), _fmt(d["finetuned_loss"])))
        rows.append((f"general QA ({qa['n_base_correct']}/{qa['n_questions']} base-correct)", "1.0000" if
                     qa["n_base_correct"] else "-", _fmt(qa["finetuned_accuracy_on_base_correct"])))
        for key in ("distinct_1", "distinct_2"):
            rows.append((f"{key} (T=1, {div['base']['samples']} samples)", _fmt(div["base"][key]),
                         _fmt(div["finetuned"][key])))
    return columns, rows


def format_table(report: dict) -> str:
    columns, rows = table_rows(report)
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'':{width}s}" + "".join(f"{c:>12s}" for c in columns)]
    lines += [f"{r[0]:{width}s}" + "".join(f"{v:>12s}" for v in r[1:]) for r in rows]
    if report.get("path"):
        lines.append(f"\nreport: {report['path']}")
    return "\n".join(lines)


# ============================================================================================
# Command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxtune.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", help="a jaxtune.train run: its model, checkpoint and reports/ folder")
    parser.add_argument("--model", help="base model (alias, HF folder or hub id); default: the run's model.path")
    parser.add_argument("--adapter", help="PEFT adapter folder or jaxtune workdir evaluated over --model")
    parser.add_argument("--step", default="last", help="checkpoint of a workdir: last, best or a number")
    parser.add_argument("--task", help=f"bundled task ({', '.join(tasks.NAMES)}); default: the run's train.task")
    parser.add_argument("--template", help="how prompts and conversations are rendered: auto (the tokenizer's chat "
                        "template), none (raw text) or a Jinja template; default: the run's data.template, else auto")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--limit", type=int, default=0, help="task examples evaluated (0 = all)")
    parser.add_argument("--eval_file", help="JSONL for the held-out loss instead of the task split "
                        "(default without a task: the run's data.eval)")
    parser.add_argument("--out", help="report JSON (default WORKDIR/reports/eval_<task>.json)")
    parser.add_argument("--samples", type=int, default=16, help="generations for distinct-n")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="task answers")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_len", type=int, default=0,
                        help="tokens per example (0 = the run's data.max_len, else 512)")
    parser.add_argument("--mask_prompt", type=bool_flag, default=None,
                        help="true: the held-out loss counts the assistant tokens only; false: every token; "
                        "default: the run's data.mask_prompt, else true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--general_prompts", default=str(GENERAL_PROMPTS), help="JSONL of {\"prompt\": ...} for drift")
    parser.add_argument("--general_questions", default=str(GENERAL_QUESTIONS),
                        help="JSONL of {\"question\": ..., \"answers\": [...]} for general QA")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    if not (args.workdir or args.model or args.adapter):
        parser.error("give --workdir=DIR, or --model=PATH [--adapter=DIR]")
    if args.workdir and args.adapter:
        parser.error("--workdir already names the fine-tuned model: drop --adapter")
    if args.limit < 0 or args.samples < 1:
        parser.error("--limit must be >= 0 and --samples >= 1")
    if args.max_len < 0 or 0 < args.max_len < config_lib.MIN_MAX_LEN:
        parser.error(f"--max_len={args.max_len}: give at least {config_lib.MIN_MAX_LEN} tokens (or 0 for the default)")
    return args


def bool_flag(text: str) -> bool:
    """A true/false flag's value (config.parse_bool); argparse names the flag when it is neither."""
    value = config_lib.parse_bool(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give true or false")
    return value


def run_config(args: argparse.Namespace) -> ml_collections.ConfigDict | None:
    """The config of the jaxtune run evaluated (--workdir, or a run given as --adapter), whose train.task,
    data.eval, data.max_len, data.mask_prompt and data.template are the flags' defaults; None for a PEFT
    adapter folder or the base model alone."""
    folder = args.workdir or args.adapter
    if folder and (pathlib.Path(folder) / workdir_lib.RUN_CONFIG).is_file():
        return workdir_lib.read_run_config(folder)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    jaxtune.setup_logging()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run_command(args)
    except JaxtuneError as e:  # the user can fix it: one message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_command(args: argparse.Namespace) -> int:
    """The command line's work for parsed `args`: 0, or 2 after printing a usage error."""
    adapter = args.workdir or args.adapter
    run = run_config(args)
    if run is None:
        task, eval_file = args.task or None, args.eval_file
    else:
        task = args.task or config_lib.resolve_task(run.train.task, run.data.train) or None
        eval_file = args.eval_file or (None if task else config_lib.resolve_eval(run.data.eval, run.data.train) or None)
    if task is None and not eval_file:
        print("error: give --task=NAME or --eval_file=JSONL (the run has no task and no eval set)", file=sys.stderr)
        return 2
    settings = Settings(split=args.split, limit=args.limit, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, seed=args.seed, samples=args.samples,
                        general_prompts=args.general_prompts, general_questions=args.general_questions,
                        max_len=args.max_len or (int(run.data.max_len) if run is not None else Settings.max_len),
                        template=args.template or adapter_template(adapter),
                        mask_prompt=(args.mask_prompt if args.mask_prompt is not None
                                     else bool(run.data.mask_prompt) if run is not None else Settings.mask_prompt))
    reports = pathlib.Path(args.workdir) / "reports" if args.workdir else \
        (pathlib.Path(args.out).parent if args.out else None)
    if reports is None:
        print("error: without --workdir, give --out=FILE for the report", file=sys.stderr)
        return 2
    if task:
        tasks.get(task)
    loaded = load_with_info(args.model, adapter, args.dtype, args.step)
    evaluate_run(loaded["model"], loaded["params"], loaded["lora"], task=task, compare=adapter is not None,
                 eval_file=eval_file, settings=settings, reports_dir=reports, model_path=loaded["model_path"],
                 out=args.out, extra={"adapter": str(adapter) if adapter else None,
                                      "adapter_kind": loaded["adapter_kind"], "step": loaded["step"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
