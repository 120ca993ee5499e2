"""Full-parameter fine-tuning of a Llama-family model: same data and command as configs/lora_llama.py,
every weight trained (AdamW holds two float32 moments per parameter).

    python -m jaxtune.train --config=configs/full_llama.py
    python -m jaxtune.train --config=configs/full_llama.py --config.mesh.shape=1,8,1 --config.train.batch_size=8
                                                    # FSDP over 8 devices: the batch must split over them
"""

from jaxtune.config import base_config


def get_config():
    config = base_config()
    config.lora.enabled = False
    config.optim.lr = 1e-5
    config.optim.weight_decay = 0.0
    config.data.train = "task:viggo"  # the demo task; data.eval and train.task (auto) follow it
    config.train.batch_size = 4  # the same data budget as configs/lora_llama.py
    config.train.steps = 80
    config.train.eval_every = 40
    config.train.eval_batches = 16
    config.data.max_len = 256
    return config
