"""The compare config: the train config plus a `compare` group; its arms -> one train config each.

    compare.arms = "lora_r16_lr3e-4: mode=lora lora.rank=16 optim.lr=3e-4; full_lr3e-5: mode=full optim.lr=3e-5"

An arm is `NAME: KEY=VALUE ...`, arms are separated by `;`. `mode=lora|full` sets lora.enabled; any
other KEY is a train config key (lora.*, optim.*, model.dtype, ...) whose VALUE is parsed as that
key's type. Every arm starts from the same train config (everything outside `compare`), so keys an
arm must not change are refused: data.* and train.* (every arm sees the same batches in the same
order, the same number of tokens) and model.path / model.revision (one base model).
`arm_configs(config)` validates all of it, and each arm's train config, before any compute.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

import ml_collections

from jaxtune import config as config_lib
from jaxtune import tasks

MODES = ("lora", "full")
SHARED_PREFIXES = ("data.", "train.", "model.path", "model.revision")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
DEFAULT_ARMS = ("lora_r16_lr1e-4: mode=lora lora.rank=16 lora.alpha=32 optim.lr=1e-4; "
                "lora_r16_lr3e-4: mode=lora lora.rank=16 lora.alpha=32 optim.lr=3e-4; "
                "lora_r16_lr1e-3: mode=lora lora.rank=16 lora.alpha=32 optim.lr=1e-3; "
                "full_lr1e-5: mode=full optim.lr=1e-5; "
                "full_lr3e-5: mode=full optim.lr=3e-5; "
                "full_lr1e-4: mode=full optim.lr=1e-4")


def compare_config() -> ml_collections.ConfigDict:
    """base_config() (the train keys, applied to every arm) plus the `compare` group."""
    config = config_lib.base_config()
    c = config.compare = ml_collections.ConfigDict()
    c.arms = DEFAULT_ARMS  # 'NAME: mode=lora|full KEY=VALUE ...; NAME2: ...'
    # tasks scored by greedy generation on their test split: auto = the bundled tasks of data.train
    # (task:A+B -> A,B), '' = none, or a comma-separated list of bundled task names
    c.tasks = config_lib.AUTO
    c.task_examples = 48  # test examples scored per task
    c.task_max_new_tokens = 64
    c.samples = 16  # generations (temperature 1) for distinct-n diversity
    c.forget_max_new_tokens = 48  # the base model's answers to the general prompts (drift)
    c.eval_batch_size = 16  # generation batch
    c.spectra = True  # singular values of each arm's weight change
    return config


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    mode: str  # lora | full
    changes: dict  # flattened train key -> value, as given (mode excluded)
    config: ml_collections.ConfigDict  # the arm's complete train config (compare group removed)

    @property
    def lr(self) -> float:
        return float(self.config.optim.lr)

    @property
    def rank(self) -> int | None:
        return int(self.config.lora.rank) if self.mode == "lora" else None


class CompareConfigError(config_lib.ConfigError):
    """A compare config that cannot run (arms, keys, tasks); the message names the key and the fix."""


def train_part(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The train config shared by every arm: `config` without its compare group (unlocked copy)."""
    return ml_collections.ConfigDict({k: v for k, v in config.to_dict().items() if k != "compare"})


def parse_value(key: str, text: str, default):
    """`text` as the type of the schema's default for `key` (bool: true/false/1/0)."""
    if isinstance(default, bool):
        value = config_lib.parse_bool(text)
        if value is None:
            raise CompareConfigError(f"compare.arms: {key}={text!r} must be true or false")
        return value
    try:
        return type(default)(text)
    except ValueError:
        raise CompareConfigError(f"compare.arms: {key}={text!r} is not a {type(default).__name__}") from None


def parse_arms(spec: str) -> list[tuple[str, str, dict]]:
    """'NAME: mode=M KEY=VALUE ...; ...' -> [(name, mode, {key: value})], every problem one error."""
    known = config_lib.flatten(config_lib.base_config())
    arms, problems = [], []
    for part in filter(None, (p.strip() for p in (spec or "").split(";"))):
        name, sep, body = part.partition(":")
        name = name.strip()
        if not sep or not NAME.match(name):
            problems.append(f"{part!r}: an arm is 'NAME: mode=lora|full KEY=VALUE ...' with NAME of letters, "
                            f"digits, _ . + -")
            continue
        mode, changes = None, {}
        for item in body.split():
            key, eq, text = item.partition("=")
            if not eq:
                problems.append(f"arm {name}: {item!r} is not KEY=VALUE")
            elif key == "mode":
                mode = text
            elif key not in known:
                close = difflib.get_close_matches(key, list(known) + ["mode"], n=2)
                problems.append(f"arm {name}: unknown key {key!r}" + (f" (did you mean {', '.join(close)}?)" if close
                                                                       else ""))
            elif key.startswith(SHARED_PREFIXES) or key == "lora.enabled":
                what = "mode=lora|full" if key == "lora.enabled" else f"--config.{key} for all arms"
                problems.append(f"arm {name}: {key} is shared by every arm (the same base model, batches, order "
                                f"and tokens); set {what}")
            else:
                try:
                    changes[key] = parse_value(key, text, known[key])
                except CompareConfigError as e:
                    problems.append(f"arm {name}: {str(e).removeprefix('compare.arms: ')}")
        if mode not in MODES:
            problems.append(f"arm {name}: mode={mode} - give mode=lora or mode=full")
        arms.append((name, mode, changes))
    names = [a[0] for a in arms]
    problems += [f"arm name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    if not arms and not problems:
        problems.append("compare.arms is empty: list at least one arm, e.g. 'lora: mode=lora optim.lr=1e-3; "
                        "full: mode=full optim.lr=1e-5'")
    if problems:
        raise CompareConfigError("invalid compare.arms:\n  - " + "\n  - ".join(problems))
    return arms


def scored_tasks(config: ml_collections.ConfigDict) -> list[str]:
    """compare.tasks resolved: auto -> the bundled tasks data.train names, else the list given."""
    spec = config.compare.tasks
    if spec == config_lib.AUTO:
        parts = [p.strip() for p in config.data.train.split(",")]
        names = [n for p in parts if p.startswith(config_lib.TASK_SPEC) for n in p[len(config_lib.TASK_SPEC):].split("+")]
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in tasks.NAMES]
    if unknown:
        raise CompareConfigError(f"compare.tasks: unknown task(s) {', '.join(unknown)}; bundled tasks: "
                                 f"{', '.join(tasks.NAMES)} ('' = none, auto = data.train's)")
    return list(dict.fromkeys(names))


def check_compare_keys(config: ml_collections.ConfigDict) -> None:
    known = set(compare_config().compare.keys())
    unknown = [k for k in config.compare.keys() if k not in known]
    if unknown:
        raise CompareConfigError("; ".join(f"unknown config key compare.{k}" + (
            f" (did you mean compare.{difflib.get_close_matches(k, known, n=1)[0]}?)"
            if difflib.get_close_matches(k, known, n=1) else "") for k in unknown))
    for key in ("task_examples", "task_max_new_tokens", "samples", "forget_max_new_tokens", "eval_batch_size"):
        if int(config.compare[key]) < 1:
            raise CompareConfigError(f"compare.{key}={config.compare[key]}: must be >= 1")


def arm_configs(config: ml_collections.ConfigDict, num_devices: int | None = None) -> list[Arm]:
    """Every arm of a compare config with its validated train config (train.task '': compare scores
    the tasks itself, once per arm, after training)."""
    if "compare" not in config:
        raise CompareConfigError("the config has no compare group: start it from jaxtune.compare.arms.compare_config() "
                                 "(see configs/compare.py)")
    check_compare_keys(config)
    scored_tasks(config)
    arms = []
    for name, mode, changes in parse_arms(config.compare.arms):
        arm = train_part(config)
        arm.lora.enabled = mode == "lora"
        arm.update_from_flattened_dict(changes)
        arm.train.task = ""
        try:
            config_lib.validate(arm, num_devices)
        except config_lib.ConfigError as e:
            raise CompareConfigError(f"arm {name}: {e}") from None
        arms.append(Arm(name, mode, changes, config_lib.resolve_auto(arm)))
    return arms
