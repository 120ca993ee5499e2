"""`jaxtune.train.run` end to end on a tiny real task, and `python -m jaxtune.export` of the run it leaves.

One LoRA run (module fixture, slow) of the tiny random Llama with SmolLM2's tokenizer and ChatML template
on a repetitive chat task: the loss falls, the frozen base is untouched bit for bit, the workdir holds
every artifact, and both exports load in peft / transformers with jaxtune's logits. In the default suite:
an interrupted run resumes bit for bit (dropout, async saves, gradient accumulation), and full
fine-tuning with model.dtype=bfloat16 trains float32 master weights.
"""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_reference, tiny_config, write_chat_jsonl
from jaxtune import api, checkpoint, train
from jaxtune import params as params_lib
from test_cli import assert_states_identical, stored_state

# The shared 24-step run compiles a sharded step for the 8 simulated devices: minutes on a busy 2-core box.
slow = pytest.mark.slow

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 24


@pytest.fixture(scope="module")
def lora_run(tiny_chat_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_run")
    data = write_chat_jsonl(root / "train.jsonl")
    config = tiny_config()
    config.model.path = str(tiny_chat_model)
    config.data.train = str(data)
    config.data.eval = str(data)
    config.optim.lr = 3e-3
    config.train.steps = STEPS
    config.train.eval_every = 12
    config.checkpoint.every = 12
    config.checkpoint.async_save = True
    result = train.run(config, root / "run")
    return result


def records(workdir: pathlib.Path, kind: str) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@slow
def test_loss_falls_on_a_small_real_task(lora_run):
    train_records = records(lora_run.workdir, "train")
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))  # log_every=1
    first = np.mean([r["loss"] for r in train_records[:3]])
    last = np.mean([r["loss"] for r in train_records[-3:]])
    assert last < first - 2.0, (first, last)
    evals = records(lora_run.workdir, "eval")
    assert [r["step"] for r in evals] == [0, 12, 24]
    assert evals[-1]["loss"] < evals[0]["loss"] - 2.0
    assert lora_run.eval_after["loss"] == pytest.approx(evals[-1]["loss"])
    assert lora_run.train_loss == pytest.approx(train_records[-1]["loss"])


@slow
def test_lora_leaves_the_frozen_base_bit_identical(lora_run, tiny_chat_model):
    base = api.load(str(tiny_chat_model), with_tokenizer=False).params
    frozen = jax.tree_util.tree_flatten_with_path(lora_run.frozen)[0]
    base_flat = dict((params_lib.path_str(kp), leaf) for kp, leaf in jax.tree_util.tree_flatten_with_path(base)[0])
    assert {params_lib.path_str(kp) for kp, _ in frozen} == set(base_flat)
    for kp, leaf in frozen:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(base_flat[params_lib.path_str(kp)]))
    trained = jax.tree_util.tree_flatten_with_path(lora_run.params)[0]
    assert trained and all(params_lib.path_str(kp).rsplit("/", 1)[-1] in ("lora_a", "lora_b") for kp, _ in trained)
    # ... and the adapters did train: every lora_b left its zero init.
    assert all(np.abs(np.asarray(leaf)).max() > 0 for kp, leaf in trained
               if params_lib.path_str(kp).endswith("lora_b") and "embed_tokens" not in params_lib.path_str(kp))


@slow
def test_workdir_holds_metrics_tensorboard_summary_config_and_checkpoints(lora_run):
    workdir = lora_run.workdir
    for record in records(workdir, "train"):
        assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(record)
        assert np.isfinite(record["loss"]) and record["tokens_per_s"] > 0
    lrs = [r["lr"] for r in records(workdir, "train")]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(3e-3)  # warmup from 0 to the peak, then cosine
    for record in records(workdir, "eval"):
        assert {"loss", "perplexity"} <= set(record)
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    summary = json.loads((workdir / "reports" / "summary.json").read_text())
    assert summary["final_step"] == STEPS and summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["steps"] == STEPS and config["lora"]["rank"] == 4
    assert sorted(checkpoint.step_dirs(workdir / "checkpoints")) == [12, 24]


# ============================================================================================
# Export of the real run: `python -m jaxtune.export`


def export_cli(workdir: pathlib.Path, fmt: str, out: pathlib.Path) -> pathlib.Path:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-m", "jaxtune.export", f"--workdir={workdir}", f"--format={fmt}",
                             f"--out={out}"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert pathlib.Path(result.stdout.strip().splitlines()[-1]) == out
    return out


TOKENS = np.array([[1, 9, 120, 4000, 3, 49151, 17, 2], [7, 7, 1, 254, 30000, 64, 33, 2]], np.int32)


@pytest.fixture(scope="module")
def run_logits(lora_run, tiny_chat_model):
    model = api.load(str(tiny_chat_model), with_tokenizer=False)
    ours = api.logits(model, TOKENS, params=params_lib.merge_trees(model.params, lora_run.params), lora=lora_run.cfg.lora)
    assert np.abs(ours - api.logits(model, TOKENS)).max() > 1e-2  # the trained adapters matter
    return ours


def torch_logits(model):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.as_tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


@slow
def test_peft_export_of_the_run_loads_in_peft_with_the_same_logits(lora_run, run_logits, tiny_chat_model, tmp_path):
    peft = require_reference("peft")
    transformers = require_reference("transformers")
    out = export_cli(lora_run.workdir, "peft", tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_chat_model, attn_implementation="eager").eval()
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    np.testing.assert_allclose(torch_logits(model), run_logits, atol=1e-4)


@slow
def test_merged_export_of_the_run_loads_in_transformers_with_the_same_logits(lora_run, run_logits, tmp_path):
    transformers = require_reference("transformers")
    out = export_cli(lora_run.workdir, "merged", tmp_path / "merged")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_allclose(torch_logits(model), run_logits, atol=1e-4)


# ============================================================================================
# Exact resume, in process (the kill -9 versions are in test_cli.py, slow)


def short_run_config(model: pathlib.Path, data: pathlib.Path):
    config = tiny_config()
    config.model.path = str(model)
    config.data.train = str(data)
    config.lora.targets = "all-linear"
    config.optim.warmup_steps = 0
    return config


def test_interrupted_run_resumes_bit_identical_to_an_uninterrupted_one(tiny_chat_model, tmp_path, caplog):
    """Dropout on, async saves, 2 micro-batches per step, a checkpoint every 2 of 4 steps.

    The interruption: the workdir as a kill right after step 2's checkpoint committed leaves it (the
    later checkpoints removed). Its rerun restores params, Adam moments, the dropout rng and the data
    position from step 2 and must end exactly where the uninterrupted run ended."""
    config = short_run_config(tiny_chat_model, write_chat_jsonl(tmp_path / "train.jsonl"))
    config.lora.dropout = 0.1
    config.optim.grad_accum = 2
    config.train.batch_size = 16  # micro-batches of 8 rows over the 8 simulated devices
    config.train.steps = 4
    config.checkpoint.every = 2
    config.checkpoint.keep = 10
    config.checkpoint.async_save = True
    uninterrupted = train.run(config, tmp_path / "uninterrupted")
    assert sorted(checkpoint.step_dirs(tmp_path / "uninterrupted" / "checkpoints")) == [2, 4]

    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "uninterrupted", interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "4")
    with caplog.at_level(logging.INFO, logger="jaxtune"):
        resumed = train.run(config, interrupted)
    assert "resumed from checkpoint step 2" in caplog.text

    final = stored_state(interrupted, 4)
    assert_states_identical(final, stored_state(tmp_path / "uninterrupted", 4))  # params, Adam state, rng, step
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(resumed.params)[0],
                            jax.tree_util.tree_leaves(uninterrupted.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=params_lib.path_str(path))
    at_step_2 = stored_state(interrupted, 2)  # steps 3 and 4 did move the adapters
    assert any(not np.array_equal(at_step_2[k], final[k]) for k in final if k.startswith("params/"))


# ============================================================================================
# model.dtype=bfloat16: trained weights are float32 master weights


def test_full_finetuning_with_bfloat16_dtype_trains_float32_master_weights(tiny_chat_model, tmp_path, caplog):
    """Adam's updates at lr 1e-5 are below bfloat16's resolution: bfloat16 weights kept ~15% of them.
    Full fine-tuning with model.dtype=bfloat16 keeps every trained weight, and so its gradient and
    Adam moments, in float32 (compute stays bfloat16)."""
    config = short_run_config(tiny_chat_model, write_chat_jsonl(tmp_path / "train.jsonl"))
    config.lora.enabled = False
    config.model.dtype = config.model.compute_dtype = "bfloat16"
    config.optim.lr = 1e-5
    config.train.steps = 3
    with caplog.at_level(logging.INFO, logger="jaxtune"):
        result = train.run(config, tmp_path / "run")
    assert result.frozen == {}
    # The start-up plan (jaxtune.plan) counts the float32 master weights, gradients and Adam moments.
    plan_lines = [line.strip() for line in caplog.text.splitlines()]
    assert any(line.startswith("trained weights (float32 masters)") for line in plan_lines), caplog.text
    assert any(line.startswith("gradients (float32)") for line in plan_lines)
    assert any(line.startswith("optimizer state (AdamW: 2 x float32)") for line in plan_lines)
    source = api.load(str(tiny_chat_model), with_tokenizer=False).params  # float32 on disk
    moved = total = 0
    for (path, trained), initial in zip(jax.tree_util.tree_flatten_with_path(result.params)[0],
                                        jax.tree_util.tree_leaves(source)):
        if params_lib.path_str(path).endswith("kernel"):
            trained = np.asarray(trained)
            moved += int(np.sum(trained != np.asarray(initial).astype(trained.dtype)))
            total += trained.size
    assert total and moved / total >= 0.95, f"{moved / total:.1%} of the kernel entries moved"
    saved = stored_state(tmp_path / "run", 3)
    float_leaves = {key: str(value.dtype) for key, value in saved.items()
                    if key.startswith(("params/", "opt_state/")) and jnp.issubdtype(value.dtype, jnp.floating)}
    assert any(key.startswith("opt_state/") for key in float_leaves)
    assert set(float_leaves.values()) == {"float32"}, float_leaves

