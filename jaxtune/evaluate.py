"""Evaluation: held-out loss/perplexity and task accuracy by batched greedy generation.

`task_accuracy` is what `python -m jaxtune.train` runs before and after training on the bundled
task named by `config.train.task`.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence

from jaxtune import generate as generate_lib
from jaxtune import tasks
from jaxtune.api import LoadedModel
from jaxtune.models.llama import LoRAConfig


def prompt_messages(example: dict) -> list[dict]:
    """The conversation up to (not including) the final assistant turn: what the model must answer."""
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def task_accuracy(model: LoadedModel, task_name: str, examples: Sequence[dict], *, params: dict | None = None,
                  lora: LoRAConfig | None = None, max_new_tokens: int = 64, batch_size: int = 16) -> dict:
    """Greedy answers for `examples` scored by the task's scorer -> {accuracy, <metrics>, predictions}."""
    task = tasks.get(task_name)
    predictions: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = generate_lib.encode_prompts(model.tokenizer, [prompt_messages(e) for e in chunk], chat=True)
        ids = generate_lib.generate(model, prompts, max_new_tokens, params=params, lora=lora)
        predictions += [model.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    scores = tasks.score_all(task, predictions, list(examples))
    scores["predictions"] = [{"prediction": p, "answer": e.get("answer")} for p, e in zip(predictions, examples)]
    return scores


def loss_report(loss_sum: float, tokens: float) -> dict:
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "target_tokens": tokens}


def write_report(path: pathlib.Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True, default=float))
