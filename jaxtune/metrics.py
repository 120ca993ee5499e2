"""What a training run reports as it goes: WORKDIR/metrics.jsonl, TensorBoard events, the progress bar.

    metrics.jsonl   one JSON object per event: {"kind": "train" | "eval" | "task", "step": N,
                    "time": unix seconds, <name>: float, ...}; appended (a resumed run continues it)
    tb/             TensorBoard scalars "<kind>/<name>" at step N: one event file per writer,
                    events.out.tfevents.<unix seconds>.<host>.<pid>.<counter> (tensorboardX names
                    files by seconds and host only, and a second writer in the same second, a
                    quick resume or another process on the workdir, would truncate the first's
                    file; the pid and a per-process counter keep them apart, as TensorFlow does)

`MetricsLog` writes both (on process 0 only; elsewhere it is a no-op); `metrics_at` reads a record
back (a resumed run takes its "before training" figures from there); `ProgressBar` is the tqdm bar
with loss, lr, tokens/s and ETA; `TokenRate` counts trained tokens per second between log lines.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import sys
import time

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
_EVENT_FILES = itertools.count()  # event files opened by this process


def event_file_suffix() -> str:
    """What makes this writer's event file name unique after tensorboardX's <seconds>.<host>."""
    return f".{os.getpid()}.{next(_EVENT_FILES)}"


class MetricsLog:
    """metrics.jsonl + TensorBoard events in the workdir (process 0 only: `enabled`)."""

    def __init__(self, workdir: pathlib.Path, enabled: bool):
        self.enabled = enabled
        self.file = open(workdir / METRICS_FILE, "a") if enabled else None
        self.tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / TENSORBOARD_DIR), filename_suffix=event_file_suffix())

    def write(self, kind: str, step_num: int, values: dict):
        if not self.enabled:
            return
        record = {"kind": kind, "step": step_num, "time": round(time.time(), 3),
                  **{k: float(v) for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in values.items():
            self.tb.add_scalar(f"{kind}/{key}", float(value), step_num)
        self.tb.flush()

    def close(self):
        if self.enabled:
            self.file.close()
            self.tb.close()


def metrics_at(workdir: pathlib.Path, kind: str, step_num: int) -> dict | None:
    """The last `kind` record of `step_num` in WORKDIR/metrics.jsonl (None if absent)."""
    path = workdir / METRICS_FILE
    found = None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if record.get("kind") == kind and record.get("step") == step_num:
                found = record
    return found


class TokenRate:
    """Trained (non-pad) tokens per second since the last `reset`."""

    def __init__(self):
        self.reset()

    def add(self, tokens: float):
        self.tokens += tokens

    def per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def reset(self):
        self.tokens, self.start = 0.0, time.perf_counter()


class ProgressBar:
    """tqdm bar with loss, lr, tokens/s and ETA (a no-op when disabled)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
        self.position = start

    def update(self, step_num: int, values: dict):
        """Advance to `step_num`; `values` holds the train record's loss, lr and tokens_per_s."""
        if self.bar is not None:
            self.bar.update(step_num - self.position)
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                                 tok_s=f"{values['tokens_per_s']:.0f}", refresh=False)
        self.position = step_num

    def close(self):
        if self.bar is not None:
            self.bar.close()
