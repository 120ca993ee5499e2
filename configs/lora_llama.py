"""LoRA fine-tuning of a Llama-family model. Default: SmolLM2-135M-Instruct on the bundled ViGGO-style
structured-extraction task, a few minutes on 2 CPU cores.

    python -m jaxtune.train --config=configs/lora_llama.py
    python -m jaxtune.train --config=configs/lora_llama.py --config.model.path=meta-llama/Llama-3.2-1B-Instruct \
        --config.data.train=train.jsonl --config.data.eval=valid.jsonl --config.train.steps=1000
    python -m jaxtune.train --config=configs/lora_llama.py --config.mesh.shape=1,8,1 --config.train.batch_size=8

With your own data.train, the bundled task's eval set and accuracy are off (data.eval and
train.task are `auto`): give data.eval for a held-out loss. On N devices the batch must split
over them (a multiple of N).
"""

from jaxtune.config import base_config


def get_config():
    config = base_config()
    config.lora.enabled = True
    config.lora.targets = "all-linear,embed_tokens,lm_head"  # the seed recipe: the embedding and head adapt too
    config.optim.lr = 1e-3  # LoRA on a small model learns fast; 1e-4 is the safer default for 7B+ models
    # The demo task. data.eval and train.task stay `auto`, so they follow it: held-out loss on its
    # validation split, accuracy on its test split; with data.train=your.jsonl both are off.
    config.data.train = "task:viggo"
    # Sized for 2 CPU cores: ~300 examples seen, held-out loss on 64 validation examples, accuracy
    # on 48 test examples. On a GPU raise batch_size, steps and eval_batches freely.
    config.train.batch_size = 4
    config.train.steps = 80
    config.train.eval_every = 40
    config.train.eval_batches = 16
    config.data.max_len = 256
    return config
