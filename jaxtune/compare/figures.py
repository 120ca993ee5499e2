"""From the jobs' outputs to one row of figures per arm (pure: dicts in, dicts out).

A row holds what the table, the plots and the verdict read: method, rank, lr, task accuracy per
task and their mean (`task_score`, over all scored examples), held-out loss (metrics.jsonl's eval at
the last step), forgetting (drift: loss increase on the base model's own answers to general prompts;
QA kept: share of the general questions the base answered right that the arm still answers right;
distinct-2), cost (tokens/s, peak RSS of the arm's whole training process and, where the platform
reports one, its busiest device's peak; wall time, checkpoint bytes, trainable parameters) and the
weight change's rank for 90% energy (median over matrix types).
`learning(row)` is what "learned more" means: mean task accuracy, or minus the held-out loss when
no task is scored or no row answered any task example right (`learning_basis`). `pareto_front(rows)` marks the arms no other arm beats on learning and forgetting.
"""

from __future__ import annotations

import statistics

# What a row's peak_rss_bytes is (jaxtune.compare.worker.train_arm; report.NOTES says what it holds):
# the table, the cost plot and the verdict name it with these words.
PEAK_RSS_LABEL = "training process peak RSS"
DEVICE_PEAK_LABEL = "training process device peak"


def median_rate(rates: list[float]) -> float | None:
    """Median tokens/s of the logged windows, the first (which holds the compilation) left out."""
    steady = rates[1:] if len(rates) > 1 else rates
    return statistics.median(steady) if steady else None


def method_of(spec: dict) -> str:
    return f"LoRA r{spec['config']['lora']['rank']}" if spec["mode"] == "lora" else "full"


def task_part(task_results: dict) -> dict:
    """{task_accuracy: {task: acc}, task_score: mean over all examples, task_n: examples scored,
    task_metrics: {task: every numeric metric of the task's scorer}}."""
    n = sum(int(s["n"]) for s in task_results.values())
    score = sum(s["accuracy"] * int(s["n"]) for s in task_results.values()) / n if n else None
    metrics = {t: {k: v for k, v in s.items() if isinstance(v, (int, float)) and k not in ("n", "errors")}
               for t, s in task_results.items()}
    return {"task_accuracy": {t: s["accuracy"] for t, s in task_results.items()}, "task_score": score, "task_n": n,
            "task_metrics": metrics}


def arm_row(name: str, arm: dict) -> dict:
    spec, trained, result = arm["spec"], arm["train"], arm["result"]
    row = {"name": name, "mode": spec["mode"], "method": method_of(spec),
           "rank": spec["config"]["lora"]["rank"] if spec["mode"] == "lora" else None,
           "lr": spec["config"]["optim"]["lr"], "status": trained["status"], "message": trained.get("message"),
           "wall_s": trained["wall_s"], "peak_rss_bytes": trained["peak_rss_bytes"],
           "device_peak_bytes": trained.get("device_peak_bytes"), "attempts": trained["attempts"]}
    if result is None:
        return row
    curves = result["curves"]
    spectra = result.get("spectra") or {}
    row.update(task_part(result["tasks"]))
    row.update({
        "heldout_loss": curves["eval_loss"][-1] if curves["eval_loss"] else None,
        "train_loss": curves["train_loss"][-1] if curves["train_loss"] else None,
        "drift": result["drift"]["delta"], "qa_kept": result["general_qa"]["finetuned_accuracy_on_base_correct"],
        "qa_n": result["general_qa"]["n_base_correct"], "distinct_2": result["diversity"]["distinct_2"],
        "tokens_per_s": median_rate(curves["tokens_per_s"]), "checkpoint_bytes": result["checkpoint_bytes"],
        "trainable_params": result["trainable_params"],
        "rank90": statistics.median(s["rank90_median"] for s in spectra.values()) if spectra else None,
        "full_rank": statistics.median(s["full_rank"] for s in spectra.values()) if spectra else None,
    })
    return row


def base_row(base: dict, arms: dict) -> dict:
    """The untrained model as a row (held-out loss: any arm's eval at step 0, the same eval set)."""
    losses = [a["result"]["curves"] for a in arms.values() if a["result"]]
    before = [c["eval_loss"][0] for c in losses if c["eval_steps"] and c["eval_steps"][0] == 0]
    return {"name": "base", "mode": "base", "method": "base model", "rank": None, "lr": None, "status": "base",
            **task_part(base["tasks"]), "heldout_loss": before[0] if before else None, "drift": 0.0,
            "qa_kept": 1.0 if base["general_qa"]["n_base_correct"] else None,
            "qa_n": base["general_qa"]["n_base_correct"], "distinct_2": base["diversity"]["distinct_2"]}


def learning_basis(rows: list[dict]) -> str:
    """'task' (mean task accuracy) when a task is scored and some row answered some example right;
    else 'heldout' (minus the held-out loss): all-zero accuracies cannot tell the arms apart."""
    scores = [r.get("task_score") for r in rows]
    return "task" if any(s for s in scores if s is not None) else "heldout"


def set_learning(rows: list[dict]) -> None:
    """row['learning'] (higher = learned more) and row['learning_by'] for every row, on one basis."""
    basis = learning_basis(rows)
    for r in rows:
        r["learning_by"] = basis
        loss = r.get("heldout_loss")
        r["learning"] = r.get("task_score") if basis == "task" else (-loss if loss is not None else None)


def learning(row: dict) -> float | None:
    return row.get("learning")


def evaluated(rows: list[dict]) -> list[dict]:
    """Finished arms with a learning figure."""
    return [r for r in rows if r["status"] == "finished" and learning(r) is not None]


def pareto_front(rows: list[dict]) -> list[str]:
    """Names of the evaluated arms with a drift figure that no other such arm beats on both learning
    (higher) and drift (lower). Drift is missing when the base model gave no answer to any general prompt."""
    candidates = [r for r in evaluated(rows) if r.get("drift") is not None]

    def dominated(r):
        return any(learning(o) >= learning(r) and o["drift"] <= r["drift"]
                   and (learning(o) > learning(r) or o["drift"] < r["drift"]) for o in candidates)

    return [r["name"] for r in candidates if not dominated(r)]


def build(runs: dict) -> dict:
    """{base, rows, pareto}: the figures of a whole compare."""
    rows = [arm_row(name, arm) for name, arm in runs["arms"].items()]
    base = base_row(runs["base"], runs["arms"])
    set_learning([base] + rows)
    return {"base": base, "rows": rows, "pareto": pareto_front(rows)}
