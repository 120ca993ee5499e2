"""Scale-out: the same losses on 1 device, on 8-device meshes and in a 2-process jax.distributed run;
checkpoints of the 2-process run restore in 1 process; launcher detection; bad meshes fail before compute.

The training runs use the tiny chat model (real SmolLM2 tokenizer, random 3-layer Llama) with
configs/tiny.py, batch 8, max_len 64, a few steps; losses are read from WORKDIR/metrics.jsonl.
The 1-device baseline runs `python -m jaxtune.train` in a subprocess whose XLA_FLAGS give it a
single CPU device (this test process has 8), so it is a true one-device run, not a 1,1,1 mesh
carved out of 8 devices.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import conftest
from jaxtune import distributed, sharding, train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3
MESHES = ["8,1,1", "1,8,1", "2,2,2", "1,2,4"]
RTOL = 1e-5  # float32 round-off: different meshes sum partial results in different orders


# ============================================================================================
# Helpers


@pytest.fixture(scope="session")
def train_jsonl(tmp_path_factory) -> pathlib.Path:
    """32 short chat examples (more than the 3 x 8 rows the runs read)."""
    path = tmp_path_factory.mktemp("distributed_data") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(32):
            a, b = i * 7 % 50, i * 13 % 40
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                             {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}) + "\n")
    return path


def tiny_config(model: pathlib.Path, data: pathlib.Path, **overrides):
    """configs/tiny.py with the model and data filled in; overrides are 'group.key': value."""
    return conftest.tiny_config(**{"model.path": str(model), "data.train": str(data), "train.steps": STEPS,
                                   **overrides})


def cli_flags(model: pathlib.Path, data: pathlib.Path, workdir: pathlib.Path, **overrides) -> list[str]:
    settings = {"model.path": model, "data.train": data, "train.steps": STEPS, **overrides}
    return ([sys.executable, "-m", "jaxtune.train", "--config=configs/tiny.py", f"--workdir={workdir}"]
            + [f"--config.{key}={value}" for key, value in settings.items()])


def subprocess_env(num_devices: int, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in distributed.EXPLICIT_VARS and k != distributed.ENV_SWITCH}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}", JAX_PLATFORMS="cpu",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run_cli(command: list[str], env: dict, log_path: pathlib.Path, timeout_s: float = 600) -> tuple[int, str]:
    with open(log_path, "wb") as output:
        returncode = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
                                    timeout=timeout_s).returncode
    return returncode, log_path.read_text()


def train_losses(workdir: pathlib.Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    steps = [r["step"] for r in train_records]
    assert len(steps) == len(set(steps)), f"a step was logged twice (more than one process writing?): {steps}"
    return {r["step"]: r["loss"] for r in train_records}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def one_device_losses(tiny_chat_model, train_jsonl, tmp_path_factory):
    """mode ('lora' | 'full') -> losses of a `python -m jaxtune.train` run on exactly one CPU device."""
    cache = {}

    def get(mode: str) -> dict[int, float]:
        if mode not in cache:
            workdir = tmp_path_factory.mktemp(f"one_device_{mode}")
            command = cli_flags(tiny_chat_model, train_jsonl, workdir / "run", **{
                "mesh.shape": "1,1,1", "lora.enabled": mode == "lora"})
            returncode, output = run_cli(command, subprocess_env(1), workdir / "log.txt")
            assert returncode == 0, output[-4000:]
            assert "(1 devices)" in output, output[-4000:]
            cache[mode] = train_losses(workdir / "run")
        return cache[mode]

    return get


def assert_same_losses(actual: dict[int, float], expected: dict[int, float]):
    assert sorted(actual) == sorted(expected)
    np.testing.assert_allclose([actual[s] for s in sorted(actual)], [expected[s] for s in sorted(expected)],
                               rtol=RTOL)


# ============================================================================================
# Launcher detection (pure)


def test_launch_plan_from_environment():
    assert distributed.launch_plan({}) is None
    explicit = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    plan = distributed.launch_plan(explicit)
    assert plan.kwargs == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert distributed.launch_plan({**explicit, "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) is None
    assert distributed.launch_plan({**explicit, "JAXTUNE_DISTRIBUTED": "off"}) is None
    # srun with several tasks: JAX reads SLURM itself; a batch script (no step yet) or one task: nothing
    assert distributed.launch_plan({"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "16"}).kwargs == {}
    assert distributed.launch_plan({"SLURM_JOB_ID": "7"}) is None
    assert distributed.launch_plan({"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert distributed.launch_plan({"JAXTUNE_DISTRIBUTED": "auto"}).kwargs == {}
    for bad, message in [({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID missing"),
                         ({**explicit, "JAX_PROCESS_ID": "4"}, "out of range"),
                         ({**explicit, "JAX_NUM_PROCESSES": "two"}, "not an integer"),
                         ({"JAXTUNE_DISTRIBUTED": "yes please"}, "use auto, off")]:
        with pytest.raises(distributed.LaunchError, match=message):
            distributed.launch_plan(bad)


def test_maybe_initialize_is_a_no_op_for_a_single_process():
    assert distributed.maybe_initialize({}) is False
    assert jax.process_count() == 1


def test_batch_layout_per_process():
    assert distributed.layout_problem({0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}, 8) is None
    # tensor axis across the two hosts: both hold every row, but each reads only half of them
    both = distributed.layout_problem({0: list(range(8)), 1: list(range(8))}, 8)
    assert "process 0 hold rows 0..7" in both and "own 4 rows (0..3" in both
    assert "process 0 hold rows 4..7" in distributed.layout_problem({0: [4, 5, 6, 7], 1: [0, 1, 2, 3]}, 8)
    assert "does not split evenly" in distributed.layout_problem({0: [0, 1, 2], 1: [3, 4], 2: [5, 6]}, 7)
    # one process: every mesh is fine, all rows are its own
    for shape in MESHES + ["1,1,8"]:
        mesh = sharding.make_mesh(shape)
        assert distributed.rows_by_process(mesh, None, 8) == {0: list(range(8))}
        distributed.check_batch_layout(mesh, None, 8)


# ============================================================================================
# Bad meshes: exit code 2 and the fix, before any compute


def test_bad_mesh_fails_before_compute_with_the_fix(tiny_chat_model, train_jsonl, tmp_path):
    workdir = tmp_path / "run"
    command = cli_flags(tiny_chat_model, train_jsonl, workdir, **{"mesh.shape": "3,1,1"})
    returncode, output = run_cli(command, subprocess_env(8), tmp_path / "log.txt", timeout_s=300)
    assert returncode == 2, output[-4000:]
    assert "mesh.shape=3,1,1 needs 3 devices but 8 are available" in output
    assert "try --config.mesh.shape=1,8,1" in output
    assert "memory per device" not in output and not (workdir / "checkpoints").exists()

    # the same through train.run: a batch that does not split over data x fsdp, and an unparsable shape
    for shape, batch_size, message in [("8,1,1", 4, "make it a multiple of 8"), ("2,2", 8, "three sizes")]:
        config = tiny_config(tiny_chat_model, train_jsonl, **{"mesh.shape": shape, "train.batch_size": batch_size})
        with pytest.raises((train.config_lib.ConfigError, sharding.ShardingError), match=message):
            train.run(config, tmp_path / f"run_{batch_size}")
        assert not (tmp_path / f"run_{batch_size}" / "checkpoints").exists()


# ============================================================================================
# Same losses on every mesh as on one device


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("shape", MESHES)
def test_same_losses_on_every_mesh_as_on_one_device(tiny_chat_model, train_jsonl, one_device_losses, tmp_path,
                                                     shape, mode):
    config = tiny_config(tiny_chat_model, train_jsonl, **{"mesh.shape": shape, "lora.enabled": mode == "lora"})
    train.run(config, tmp_path / "run")
    losses = train_losses(tmp_path / "run")
    assert len(losses) == STEPS and all(np.isfinite(list(losses.values())))
    assert_same_losses(losses, one_device_losses(mode))


# ============================================================================================
# Two processes (jax.distributed on CPU, gloo), 4 devices each


def launch_two_processes(tiny_chat_model, train_jsonl, workdir: pathlib.Path, logs: pathlib.Path,
                         **overrides) -> list[tuple[int, str]]:
    """`python -m jaxtune.train` as process 0 and 1 of a 2-process job; [(exit code, output)] per process."""
    port = free_port()
    processes, log_files = [], []
    for process_id in range(2):
        env = subprocess_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                             JAX_PROCESS_ID=str(process_id))
        log_files.append(open(logs / f"process_{process_id}.log", "wb"))
        processes.append(subprocess.Popen(cli_flags(tiny_chat_model, train_jsonl, workdir, **overrides), cwd=REPO_ROOT,
                                          env=env, stdout=log_files[-1], stderr=subprocess.STDOUT))
    results = []
    try:
        for process_id, process in enumerate(processes):
            returncode = process.wait(timeout=600)
            results.append((returncode, (logs / f"process_{process_id}.log").read_text()))
    finally:
        for process, log_file in zip(processes, log_files):
            if process.poll() is None:
                process.kill()
                process.wait()
            log_file.close()
    return results


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoints_restore_in_one(tiny_chat_model, train_jsonl, tmp_path):
    # constant lr, so that a 3-step run resumed to 5 steps must equal an uninterrupted 5-step run
    settings = {"mesh.shape": "2,2,2", "optim.schedule": "constant", "optim.warmup_steps": 0}
    two_process_dir = tmp_path / "two_processes"
    results = launch_two_processes(tiny_chat_model, train_jsonl, two_process_dir, tmp_path, **settings)
    for returncode, output in results:
        assert returncode == 0, output[-4000:]
    assert "process 1 of 2: 4 local devices of 8" in results[1][1]
    assert "data=2 x fsdp=2 x tensor=2 (8 devices)" in results[0][1]
    two_process_losses = train_losses(two_process_dir)
    assert sorted(two_process_losses) == [1, 2, 3]
    assert (two_process_dir / "config.json").exists() and sorted(
        int(p.name) for p in (two_process_dir / "checkpoints").iterdir() if p.name.isdigit()) == [3]

    # one process, 8 devices, 5 steps straight through
    config = tiny_config(tiny_chat_model, train_jsonl, **settings)
    config.train.steps = 5
    train.run(config, tmp_path / "one_process")
    reference = train_losses(tmp_path / "one_process")
    assert_same_losses(two_process_losses, {s: reference[s] for s in (1, 2, 3)})

    # the 2-process checkpoint (step 3) restores in one process, which goes on with steps 4 and 5
    train.run(config, two_process_dir)
    resumed = train_losses(two_process_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    assert_same_losses(resumed, reference)


@pytest.mark.slow
def test_two_processes_reject_a_tensor_axis_across_hosts(tiny_chat_model, train_jsonl, tmp_path):
    results = launch_two_processes(tiny_chat_model, train_jsonl, tmp_path / "run", tmp_path,
                                   **{"mesh.shape": "1,1,8"})
    for returncode, output in results:
        assert returncode == 2, output[-4000:]
        assert "over 2 processes" in output and "--config.mesh.shape=2,-1,1" in output
        assert "memory per device" not in output
