"""The verdict: a few sentences generated from the figures by explicit rules, never more than they say.

Rules (each sentence's numbers are also returned in `figures`, so report.json holds them):
  * The best arm of each method is the one that learned most (figures.learning: task accuracy, or
    held-out loss when no task is scored or every accuracy is 0); ties go to less drift.
  * Accuracies are compared against 2 standard errors of their difference (binomial, over the
    examples scored): within it, the sentence says "the same within noise" and gives no ratio.
    Without a task, held-out losses closer than LOSS_NOISE nats are a tie.
  * Drift (nats of loss increase on the base model's own answers) closer than LOSS_NOISE is a tie;
    a ratio is given only when full's drift exceeds LOSS_NOISE. General-QA retention uses the
    binomial rule over the questions the base model answered.
  * Cost ratios (peak memory, checkpoint, trainable parameters, tokens/s) are stated as measured.
  * Learning-rate sensitivity: the span (max - min) of each method's learning figure over its
    learning rates; called different only when the spans differ by more than the noise above.
  * Weight change: the full arm's median rank for 90% of dW's energy next to LoRA's rank.
"""

from __future__ import annotations

import math

from jaxtune.compare.figures import PEAK_RSS_LABEL, evaluated, learning

LOSS_NOISE = 0.01  # nats


def two_se(p: float, q: float, n_p: int, n_q: int) -> float:
    """2 standard errors of the difference of two proportions (0 when either count is 0)."""
    if not n_p or not n_q:
        return 0.0
    return 2 * math.sqrt(p * (1 - p) / n_p + q * (1 - q) / n_q)


def best(rows: list[dict]) -> dict | None:
    return max(rows, key=lambda r: (learning(r), -(r["drift"] if r.get("drift") is not None else 0.0)), default=None)


def fmt_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def learning_sentence(lo: dict, fu: dict, figures: dict) -> str:
    who = f"The best LoRA arm ({lo['name']}, lr {fmt_lr(lo['lr'])}) and the best full arm ({fu['name']}, lr {fmt_lr(fu['lr'])})"
    if lo["learning_by"] == "task":
        a, b = lo["task_score"], fu["task_score"]
        noise = two_se(a, b, lo["task_n"], fu["task_n"])
        figures.update(lora_task_score=a, full_task_score=b, task_noise_2se=noise, task_n=lo["task_n"])
        if abs(a - b) <= noise:
            return (f"{who} reach the same task accuracy within noise: {a:.3f} vs {b:.3f} (the difference is "
                    f"under 2 standard errors, {noise:.3f}, over {lo['task_n']} examples).")
        if b > 0:
            figures["task_ratio"] = a / b
            return f"{who}: LoRA reaches {100 * a / b:.0f}% of full's task accuracy ({a:.3f} vs {b:.3f})."
        return f"{who}: task accuracy {a:.3f} vs {b:.3f}."
    a, b = lo["heldout_loss"], fu["heldout_loss"]
    figures.update(lora_heldout_loss=a, full_heldout_loss=b, loss_noise=LOSS_NOISE)
    if abs(a - b) < LOSS_NOISE:
        return f"{who} reach the same held-out loss within {LOSS_NOISE} nats: {a:.3f} vs {b:.3f}."
    return f"{who}: held-out loss {a:.3f} vs {b:.3f} ({'LoRA' if a < b else 'full'} lower)."


def forgetting_sentence(lo: dict, fu: dict, figures: dict) -> str:
    a, b = lo.get("drift"), fu.get("drift")
    if a is None or b is None:
        text = "Drift from the base model was not measured (the base model answered no general prompt)"
    elif abs(a - b) < LOSS_NOISE:
        text = f"They drift the same from the base model within {LOSS_NOISE} nats ({a:+.3f} vs {b:+.3f})"
    elif b > LOSS_NOISE and a >= 0:
        figures["drift_ratio"] = a / b
        text = f"LoRA's drift from the base model is {a / b:.2f}x full's ({a:+.3f} vs {b:+.3f} nats)"
    else:
        text = f"Drift from the base model: LoRA {a:+.3f}, full {b:+.3f} nats"
    if a is not None and b is not None:
        figures.update(lora_drift=a, full_drift=b)
    qa_a, qa_b = lo.get("qa_kept"), fu.get("qa_kept")
    if qa_a is None or qa_b is None:
        return text + "."
    noise = two_se(qa_a, qa_b, lo["qa_n"], fu["qa_n"])
    figures.update(lora_qa_kept=qa_a, full_qa_kept=qa_b, qa_noise_2se=noise, qa_n=lo["qa_n"])
    same = "the same within noise" if abs(qa_a - qa_b) <= noise else "different"
    return (text + f"; they keep {qa_a:.2f} vs {qa_b:.2f} of the {lo['qa_n']} general questions the base model "
            f"answered ({same}: 2 standard errors = {noise:.2f}).")


def cost_sentence(lo: dict, fu: dict, figures: dict) -> str:
    parts = []
    if lo.get("peak_rss_bytes") and fu.get("peak_rss_bytes"):
        figures["memory_ratio"] = lo["peak_rss_bytes"] / fu["peak_rss_bytes"]
        parts.append(f"{figures['memory_ratio']:.2f}x full's {PEAK_RSS_LABEL} ({lo['peak_rss_bytes'] / 1e9:.2f} vs "
                     f"{fu['peak_rss_bytes'] / 1e9:.2f} GB)")
    if lo.get("checkpoint_bytes") and fu.get("checkpoint_bytes"):
        figures["checkpoint_ratio"] = lo["checkpoint_bytes"] / fu["checkpoint_bytes"]
        parts.append(f"a {lo['checkpoint_bytes'] / 1e6:.1f} MB vs {fu['checkpoint_bytes'] / 1e6:.1f} MB checkpoint")
    if lo.get("trainable_params") and fu.get("trainable_params"):
        parts.append(f"{lo['trainable_params'] / 1e6:.2f}M vs {fu['trainable_params'] / 1e6:.2f}M trained parameters")
    if lo.get("tokens_per_s") and fu.get("tokens_per_s"):
        figures["speed_ratio"] = lo["tokens_per_s"] / fu["tokens_per_s"]
        parts.append(f"{figures['speed_ratio']:.2f}x full's tokens/s")
    return ("LoRA's cost: " + ", ".join(parts) + ".") if parts else ""


def sensitivity_sentence(lora_rows: list[dict], full_rows: list[dict], lo: dict, fu: dict, figures: dict) -> str:
    if len(lora_rows) < 2 or len(full_rows) < 2:
        return ""
    spans = {}
    for key, rows in (("lora", lora_rows), ("full", full_rows)):
        values = [learning(r) for r in rows]
        spans[key] = max(values) - min(values)
        figures[f"{key}_learning_min"], figures[f"{key}_learning_max"] = min(values), max(values)
    figures.update(lora_lr_span=spans["lora"], full_lr_span=spans["full"], best_lr_ratio=lo["lr"] / fu["lr"])
    what = "task accuracy" if lo["learning_by"] == "task" else "minus held-out loss"
    noise = figures.get("task_noise_2se", LOSS_NOISE)
    if abs(spans["lora"] - spans["full"]) <= noise:
        judged = "similar sensitivity within noise"
    else:
        judged = f"{'LoRA' if spans['lora'] > spans['full'] else 'full'} is more sensitive to the learning rate"
    return (f"Across its learning rates LoRA's {what} spans {figures['lora_learning_min']:.3f} to "
            f"{figures['lora_learning_max']:.3f}, full's {figures['full_learning_min']:.3f} to "
            f"{figures['full_learning_max']:.3f} ({judged}); LoRA's best lr is {lo['lr'] / fu['lr']:.0f}x full's.")


def rank_sentence(lo: dict, fu: dict, figures: dict) -> str:
    if fu.get("rank90") is None:
        return ""
    figures.update(full_rank90=fu["rank90"], full_rank=fu["full_rank"], lora_rank=lo["rank"])
    text = (f"Full fine-tuning's weight change needs a median rank of {fu['rank90']:.0f} (of {fu['full_rank']:.0f}) "
            f"per matrix to hold 90% of its energy; LoRA's is at most its rank {lo['rank']}")
    if lo.get("rank90") is not None:
        figures["lora_rank90"] = lo["rank90"]
        text += f" (measured: {lo['rank90']:.0f})"
    return text + "."


def verdict(rows: list[dict]) -> dict:
    """{sentences: [...], figures: {...}} for the arms' rows (see the module docstring for the rules)."""
    figures: dict = {}
    sentences = [f"{r['name']} {r['status']}: {(r.get('message') or '').split('.')[0].split(';')[0]}." for r in rows
                 if r["status"] in ("diverged", "failed")]
    waiting = [r["name"] for r in rows if r["status"] == "pending"]
    if waiting:
        sentences.append(f"Not done yet: {', '.join(waiting)} (this report covers the arms done so far).")
    done = evaluated(rows)
    lora_rows, full_rows = [r for r in done if r["mode"] == "lora"], [r for r in done if r["mode"] == "full"]
    if not lora_rows or not full_rows:
        have = "only LoRA arms have" if lora_rows else "only full arms have" if full_rows else "no arm has"
        return {"sentences": sentences + [f"So far {have} learning figures: there is no LoRA vs full comparison "
                                          f"to state."], "figures": figures}
    lo, fu = best(lora_rows), best(full_rows)
    figures.update(best_lora=lo["name"], best_full=fu["name"])
    if lo["learning_by"] == "heldout" and lo.get("task_n"):
        sentences.append(f"No arm answered any scored task example exactly right (accuracy 0 on all "
                         f"{lo['task_n']} per arm): at this budget accuracy cannot tell the arms apart, so "
                         f"learning is compared by held-out loss.")
    sentences += [learning_sentence(lo, fu, figures), forgetting_sentence(lo, fu, figures),
                  cost_sentence(lo, fu, figures), sensitivity_sentence(lora_rows, full_rows, lo, fu, figures),
                  rank_sentence(lo, fu, figures)]
    return {"sentences": [s for s in sentences if s], "figures": figures}
