"""Config schema and validation: every configs/*.py file and the commands its docstring documents
validate (or give the documented error) for 1 and 8 devices, unknown keys get a did-you-mean,
command-line overrides go through ml_collections as in `python -m jaxtune.train`, and the `auto`
defaults of data.eval / train.task follow data.train only when it is a bundled `task:NAME`."""

import json
import pathlib
import re
import shlex
import sys

import pytest

from jaxtune import config as config_lib
from jaxtune import lora, train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The train configs (compare configs are jaxtune.compare's: tests/test_compare.py validates them).
CONFIG_FILES = sorted(p for p in (REPO_ROOT / "configs").glob("*.py") if not p.stem.startswith("compare"))

# What each config file gives as it is, for 1 and for 8 devices: None = valid, else (a piece of the
# error, the piece of the file's docstring that documents it; the docstring also shows the command
# that works, checked by test_the_commands_a_config_file_documents_validate).
TOO_FEW_ROWS = ("cannot be split over data x fsdp = 8 devices", "the batch must split")
NO_DATA = ("data.train is empty", '"data.train is empty"')
EXPECTED = {
    "lora_llama": {1: None, 8: TOO_FEW_ROWS},
    "full_llama": {1: None, 8: TOO_FEW_ROWS},
    "tiny": {1: NO_DATA, 8: NO_DATA},
}


def load(path, *overrides: str):
    """The config of a file plus --config.KEY=VALUE overrides, parsed as jaxtune.train's command line does
    (ml_collections reads the overrides from sys.argv, so the command line is put there)."""
    from unittest import mock

    from absl import flags
    from ml_collections import config_flags

    argv = ["jaxtune.train", f"--config={path}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values, lock_config=True)
    with mock.patch.object(sys, "argv", argv):
        flag_values(argv)
    return flag_values.config


def documented_commands(path: pathlib.Path) -> list[list[str]]:
    """The `python -m jaxtune.train --config=THIS_FILE ...` commands of a config file's docstring, as argv."""
    text = path.read_text().split('"""')[1].replace("\\\n", " ")
    commands = [shlex.split(line.split("#")[0]) for line in text.splitlines() if "python -m jaxtune.train" in line]
    assert all(f"--config=configs/{path.name}" in c for c in commands), commands
    return commands


def overrides_of(command: list[str]) -> list[str]:
    return [arg for arg in command if arg.startswith("--config.")]


def devices_of(overrides: list[str]) -> int:
    """The device count a command is written for: the product of a fixed mesh.shape, else 1."""
    shapes = [arg.split("=", 1)[1] for arg in overrides if arg.startswith("--config.mesh.shape=")]
    sizes = config_lib.parse_mesh_shape(shapes[-1]) if shapes else (1, 1, 1)
    return abs(sizes[0] * sizes[1] * sizes[2])


def test_every_config_file_is_covered():
    assert sorted(p.stem for p in CONFIG_FILES) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("devices", [1, 8])
def test_config_file_validates_or_gives_the_documented_error(path, devices):
    config = load(path)
    expected = EXPECTED[path.stem][devices]
    if expected is None:
        config_lib.validate(config, devices)
    else:
        error, documented = expected
        with pytest.raises(config_lib.ConfigError, match=re.escape(error)):
            config_lib.validate(config, devices)
        assert documented in " ".join(path.read_text().split('"""')[1].split())


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_the_commands_a_config_file_documents_validate(path):
    commands = documented_commands(path)
    assert commands, f"{path.name} documents no command"
    for command in commands:
        overrides = overrides_of(command)
        config_lib.validate(load(path, *overrides), devices_of(overrides))


def test_the_error_for_too_few_rows_per_device_names_the_fix():
    config = load(REPO_ROOT / "configs" / "lora_llama.py")
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config, 8)
    fix = re.search(r"--config\.train\.batch_size=\d+", str(error.value)).group(0)
    config_lib.validate(load(REPO_ROOT / "configs" / "lora_llama.py", fix), 8)
    accumulating = load(REPO_ROOT / "configs" / "lora_llama.py", "--config.optim.grad_accum=2")
    with pytest.raises(config_lib.ConfigError, match=r"--config\.train\.batch_size=16"):
        config_lib.validate(accumulating, 8)


# --------------------------------------------------------------------------------------------
# Unknown keys and overrides


def test_unknown_key_in_a_config_file_names_it_with_a_did_you_mean(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("from jaxtune.config import base_config\n\n\ndef get_config():\n    config = base_config()\n"
                    "    config.lora.rnak = 4\n    config.optim.learning_rate = 1e-3\n    return config\n")
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(load(path), 1)
    message = str(error.value)
    assert "unknown config key 'lora.rnak' (did you mean lora.rank" in message
    assert "'optim.learning_rate'" in message  # every unknown key, not only the first


def test_unknown_key_on_the_command_line_exits_2_with_a_did_you_mean(capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_flags(["jaxtune.train", "--config=configs/tiny.py", "--config.lora.rnak=4"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "unknown config key 'lora.rnak' in --config.lora.rnak=4 (did you mean lora.rank" in err
    assert config_lib.unknown_key_problem("lora.rank") is None
    assert "did you mean" not in config_lib.unknown_key_problem("zzz.qqq")


def test_overrides_change_values_with_the_schema_types():
    config = load(REPO_ROOT / "configs" / "lora_llama.py", "--config.lora.rank=16", "--config.optim.lr=3e-4",
                  "--config.lora.targets=q,v", "--config.data.eval=", "--config.checkpoint.keep_best=false")
    assert config.lora.rank == 16 and isinstance(config.lora.rank, int)
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.lora.targets == "q,v" and config.data.eval == "" and config.checkpoint.keep_best is False
    config_lib.validate(config, 1)
    with pytest.raises(Exception, match="rank"):
        load(REPO_ROOT / "configs" / "lora_llama.py", "--config.lora.rank=sixteen")


@pytest.mark.parametrize("override, named", [
    ("--config.train.task=vigo", "train.task: unknown bundled task 'vigo' (did you mean viggo?)"),
    ("--config.data.train=task:sqll", "data.train: unknown bundled task 'sqll' (did you mean sql?)"),
    ("--config.data.eval=task:viggo+aritmetic", "data.eval: unknown bundled task 'aritmetic'"),
    ("--config.data.template=chatml", "data.template='chatml': choose auto"),
    ("--config.lora.targets=q,foo", "unknown module 'foo'"),
])
def test_bad_values_are_named_with_the_fix(override, named):
    with pytest.raises(config_lib.ConfigError, match=re.escape(named)):
        config_lib.validate(load(REPO_ROOT / "configs" / "lora_llama.py", override), 1)


def test_data_format_and_template_are_validated_by_the_data_package_rules(monkeypatch):
    """config has no copy of the data formats or of the Jinja-template rule: it validates with jaxtune.data's."""
    from jaxtune import data

    config = load(REPO_ROOT / "configs" / "lora_llama.py", "--config.data.format=chat_jsonl")
    with pytest.raises(config_lib.ConfigError, match=re.escape(f"choose one of {', '.join(data.FORMATS)}")):
        config_lib.validate(config, 1)
    monkeypatch.setattr(data, "format_name", lambda name: name)  # data's rule decides, not a copy in config
    config_lib.validate(config, 1)
    config.data.template = "<<custom>>"
    monkeypatch.setattr(data, "is_jinja_template", lambda template: template.startswith("<<"))
    config_lib.validate(config, 1)


@pytest.mark.parametrize("name", ["auto", "messages", "prompt_completion", "prompt-completion", "text",
                                  "chat_jsonl", "Messages", "prompt completion"])
def test_config_accepts_exactly_the_data_formats_the_data_package_loads(name, tmp_path):
    """design.md's spelling prompt-completion loads (jaxtune.data), so validation must accept it too."""
    from jaxtune import data

    file = tmp_path / "train.jsonl"
    file.write_text(json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n")
    try:
        data.load_examples(str(file), name)
        loads = True
    except data.DataError as e:  # messages / text refuse this row, but know the format
        loads = "unknown data format" not in str(e)
    config = load(REPO_ROOT / "configs" / "lora_llama.py", f"--config.data.format={name}")
    try:
        config_lib.validate(config, 1)
        validates = True
    except config_lib.ConfigError as e:
        assert f"data.format={name!r}: choose one of auto, messages, prompt_completion, text" in str(e)
        validates = False
    assert validates == loads
    assert loads == (name in ("auto", "messages", "prompt_completion", "prompt-completion", "text"))


def test_a_jinja_chat_template_is_a_valid_data_template():
    config = load(REPO_ROOT / "configs" / "lora_llama.py",
                  "--config.data.template={% for m in messages %}{{ m['content'] }}{% endfor %}")
    config_lib.validate(config, 1)


# --------------------------------------------------------------------------------------------
# Defaults


def test_lora_targets_default_to_all_linear_layers():
    config = config_lib.base_config()
    assert config.lora.targets == "all-linear"
    assert lora.parse_targets(config.lora.targets) == (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # The demo keeps the seed recipe, adapters on the embedding and the output head too.
    assert set(lora.parse_targets(load(REPO_ROOT / "configs" / "lora_llama.py").lora.targets)) >= {
        "q_proj", "down_proj", "embed_tokens", "lm_head"}


@pytest.mark.parametrize("data_train, eval_spec, task", [
    ("task:viggo", "task:viggo", "viggo"),
    (" task:sql ", "task:sql", "sql"),
    ("task:viggo+sql", "task:viggo+sql", ""),  # several tasks: held-out on all, no single task to score
    ("my.jsonl", "", ""),
    ("hf:org/data:train", "", ""),
    ("task:viggo,extra.jsonl", "", ""),  # extra.jsonl has no validation split
    ("task:viggo,task:sql", "task:viggo,task:sql", ""),
])
def test_auto_eval_and_task_follow_only_a_bundled_task(data_train, eval_spec, task):
    config = config_lib.base_config()
    config.data.train = data_train
    assert (config.data.eval, config.train.task) == ("auto", "auto")
    resolved = config_lib.resolve_auto(config)
    assert (resolved.data.eval, resolved.train.task) == (eval_spec, task)
    assert (config.data.eval, config.train.task) == ("auto", "auto")  # the input is not changed


@pytest.mark.parametrize("eval_spec, task", [("valid.jsonl", "arithmetic"), ("", ""), ("task:sql", "viggo")])
def test_explicit_eval_and_task_always_win(eval_spec, task):
    for data_train in ("task:viggo", "my.jsonl"):
        config = config_lib.base_config()
        config.data.train, config.data.eval, config.train.task = data_train, eval_spec, task
        resolved = config_lib.resolve_auto(config)
        assert (resolved.data.eval, resolved.train.task) == (eval_spec, task)


def test_own_data_in_the_demo_config_turns_the_bundled_task_off():
    demo = config_lib.resolve_auto(load(REPO_ROOT / "configs" / "lora_llama.py"))
    assert (demo.data.train, demo.data.eval, demo.train.task) == ("task:viggo", "task:viggo", "viggo")
    own = config_lib.resolve_auto(load(REPO_ROOT / "configs" / "lora_llama.py", "--config.data.train=my.jsonl"))
    assert (own.data.eval, own.train.task) == ("", "")
    with_eval = config_lib.resolve_auto(load(REPO_ROOT / "configs" / "full_llama.py", "--config.data.train=my.jsonl",
                                             "--config.data.eval=valid.jsonl"))
    assert (with_eval.data.eval, with_eval.train.task) == ("valid.jsonl", "")


def test_resolved_config_round_trips_through_json():
    config = config_lib.resolve_auto(load(REPO_ROOT / "configs" / "lora_llama.py", "--config.lora.rank=4"))
    again = config_lib.from_json(config_lib.to_json(config))
    assert json.loads(config_lib.to_json(again)) == json.loads(config_lib.to_json(config))
    assert again.train.task == "viggo" and again.lora.rank == 4
