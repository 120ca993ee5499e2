"""Shared plumbing of the bundled tasks: seeded RNGs, the hash split partition, chat rows.

Owns the rules every task generator follows:

* one RNG per (task, split, seed), seeded from a string, so a generator is a pure function of
  its arguments (stable across processes and Python versions: no `hash()`);
* disjoint splits by construction: every candidate example has a *key* (the reference answer, or
  the question) and a stable SHA-256 bucket of that key decides which split may hold it
  (80 % train, 10 % validation, 10 % test). A key that belongs to `test` can never be drawn
  for `train`, whatever the seeds;
* the chat `messages` row format shared with `jaxtune.data`;
* `TaskError`, the error of a task request (split, size) or a task row jaxtune cannot use.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable

from jaxtune.errors import JaxtuneError

SPLITS = ("train", "validation", "test")

# Percent buckets of the key hash owned by each split.
_BUCKETS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}

# Rejection sampling gives up after this many draws per requested example.
_MAX_DRAWS_PER_EXAMPLE = 200


class TaskError(JaxtuneError, ValueError):
    """A task request (split, number of examples) or a task row that cannot be used; the message
    names what is wrong and the fix."""


def check_split(split: str) -> str:
    if split not in _BUCKETS:
        raise TaskError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return split


def stable_int(text: str, digits: int = 12) -> int:
    """A process-independent integer hash of `text` (first `digits` hex digits of SHA-256)."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:digits], 16)


def split_of(task: str, key: str) -> str:
    """The split a candidate example with this key belongs to."""
    bucket = stable_int(f"{task}\x00{key}") % 100
    for split, (lo, hi) in _BUCKETS.items():
        if lo <= bucket < hi:
            return split
    raise AssertionError(bucket)


def rng_for(task: str, split: str, seed: int) -> random.Random:
    """The generator's RNG: a pure function of (task, split, seed)."""
    return random.Random(f"{task}/{check_split(split)}/{int(seed)}")


def chat(system: str, user: str, assistant: str) -> list[dict]:
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]


def generate_split(task: str, split: str, n: int, seed: int,
                   sample: Callable[[random.Random], dict],
                   key: Callable[[dict], str]) -> list[dict]:
    """Draw `n` distinct examples whose key falls in `split`'s hash bucket.

    `sample(rng)` returns one candidate example; `key(example)` its identity. Candidates of other
    splits and repeated keys are skipped. Each returned example gets `id` and `task` fields.
    """
    check_split(split)
    if n < 0:
        raise TaskError(f"{task}: asked for {n} {split} examples; the number of examples must be >= 0")
    rng = rng_for(task, split, seed)
    seen: set[str] = set()
    out: list[dict] = []
    draws = 0
    while len(out) < n:
        draws += 1
        if draws > _MAX_DRAWS_PER_EXAMPLE * max(n, 1):
            raise TaskError(f"{task}: asked for {n} distinct {split} examples, but {draws - 1:,} draws found only "
                            f"{len(out)}: the generator's {split} split holds about that many; ask for at most "
                            f"{len(out)}, or use the public dataset behind the task (jaxtune.tasks.load_public)")
        example = sample(rng)
        k = key(example)
        if k in seen or split_of(task, k) != split:
            continue
        seen.add(k)
        out.append({"id": f"{task}-{split}-{seed}-{len(out)}", "task": task, **example})
    return out


def article(word: str) -> str:
    """'a' or 'an' for the word that follows."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def join_and(items: list[str], rng: random.Random | None = None) -> str:
    """'x', 'x and y', 'x, y and z' (Oxford comma at random when an RNG is given)."""
    if len(items) <= 1:
        return "".join(items)
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    comma = "," if rng is not None and rng.random() < 0.5 else ""
    return ", ".join(items[:-1]) + f"{comma} and {items[-1]}"


def mean(values) -> float:
    values = list(values)
    return float(sum(values)) / len(values) if values else 0.0
