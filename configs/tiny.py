"""Tiny runs for tests and smoke checks: a random-weight model folder and a small JSONL file.

    python -m jaxtune.train --config=configs/tiny.py --config.model.path=/tmp/tiny-llama \
        --config.data.train=train.jsonl --workdir=/tmp/tiny-run

data.train has no default here: give it (without it the config is refused, "data.train is empty").
No eval set and no task unless data.train is a bundled `task:NAME` (data.eval / train.task `auto`).
"""

from jaxtune.config import base_config


def get_config():
    config = base_config()
    config.data.train = ""
    config.data.max_len = 64
    config.lora.rank = 4
    config.lora.targets = "all"  # every module kind (embedding and head too), so tests cover them all
    config.lora.dropout = 0.0
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 2
    config.train.batch_size = 8
    config.train.steps = 10
    config.train.log_every = 1
    config.train.eval_every = 0
    config.train.progress = False
    config.checkpoint.every = 0
    config.checkpoint.async_save = False
    return config
