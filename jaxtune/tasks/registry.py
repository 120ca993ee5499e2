"""Task registry, bundled data files and aggregate scoring.

Owns `NAMES`, `get(name)`, the shipped JSONL splits (`data_file`, `load_examples`, and
`write_split_files`, which generates them: one example per line, UTF-8, the same bytes for the
same seed) and `score_all`, which runs a task's scorer over a list of predictions and
averages every boolean / numeric metric.
"""

from __future__ import annotations

import json
import pathlib
from types import ModuleType

from jaxtune.errors import JaxtuneError
from jaxtune.tasks import arithmetic, common, sql, viggo

_TASKS = {module.NAME: module for module in (viggo, sql, arithmetic)}
NAMES = tuple(_TASKS)

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
DEFAULT_SIZES = {"train": 2000, "validation": 200, "test": 200}
DEFAULT_SEED = 0


class UnknownTaskError(JaxtuneError, KeyError):
    """A task name that is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # the message as written (KeyError's own str() quotes it)
        return str(self.args[0]) if self.args else ""


def get(name: str) -> ModuleType:
    """The task module (NAME, DESCRIPTION, generate, score) registered under `name`."""
    try:
        return _TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(NAMES)}") from None


def data_file(name: str, split: str) -> pathlib.Path:
    """Path of the bundled `<task>/<split>.jsonl` shipped with the package."""
    get(name)
    return DATA_DIR / name / f"{common.check_split(split)}.jsonl"


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_examples(name: str, split: str) -> list[dict]:
    """The bundled examples of one task split."""
    return read_jsonl(data_file(name, split))


def write_split_files(task: str, out_dir: str | pathlib.Path, sizes: dict | None = None,
                      seed: int = DEFAULT_SEED) -> dict[str, pathlib.Path]:
    """Generate each split of `task` and write `out_dir/<split>.jsonl`; returns split -> path."""
    module = get(task)
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in sizes.items():
        path = out_dir / f"{split}.jsonl"
        lines = [json.dumps(ex, ensure_ascii=False) for ex in module.generate(split, n, seed)]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        paths[split] = path
    return paths


def _metric_values(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows
            if isinstance(r.get(key), (bool, int, float)) and r.get(key) is not None]


def score_all(task: str | ModuleType, predictions: list[str], examples: list[dict]) -> dict:
    """Score every prediction; return n, accuracy (mean `correct`), the mean of every other
    boolean / numeric metric over the examples that report it, and the number of errors."""
    module = get(task) if isinstance(task, str) else task
    if len(predictions) != len(examples):
        raise common.TaskError(f"{len(predictions)} predictions for {len(examples)} examples of task "
                               f"{module.NAME}: pass one prediction per example, in the examples' order")
    rows = [module.score(p, ex) for p, ex in zip(predictions, examples)]
    out = {"task": module.NAME, "n": len(rows), "accuracy": common.mean(r["correct"] for r in rows)}
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys and k != "correct"]
    for key in keys:
        values = _metric_values(rows, key)
        if values:
            out[key] = common.mean(values)
    out["errors"] = sum(1 for r in rows if r.get("error"))
    return out
