"""jaxtune.data.pipeline: build_datasets reads every key it needs from config.data, loads and tokenizes
train and eval; the package imports no JAX."""

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, chat, require_reference, write_jsonl
from jaxtune import data
from jaxtune.data import DataError


def test_build_datasets_from_config(chatml, tmp_path):
    ml_collections = require_reference("ml_collections")
    train = write_jsonl(tmp_path / "train.jsonl", [chat(("user", "hello"), ("assistant", "world"))] * 3)
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"prompt": "hello", "completion": "four"}])
    evals = str(write_jsonl(tmp_path / "eval.jsonl", [{"text": "hello world"}]))
    config = ml_collections.ConfigDict(dict(train=f"{train},{extra}", eval=evals, format="auto", template="auto",
                                            max_len=64, packing=True, mask_prompt=True, drop_long=False))
    built = data.build_datasets(config, chatml)
    assert built.train_stats.examples == 4 and built.eval_stats.examples == 1
    assert chatml.decode(built.train[3].ids[built.train[3].trained]) == "four<|im_end|>"
    assert built.pad_id == chatml.pad_token_id
    config.eval = ""
    assert data.build_datasets(config, chatml).eval is None
    config.train = ""
    with pytest.raises(DataError, match="config.data.train is empty"):
        data.build_datasets(config, chatml)


def test_the_data_package_never_imports_jax():
    """Data preparation runs on any host (and in tools) without JAX: importing every data module loads none."""
    code = ("import sys; import jaxtune.data, jaxtune.data.batching, jaxtune.data.pipeline, jaxtune.data.sources, "
            "jaxtune.data.tokenize; print(sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'flax'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
