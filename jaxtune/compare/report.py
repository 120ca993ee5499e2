"""DIR/report.json (every figure), DIR/report.md and a self-contained DIR/report.html, from the runs.

`assemble(config, tasks, runs)` -> the report dict: the figures per arm (figures.build), the verdict,
each arm's loss curves and weight-change spectra. `table(report)` is the one table both report.md
and report.html show (every number in it is a figure of report.json, formatted). `write(report, dir)`
writes the plots (when matplotlib is there), then the three files.
"""

from __future__ import annotations

import base64
import html
import json
import os
import pathlib

from jaxtune.compare import figures, plots, verdict

PLOTS_DIR = "plots"


def assemble(config_dict: dict, task_names: list[str], runs: dict) -> dict:
    report = {"config": config_dict, "tasks": task_names, **figures.build(runs)}
    report["verdict"] = verdict.verdict(report["rows"])
    done = {name: arm["result"] for name, arm in runs["arms"].items() if arm["result"]}
    report["curves"] = {name: arm["result"]["curves"] if arm["result"] else arm["curves"]
                        for name, arm in runs["arms"].items() if arm["result"] or arm.get("curves")}
    report["spectra"] = {name: result.get("spectra") or {} for name, result in done.items()}
    report["load_average_at_report"] = list(os.getloadavg())
    return report


def _num(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


def table(report: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows of cells): the base model, then every arm ('*' after a name: on the Pareto front)."""
    tasks = report["tasks"]
    device_peak = any(r.get("device_peak_bytes") for r in report["rows"])  # GPU / TPU runs
    header = (["arm", "method", "lr", "status"] + [f"{t} acc" for t in tasks]
              + ["held-out loss", "drift (nats)", "general QA kept", "distinct-2", "tokens/s",
                 f"{figures.PEAK_RSS_LABEL} (GB)"] + ([f"{figures.DEVICE_PEAK_LABEL} (GB)"] if device_peak else [])
              + ["train wall (s)", "checkpoint (MB)", "trained params (M)", "dW rank90 (median)"])
    rows = []
    for r in [report["base"]] + report["rows"]:
        device = [_num(r.get("device_peak_bytes"), ".2f", 1e9)] if device_peak else []
        name = r["name"] + (" *" if r["name"] in report["pareto"] else "")
        status = r["status"] + (f" ({r['attempts']} attempts)" if r.get("attempts", 1) > 1 else "")
        rows.append([name, r["method"], "-" if r["lr"] is None else f"{r['lr']:.0e}", status]
                    + [_num((r.get("task_accuracy") or {}).get(t), ".3f") for t in tasks]
                    + [_num(r.get("heldout_loss"), ".3f"), _num(r.get("drift"), "+.3f"), _num(r.get("qa_kept"), ".2f"),
                       _num(r.get("distinct_2"), ".3f"), _num(r.get("tokens_per_s"), ".0f"),
                       _num(r.get("peak_rss_bytes"), ".2f", 1e9)] + device + [_num(r.get("wall_s"), ".0f"),
                       _num(r.get("checkpoint_bytes"), ".1f", 1e6), _num(r.get("trainable_params"), ".2f", 1e6),
                       _num(r.get("rank90"), ".0f")])
    return header, rows


def task_tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per scored task: (task, header, rows) with every numeric metric of its scorer, base and arms."""
    rows = [r for r in [report["base"]] + report["rows"] if r.get("task_metrics")]
    tables = []
    for task in report["tasks"]:
        names = list(dict.fromkeys(k for r in rows for k in r["task_metrics"].get(task, {})))
        tables.append((task, ["arm"] + names,
                       [[r["name"]] + [_num(r["task_metrics"][task].get(k), ".3f") for k in names] for r in rows]))
    return tables


NOTES = ("`*` marks the Pareto front (no other arm learned more with less drift). drift: increase of the loss on "
         "the base model's own greedy answers to general prompts; general QA kept: share of the general "
         "questions the base model answered right that the arm still answers right; tokens/s: median over the "
         "logged windows after the first; training process peak RSS: the peak resident memory (Linux VmHWM) of "
         "the process that trained the arm (python -m jaxtune.compare.worker train; of a resumed arm, the attempt "
         "that finished), over all of it: Python and "
         "JAX themselves, the model load, the data, compiling the train and eval steps, the held-out evaluations, "
         "the training steps and the checkpoint saves (not the evaluation, a process of its own); the train step "
         "alone is what jaxtune.plan's start-up plan (in the arm's log) estimates; device peak (GPU / TPU only): "
         "the busiest device's peak allocation in that process; dW rank90: rank holding 90% of the weight "
         "change's energy, median over matrix types.")


def budget(report: dict) -> str:
    """What every arm trained on (the same for all: arms cannot change data.* or train.*)."""
    t, d = report["config"]["train"], report["config"]["data"]
    length = f"{t['epochs']} epochs" if t["epochs"] > 0 else f"{t['steps']} steps"
    return (f"Every arm trains {length} of {t['batch_size']} rows of at most {d['max_len']} tokens from "
            f"{d['train']}, the same batches in the same order (seed {t['seed']}).")


def markdown(report: dict) -> str:
    header, rows = table(report)
    lines = ["# LoRA vs full fine-tuning", "", "## Verdict", ""]
    lines += [f"- {s}" for s in report["verdict"]["sentences"]]
    lines += ["", "## Arms", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", budget(report) + " " + NOTES, ""]
    for task, task_header, task_rows in task_tables(report):
        lines += [f"### {task}: every metric of its scorer", "", "| " + " | ".join(task_header) + " |",
                  "|" + " --- |" * len(task_header)]
        lines += ["| " + " | ".join(row) + " |" for row in task_rows] + [""]
    if report.get("plots_skipped"):
        lines += [f"Plots skipped: {report['plots_skipped']}.", ""]
    for name, file in report.get("plots", {}).items():
        lines += [f"## {name.replace('_', ' ')}", "", f"![{name}]({file})", ""]
    return "\n".join(lines)


def page(report: dict, folder: pathlib.Path) -> str:
    """report.html: the same content, every plot embedded as a base64 PNG (no other file needed)."""
    header, rows = table(report)
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>LoRA vs full fine-tuning</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style></head><body>",
             "<h1>LoRA vs full fine-tuning</h1><h2>Verdict</h2><ul>"]
    parts += [f"<li>{esc(s)}</li>" for s in report["verdict"]["sentences"]]
    parts += ["</ul><h2>Arms</h2><table id='arms'><thead><tr>"] + [f"<th>{esc(h)}</th>" for h in header]
    parts += ["</tr></thead><tbody>"]
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
    parts += ["</tbody></table>", f"<p>{esc(budget(report) + ' ' + NOTES.replace('`', ''))}</p>"]
    for task, task_header, task_rows in task_tables(report):
        parts.append(f"<h3>{esc(task)}: every metric of its scorer</h3><table class='task'><tr>"
                     + "".join(f"<th>{esc(h)}</th>" for h in task_header) + "</tr>"
                     + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in task_rows)
                     + "</table>")
    if report.get("plots_skipped"):
        parts.append(f"<p>Plots skipped: {esc(report['plots_skipped'])}.</p>")
    for name, file in report.get("plots", {}).items():
        data = base64.b64encode((folder / file).read_bytes()).decode()
        parts.append(f"<h2>{esc(name.replace('_', ' '))}</h2><img alt='{esc(name)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write(report: dict, folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Plots (if matplotlib is installed), report.json, report.md, report.html -> their paths."""
    report["plots"], report["plots_skipped"] = plots.write_plots(report, folder / PLOTS_DIR)
    paths = {name: folder / f"report.{name}" for name in ("json", "md", "html")}
    paths["json"].write_text(json.dumps(report, indent=2, sort_keys=True, default=float))
    paths["md"].write_text(markdown(report))
    paths["html"].write_text(page(report, folder))
    return paths
