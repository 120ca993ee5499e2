"""Loaders that map the real public datasets into the bundled tasks' example format.

Owns the row mappers and `load_public`:

* `from_viggo_row`   GEM/viggo                 (`meaning_representation`, `target`, `gem_id`, ...)
* `from_gsm8k_row`   openai/gsm8k, config main (`question`, `answer` with `<<a*b=c>>` calculator
                                                annotations and a final `#### n` line)
* `from_sql_create_context_row`  b-mc2/sql-create-context (`question`, `context`, `answer`)

Mapped rows carry the same `messages` (with the task's DESCRIPTION as system prompt), `answer`
and task fields as generated ones, so the task scorers and `jaxtune.data` take either.
`load_public(name, split)` downloads through `datasets.load_dataset`. Splits a dataset does not
ship are carved deterministically by the same key hash as the generators use: gsm8k's
validation is 10 % of its train split; sql-create-context (train only) is cut 80/10/10.
"""

from __future__ import annotations

import re
from typing import Callable

from jaxtune.errors import JaxtuneError, MissingPackageError
from jaxtune.tasks import arithmetic, common, sql, viggo
from jaxtune.tasks.registry import UnknownTaskError

_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")


class PublicDatasetError(JaxtuneError, RuntimeError):
    """A public dataset could not be loaded (no network or cache); the message says what works offline."""


def from_viggo_row(row: dict) -> dict:
    """A GEM/viggo row -> a `viggo` example (sentence -> MR)."""
    mr = str(row["meaning_representation"]).strip()
    sentence = str(row["target"]).strip()
    try:
        act, _ = viggo.parse_mr(mr)
    except viggo.MRError as err:
        raise common.TaskError(f"GEM/viggo row {row.get('gem_id', '?')}: bad meaning representation {mr!r}: {err}; "
                               f"fix or drop that row (a meaning representation is act(slot[value], ...))") from err
    return {"id": str(row.get("gem_id", "")), "task": viggo.NAME,
            "messages": common.chat(viggo.DESCRIPTION, sentence, mr), "answer": mr, "act": act}


def gsm8k_final_answer(solution: str) -> str:
    """The number after the last `####` of a GSM8K solution, without thousands separators."""
    if "####" not in solution:
        raise common.TaskError(f"GSM8K solution without a '####' line (it ends {solution[-80:]!r}): a gsm8k answer "
                               f"ends with '#### <number>'; fix or drop that row")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def from_gsm8k_row(row: dict, keep_calculator: bool = False) -> dict:
    """A gsm8k row -> an `arithmetic` example. Calculator annotations `<<48/2=24>>` are removed
    unless `keep_calculator`; the final line is normalised to `#### <number>`."""
    solution = str(row["answer"]).strip()
    final = gsm8k_final_answer(solution)
    body = solution.rsplit("####", 1)[0].rstrip()
    if not keep_calculator:
        body = _CALCULATOR_RE.sub("", body)
    target = f"{body}\n#### {final}" if body else f"#### {final}"
    return {"id": "", "task": arithmetic.NAME,
            "messages": common.chat(arithmetic.DESCRIPTION, str(row["question"]).strip(), target),
            "answer": final}


def from_sql_create_context_row(row: dict) -> dict:
    """A b-mc2/sql-create-context row -> a `sql` example (scored by execution on rows
    generated from the context; the database seed is a hash of context and query)."""
    context, question = str(row["context"]).strip(), str(row["question"]).strip()
    query = str(row["answer"]).strip()
    return {"id": "", "task": sql.NAME,
            "messages": common.chat(sql.DESCRIPTION, sql.user_prompt(context, question), query),
            "answer": query, "context": context, "question": question}


# task name -> (hub id, config, mapper, {our split: (hub split, buckets kept or None)})
PUBLIC: dict[str, tuple[str, str | None, Callable[[dict], dict], dict]] = {
    viggo.NAME: ("GEM/viggo", None, from_viggo_row, {
        "train": ("train", None), "validation": ("validation", None), "test": ("test", None)}),
    arithmetic.NAME: ("openai/gsm8k", "main", from_gsm8k_row, {
        "train": ("train", {"train", "test"}), "validation": ("train", {"validation"}),
        "test": ("test", None)}),
    sql.NAME: ("b-mc2/sql-create-context", None, from_sql_create_context_row, {
        "train": ("train", {"train"}), "validation": ("train", {"validation"}),
        "test": ("train", {"test"})}),
}


def _default_loader():
    try:
        import datasets
    except ImportError as err:
        raise MissingPackageError("datasets", "jaxtune.tasks.load_public (the public datasets behind the tasks)",
                                  cause=err) from err
    return datasets.load_dataset


def load_public(name: str, split: str, loader: Callable | None = None) -> list[dict]:
    """The public dataset behind task `name`, mapped to task examples.

    `loader` defaults to `datasets.load_dataset` and is called as
    `loader(hub_id[, config], split=hub_split)`; any iterable of row dicts will do.
    """
    if name not in PUBLIC:
        raise UnknownTaskError(f"no public dataset for task {name!r}; tasks with one: {', '.join(sorted(PUBLIC))}")
    common.check_split(split)
    hub_id, config, mapper, splits = PUBLIC[name]
    hub_split, buckets = splits[split]
    loader = loader or _default_loader()
    args = (hub_id, config) if config else (hub_id,)
    try:
        rows = loader(*args, split=hub_split)
    except Exception as err:  # network, auth and cache errors come in many types
        raise PublicDatasetError(
            f"could not load the public dataset {hub_id!r} (split {hub_split!r}) for task "
            f"{name!r}: {type(err).__name__}: {err}. It needs access to the Hugging Face Hub or "
            f"a local datasets cache; the bundled data (jaxtune.tasks.load_examples) works "
            f"offline.") from err
    examples = [mapper(dict(row)) for row in rows]
    if buckets is not None:
        examples = [ex for ex in examples
                    if common.split_of(name, ex["messages"][1]["content"]) in buckets]
    for i, ex in enumerate(examples):
        ex["id"] = ex["id"] or f"{name}-public-{split}-{i}"
    return examples
