"""Checkpoints: keep last + best, async saves, resharding restores, exact resume, damage and full disks."""

import errno
import json
import logging
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from jaxtune import checkpoint as ckpt_lib
from jaxtune import lora
from jaxtune.checkpoint import CheckpointError, Checkpointer
from jaxtune.models.llama import LoRAConfig, ModelConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Orbax's writer threads of a deliberately failed save report late errors ("Event loop is closed") when
# they are garbage-collected, which pytest pins on whichever test runs then: noise, not a failure.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# ============================================================================================
# Helpers


def kill_after_first_checkpoint(command: list[str], checkpoints: pathlib.Path, *, cwd=None, env=None,
                                timeout_s: float = 300.0, log_path: pathlib.Path | None = None) -> list[int]:
    """Run `command`; SIGKILL it as soon as a committed checkpoint `checkpoints/N` exists.

    Returns the committed steps present at the kill. Fails (with the process output) if the process
    exits first or no checkpoint appears within `timeout_s`. Meant for `python -m jaxtune.train` too.
    """
    log_path = log_path or checkpoints.parent / "killed_process.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as output:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                committed = sorted(ckpt_lib.step_dirs(checkpoints))
                if committed:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait()
                    return committed
                if process.poll() is not None:
                    break
                time.sleep(0.02)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    raise AssertionError(f"{command} exited with {process.returncode} or timed out before writing a checkpoint "
                         f"in {checkpoints}:\n{log_path.read_text()[-4000:]}")


def try_mount_tmpfs(path: pathlib.Path, options: str) -> bool:
    """Mount a small tmpfs (a real filesystem that can be full or read-only, even for root)."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return result.returncode == 0


def unmount(path: pathlib.Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def toy_params(seed: int = 0, rows: int = 16, cols: int = 8):
    return {"dense": {"kernel": jax.random.normal(jax.random.key(seed), (rows, cols)), "bias": jnp.zeros((cols,))}}


TOY_TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-2, weight_decay=0.01))


def toy_state(seed: int = 0, rows: int = 16, cols: int = 8):
    params = toy_params(seed, rows, cols)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": TOY_TX.init(params),
            "rng": jax.random.key(seed + 100)}


@jax.jit
def toy_train_step(state):
    """One AdamW step on a noisy regression: uses and advances the rng, like dropout would."""
    rng, noise_key = jax.random.split(state["rng"])
    inputs = jax.random.normal(noise_key, (4, state["params"]["dense"]["kernel"].shape[0]))

    def loss_fn(params):
        out = inputs @ params["dense"]["kernel"] + params["dense"]["bias"]
        return jnp.mean((out - 1.0) ** 2)

    grads = jax.grad(loss_fn)(state["params"])
    updates, opt_state = TOY_TX.update(grads, state["opt_state"], state["params"])
    return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state, "rng": rng}


def meta_at(step: int, fingerprint=None) -> dict:
    return {"data": {"epoch": 0, "index": step}, "config_fingerprint": fingerprint or {"model_path": "toy"},
            "model": "toy", "metrics": {}}


def assert_trees_identical(a, b):
    a, b = ckpt_lib.keys_to_data(a), ckpt_lib.keys_to_data(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def saved_run(workdir: pathlib.Path, steps=(1, 2, 3), async_save: bool = True, **options):
    """Checkpoints of toy states at `steps` (state at step s = s toy updates); returns {step: state}."""
    states, state = {}, toy_state()
    with Checkpointer(workdir, every=1, keep=len(steps), async_save=async_save, **options) as ckpt:
        for step in range(1, max(steps) + 1):
            state = toy_train_step(state)
            if step in steps:
                ckpt.save(step, state, meta_at(step))
                states[step] = state
    return states


# ============================================================================================
# Fingerprint


def tiny_model_config(rank: int = 4, targets=("q_proj", "v_proj")) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                       num_kv_heads=1, head_dim=8, lora=LoRAConfig(rank=rank, alpha=8.0, targets=targets))


def test_fingerprint_matches_itself_and_names_every_difference(tmp_path):
    cfg = tiny_model_config()
    fingerprint = ckpt_lib.config_fingerprint("some/model", cfg, False, lora.adapter_shapes(cfg))
    stored = json.loads(json.dumps(fingerprint))  # what comes back from the checkpoint's meta
    ckpt_lib.check_compatible({"config_fingerprint": stored}, fingerprint)
    # numerics-only settings do not make a checkpoint incompatible
    ckpt_lib.check_compatible({"config_fingerprint": stored}, ckpt_lib.config_fingerprint(
        "some/model", cfg.replace(compute_dtype="bfloat16", remat="full"), False, lora.adapter_shapes(cfg)))

    other = tiny_model_config(rank=8)
    changed = ckpt_lib.config_fingerprint("other/model", other, False, lora.adapter_shapes(other))
    with pytest.raises(CheckpointError) as caught:
        ckpt_lib.check_compatible({"config_fingerprint": stored}, changed, tmp_path / "checkpoints")
    message = str(caught.value)
    assert "lora.rank: checkpoint has 4, this run has 8" in message
    assert "model_path" in message and "trainable_shapes.model/layers/self_attn/q_proj/lora_a" in message
    assert f"use a new --workdir or remove {tmp_path / 'checkpoints'}" in message
    with pytest.raises(CheckpointError, match="no config fingerprint"):
        ckpt_lib.check_compatible({}, fingerprint)


def test_full_finetune_flag_is_part_of_the_fingerprint():
    cfg = tiny_model_config()
    lora_run = ckpt_lib.config_fingerprint("m", cfg, False, lora.adapter_shapes(cfg))
    full_run = ckpt_lib.config_fingerprint("m", cfg, True, lora.adapter_shapes(cfg))
    assert ckpt_lib.fingerprint_differences(lora_run, full_run) == [
        "full_finetune: checkpoint has false, this run has true"]


def test_a_workdir_of_another_config_is_refused_not_skipped(tmp_path):
    saved_run(tmp_path, steps=(1, 2))
    with Checkpointer(tmp_path, every=1, keep=2) as ckpt:
        with pytest.raises(CheckpointError, match=r"model_path: checkpoint has \"toy\", this run has \"other\""):
            ckpt.restore_latest_valid(toy_state(), {"model_path": "other"})
        assert ckpt.all_steps() == [1, 2]
        assert not (ckpt.directory / ckpt_lib.DAMAGED_DIR).exists()


def as_bfloat16(tree):
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                  tree)


def test_a_checkpoint_from_before_float32_master_weights_is_one_error_naming_the_way_on(tmp_path):
    """A bfloat16 run's checkpoints from before trained leaves were float32 master weights hold them (and
    Adam's moments) in bfloat16. Resuming one is one CheckpointError naming the folder and how to go on from
    its weights (export them), not a crash inside orbax, and the checkpoint is not set aside as damaged."""
    cfg = tiny_model_config()
    trained = toy_state()
    old = {**trained, "params": as_bfloat16(trained["params"]), "opt_state": as_bfloat16(trained["opt_state"])}
    with Checkpointer(tmp_path, every=1, keep=2, async_save=False) as ckpt:
        ckpt.save(1, old, meta_at(1, ckpt_lib.config_fingerprint("toy", cfg, True, old["params"])))
    with Checkpointer(tmp_path, every=1, keep=2) as ckpt:
        with pytest.raises(CheckpointError) as caught:
            ckpt.restore_latest_valid(toy_state(), ckpt_lib.config_fingerprint("toy", cfg, True, trained["params"]))
        assert ckpt.all_steps() == [1] and not (ckpt.directory / ckpt_lib.DAMAGED_DIR).exists()
    message = str(caught.value)
    assert message.startswith(f"the checkpoints in {tmp_path / 'checkpoints'} hold the trained weights (and Adam's "
                              f"moments) in bfloat16: they were written by a jaxtune from before")
    assert f"python -m jaxtune.export --workdir={tmp_path} --format=peft" in message
    assert "--config.lora.init_from=" in message and "--config.model.path=" in message
    # The way on reads them: export takes the trained weights as stored.
    from jaxtune import workdir as workdir_lib

    exported = workdir_lib.load_trained_params(tmp_path, 1)
    assert exported["dense"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(exported["dense"]["kernel"], np.asarray(old["params"]["dense"]["kernel"]))

    # bfloat16 leaves next to another difference: the other config's message, every difference listed.
    other = ckpt_lib.config_fingerprint("other", cfg, True, trained["params"])
    with pytest.raises(CheckpointError, match=r"different model or run config(.|\n)*model_path(.|\n)*bfloat16"):
        ckpt_lib.check_compatible(meta_at(1, ckpt_lib.config_fingerprint("toy", cfg, True, old["params"])), other)


# ============================================================================================
# Saving, keeping, restoring


def test_keeps_last_k_and_the_best_by_eval_loss(tmp_path):
    eval_losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: None, 5: float("nan"), 6: None, 7: 2.5}
    state = toy_state()
    with Checkpointer(tmp_path, every=1, keep=2) as ckpt:
        for step, loss in eval_losses.items():
            ckpt.save(step, state, meta_at(step), metrics=None if loss is None else {"eval_loss": loss})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2, 6, 7]
        assert ckpt.best_step() == 2
    assert sorted(ckpt_lib.step_dirs(tmp_path / "checkpoints")) == [2, 6, 7]
    with Checkpointer(tmp_path, every=1, keep=2) as reopened:  # the best survives a restart
        reopened.save(8, state, meta_at(8), metrics={"eval_loss": 1.5})
        reopened.save(9, state, meta_at(9))
        reopened.wait_until_finished()
        assert reopened.all_steps() == [2, 8, 9]


def test_keep_best_off_keeps_only_the_last_k(tmp_path):
    state = toy_state()
    with Checkpointer(tmp_path, every=1, keep=2, keep_best=False) as ckpt:
        for step, loss in {1: 0.5, 2: 1.0, 3: 2.0}.items():
            ckpt.save(step, state, meta_at(step), metrics={"eval_loss": loss})
    assert sorted(ckpt_lib.step_dirs(tmp_path / "checkpoints")) == [2, 3]


def test_saves_every_n_steps_and_at_the_end_once(tmp_path):
    state = toy_state()
    with Checkpointer(tmp_path, every=3, keep=10) as ckpt:
        saved = [step for step in range(1, 8) if ckpt.save(step, state, meta_at(step), final=step == 7)]
        assert saved == [3, 6, 7]
        assert not ckpt.save(7, state, meta_at(7), final=True)  # an existing step is not written twice
        assert ckpt.all_steps() == [3, 6, 7]
    with Checkpointer(tmp_path / "end_only", every=0, keep=1) as ckpt:
        assert [s for s in range(1, 5) if ckpt.save(s, state, meta_at(s), final=s == 4)] == [4]


def test_restore_returns_state_meta_and_typed_rng(tmp_path):
    states = saved_run(tmp_path, steps=(2, 3))
    with Checkpointer(tmp_path, every=1, keep=2) as ckpt:
        assert ckpt.latest_step() == 3
        state, meta = ckpt.restore(None, toy_state())
        assert meta == meta_at(3)
        assert jax.dtypes.issubdtype(state["rng"].dtype, jax.dtypes.prng_key)
        assert jax.random.key_impl(state["rng"]) == jax.random.key_impl(states[3]["rng"])
        assert_trees_identical(state, states[3])
        earlier, _ = ckpt.restore(2, jax.eval_shape(toy_state))
        assert_trees_identical(earlier, states[2])


def test_non_default_prng_implementation_round_trips(tmp_path):
    state = {"step": jnp.int32(1), "rng": jax.random.split(jax.random.key(7, impl="rbg"), 3)}
    with Checkpointer(tmp_path, every=1, keep=1) as ckpt:
        ckpt.save(1, state, meta_at(1))
        restored, _ = ckpt.restore(1, jax.eval_shape(lambda: state))
    assert jax.random.key_impl(restored["rng"]) == jax.random.key_impl(state["rng"])
    assert_trees_identical(restored, state)


def test_state_buffers_may_be_donated_right_after_an_async_save(tmp_path):
    state = toy_state(rows=256, cols=256)
    expected = jax.tree_util.tree_map(np.asarray, ckpt_lib.keys_to_data(state))
    with Checkpointer(tmp_path, every=1, keep=1, async_save=True) as ckpt:
        ckpt.save(1, state, meta_at(1))
        for leaf in jax.tree_util.tree_leaves(state):  # what jit(donate_argnums=0) does to them
            leaf.delete()
        ckpt.wait_until_finished()
        restored, _ = ckpt.restore(1, toy_state(rows=256, cols=256))
    assert_trees_identical(restored, jax.tree_util.tree_map(jnp.asarray, expected))


def test_restore_onto_other_meshes_reshards(tmp_path):
    assert jax.device_count() == 8, "conftest sets 8 simulated devices"
    fsdp_mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"))
    fsdp = NamedSharding(fsdp_mesh, P("fsdp", None))
    replicated = NamedSharding(fsdp_mesh, P())
    state = toy_state(rows=64, cols=16)
    state = jax.tree_util.tree_map(lambda x: jax.device_put(x, fsdp if np.ndim(x) == 2 else replicated), state)
    assert len(state["params"]["dense"]["kernel"].sharding.device_set) == 8
    with Checkpointer(tmp_path, every=1, keep=1) as ckpt:
        ckpt.save(1, state, meta_at(1))

    def abstract_with(sharding_of):
        abstract = jax.eval_shape(lambda: toy_state(rows=64, cols=16))
        return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding_of(s)),
                                      abstract)

    one_device = SingleDeviceSharding(jax.devices()[0])
    mesh_2x4 = jax.make_mesh((2, 4), ("data", "fsdp"))
    on_2x4 = lambda s: NamedSharding(mesh_2x4, P("fsdp", "data") if len(s.shape) == 2 else P())  # noqa: E731
    with Checkpointer(tmp_path, every=1, keep=1) as ckpt:
        for sharding_of in (lambda s: one_device, on_2x4):
            target = abstract_with(sharding_of)
            restored, _ = ckpt.restore(1, target)
            for leaf, wanted in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(target)):
                assert leaf.sharding.is_equivalent_to(wanted.sharding, leaf.ndim)
            assert_trees_identical(restored, state)
    kernel = restored["params"]["dense"]["kernel"]
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(16, 8)}


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    total_steps, save_at = 10, 4
    uninterrupted = toy_state()
    for _ in range(total_steps):
        uninterrupted = toy_train_step(uninterrupted)

    state = toy_state()
    with Checkpointer(tmp_path, every=save_at, keep=2) as ckpt:
        for step in range(1, save_at + 2):  # one step past the checkpoint is lost in the "crash"
            state = toy_train_step(state)
            ckpt.save(step, state, meta_at(step))

    with Checkpointer(tmp_path, every=save_at, keep=2) as ckpt:
        resumed = ckpt.restore_latest_valid(jax.eval_shape(toy_state), meta_at(0)["config_fingerprint"])
        assert resumed.step == save_at and resumed.meta["data"] == {"epoch": 0, "index": save_at}
        state = resumed.state
        assert int(state["step"]) == save_at
        for step in range(int(state["step"]) + 1, total_steps + 1):
            state = toy_train_step(state)
            ckpt.save(step, state, meta_at(step), final=step == total_steps)
    assert_trees_identical(state, uninterrupted)


def test_checkpoint_size_on_disk(tmp_path):
    state = toy_state(rows=128, cols=128)
    with Checkpointer(tmp_path, every=1, keep=1) as ckpt:
        ckpt.save(1, state, meta_at(1))
        size = ckpt.size_bytes()
        assert size == ckpt_lib.checkpoint_size_bytes(tmp_path / "checkpoints" / "1")
    # kernel, adam mu and nu are 3 x 64 KiB of float32; zeros compress; metadata adds a few KiB
    kernel_bytes = 128 * 128 * 4
    assert kernel_bytes < size < 4 * kernel_bytes


# ============================================================================================
# Damage: killed writers, truncated or missing files


def test_unfinished_write_of_a_killed_run_is_ignored_and_removed(tmp_path, caplog):
    states = saved_run(tmp_path, steps=(1, 2))
    checkpoints = tmp_path / "checkpoints"
    leftover = checkpoints / f"3{ckpt_lib.UNFINISHED_MARKER}"
    shutil.copytree(checkpoints / "2", leftover)
    for data_file in leftover.rglob("d/*"):
        os.truncate(data_file, 1)
    with caplog.at_level(logging.WARNING, logger="jaxtune.checkpoint"):
        ckpt = Checkpointer(tmp_path, every=1, keep=2)
    assert "removed unfinished checkpoint write" in caplog.text and leftover.name in caplog.text
    assert not leftover.exists()
    assert ckpt.latest_step() == 2
    resumed = ckpt.restore_latest_valid(toy_state())
    assert resumed.step == 2
    assert_trees_identical(resumed.state, states[2])
    ckpt.close()


def truncate_largest_data_file(step_dir: pathlib.Path):
    data_file = max((step_dir / "state").rglob("d/*"), key=lambda f: f.stat().st_size)
    os.truncate(data_file, data_file.stat().st_size // 2)


def garble_largest_data_file(step_dir: pathlib.Path):
    data_file = max((step_dir / "state").rglob("d/*"), key=lambda f: f.stat().st_size)
    content = bytearray(data_file.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 32] = bytes(32)
    data_file.write_bytes(bytes(content))


DAMAGES = {
    "truncated data file": truncate_largest_data_file,
    "garbled data file": garble_largest_data_file,
    "state manifest deleted": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "meta deleted": lambda d: shutil.rmtree(d / "meta"),
    "meta truncated": lambda d: os.truncate(d / "meta" / "metadata", 5),
    "everything deleted": lambda d: [shutil.rmtree(d), d.mkdir()],
    "metrics truncated": lambda d: os.truncate(d / "metrics" / "metrics", 3),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_latest_is_reported_set_aside_and_the_previous_used(tmp_path, caplog, damage):
    states, state = {}, toy_state(rows=64, cols=64)
    with Checkpointer(tmp_path, every=1, keep=3) as ckpt:
        for step in (1, 2, 3):
            state = toy_train_step(state)
            ckpt.save(step, state, meta_at(step), metrics={"eval_loss": 10.0 - step})
            states[step] = state
    checkpoints = tmp_path / "checkpoints"
    DAMAGES[damage](checkpoints / "3")

    with caplog.at_level(logging.WARNING, logger="jaxtune.checkpoint"):
        with Checkpointer(tmp_path, every=1, keep=3) as ckpt:
            resumed = ckpt.restore_latest_valid(toy_state(rows=64, cols=64), meta_at(0)["config_fingerprint"])
            assert resumed.step == 2
            assert_trees_identical(resumed.state, states[2])
            assert ckpt.all_steps() == [1, 2]
            # training goes on and writes step 3 afresh
            ckpt.save(3, toy_train_step(resumed.state), meta_at(3))
            ckpt.wait_until_finished()
            assert ckpt.all_steps() == [1, 2, 3]
    assert "checkpoint step 3" in caplog.text
    assert "cannot be restored" in caplog.text or "metrics file does not parse" in caplog.text
    assert (checkpoints / ckpt_lib.DAMAGED_DIR / "3").is_dir(), "a damaged checkpoint is kept, never deleted"


def test_when_nothing_restores_nothing_is_moved_and_the_error_lists_each_step(tmp_path):
    saved_run(tmp_path, steps=(1, 2))
    wrong_layout = {"step": jax.ShapeDtypeStruct((), jnp.int32),
                    "params": {"other": jax.ShapeDtypeStruct((3,), jnp.float32)}}
    with Checkpointer(tmp_path, every=1, keep=2) as ckpt:
        with pytest.raises(CheckpointError) as caught:
            ckpt.restore_latest_valid(wrong_layout)
        assert "step 2:" in str(caught.value) and "step 1:" in str(caught.value)
        assert "none was changed or deleted" in str(caught.value)
        assert ckpt.all_steps() == [1, 2]
    assert not (tmp_path / "checkpoints" / ckpt_lib.DAMAGED_DIR).exists()


def test_fresh_workdir_has_nothing_to_resume(tmp_path):
    with Checkpointer(tmp_path, every=1, keep=2) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.restore_latest_valid(toy_state()) is None


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from jaxtune.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1], every=1, keep=3)
    for step in range(1, 10_000):
        weights = jax.random.normal(jax.random.key(step), (1024, 1024))  # 4 MiB: writes take a while
        ckpt.save(step, {"step": jnp.int32(step), "params": {"w": weights}}, {"data": {"index": step}})
""")


def test_sigkill_mid_run_leaves_a_restorable_latest_checkpoint(tmp_path, caplog):
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    committed = kill_after_first_checkpoint([sys.executable, str(script), str(tmp_path)], tmp_path / "checkpoints",
                                            cwd=REPO_ROOT, env=env)
    assert committed
    leftovers = ckpt_lib.unfinished_writes(tmp_path / "checkpoints")  # usually the next step, half-written
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32),
                "params": {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}}
    with caplog.at_level(logging.WARNING, logger="jaxtune.checkpoint"):
        with Checkpointer(tmp_path, every=1, keep=3) as ckpt:
            assert not ckpt_lib.unfinished_writes(ckpt.directory)
            resumed = ckpt.restore_latest_valid(abstract)
    assert all(f"removed unfinished checkpoint write {path}" in caplog.text for path in leftovers)
    assert resumed.step >= committed[-1] and resumed.meta == {"data": {"index": resumed.step}}
    np.testing.assert_array_equal(np.asarray(resumed.state["params"]["w"]),
                                  np.asarray(jax.random.normal(jax.random.key(resumed.step), (1024, 1024))))


# ============================================================================================
# Unwritable workdir, full disk


def test_workdir_under_a_file_is_one_clear_error(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    with pytest.raises(CheckpointError) as caught:
        Checkpointer(blocker / "run", every=1, keep=1)
    assert str(blocker / "run" / "checkpoints") in str(caught.value)
    assert "--workdir" in str(caught.value)
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOTDIR


def test_read_only_filesystem_is_one_clear_error(tmp_path):
    mount_point = tmp_path / "ro"
    if not try_mount_tmpfs(mount_point, "ro,size=1m"):
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        with pytest.raises(CheckpointError, match="read-only") as caught:
            Checkpointer(mount_point / "run", every=1, keep=1)
        assert caught.value.errno == errno.EROFS and str(mount_point / "run" / "checkpoints") in str(caught.value)
    finally:
        unmount(mount_point)


def fill_disk(path: pathlib.Path) -> pathlib.Path:
    """Write a file until the filesystem refuses even one more byte."""
    filler = path / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk_size in (1 << 16, 1 << 10, 1):
            try:
                while True:
                    os.write(descriptor, b"\1" * chunk_size)
            except OSError as error:
                assert error.errno == errno.ENOSPC
    finally:
        os.close(descriptor)
    return filler


@pytest.mark.parametrize("async_save", [True, False])
def test_full_disk_raises_one_error_and_keeps_earlier_checkpoints(tmp_path, async_save):
    """A real full filesystem: a 4 MiB tmpfs, filled up after the first checkpoint."""
    mount_point = tmp_path / "small_disk"
    if not try_mount_tmpfs(mount_point, "size=4m"):
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN); the file-size-limit test covers writes")
    try:
        state = toy_state(rows=128, cols=128)
        ckpt = Checkpointer(mount_point, every=1, keep=2, async_save=async_save)
        ckpt.save(1, state, meta_at(1))
        ckpt.wait_until_finished()
        filler = fill_disk(mount_point)
        with pytest.raises(CheckpointError) as caught:
            ckpt.save(2, toy_train_step(state), meta_at(2))
            ckpt.wait_until_finished()
        message = str(caught.value)
        assert caught.value.errno == errno.ENOSPC and "disk is full" in message
        assert "step 2" in message and str(mount_point / "checkpoints") in message and "df -h" in message
        assert "Earlier checkpoints are untouched (steps 1)" in message
        assert not ckpt_lib.unfinished_writes(ckpt.directory)
        assert ckpt.all_steps() == [1]
        restored, meta = ckpt.restore(1, toy_state(rows=128, cols=128))
        assert_trees_identical(restored, state)
        assert meta == meta_at(1)
        filler.unlink()  # space again: training can go on saving
        assert ckpt.save(3, state, meta_at(3))
        ckpt.close()
        assert sorted(ckpt_lib.step_dirs(mount_point / "checkpoints")) == [1, 3]
    finally:
        unmount(mount_point)


@pytest.mark.parametrize("async_save", [True, False])
def test_failed_write_raises_one_error_and_keeps_earlier_checkpoints(tmp_path, async_save):
    """Portable (no mount needed): the kernel refuses writes past RLIMIT_FSIZE with EFBIG, mid-write."""
    state = toy_state(rows=64, cols=64)
    big_state = toy_state(rows=1024, cols=512)  # a 2 MiB kernel: its data file breaks the limit
    ckpt = Checkpointer(tmp_path, every=1, keep=1, async_save=async_save)
    ckpt.save(1, state, meta_at(1))
    ckpt.wait_until_finished()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(CheckpointError) as caught:
            ckpt.save(2, big_state, meta_at(2))
            ckpt.wait_until_finished()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    message = str(caught.value)
    assert caught.value.errno == errno.EFBIG and "could not write checkpoint step 2" in message
    assert "Earlier checkpoints are untouched (steps 1)" in message
    assert not ckpt_lib.unfinished_writes(ckpt.directory)
    assert ckpt.all_steps() == [1]
    restored, _ = ckpt.restore(1, toy_state(rows=64, cols=64))
    assert_trees_identical(restored, state)
    ckpt.close()
