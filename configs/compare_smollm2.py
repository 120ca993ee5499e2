"""LoRA vs full fine-tuning of the real SmolLM2-135M-Instruct on the bundled viggo + arithmetic tasks,
sized for 2 shared CPU cores (under an hour; the README gives the measured wall time and load).

    python -m jaxtune.compare --config=configs/compare_smollm2.py --workdir=runs/compare_smollm2

Four arms on the same 64 examples (16 steps of 4, the same batches in the same order): LoRA r16
(all linear layers, alpha 32) at lr 3e-4 and 1e-3, full fine-tuning at 3e-5 and 1e-4 (LoRA's ~10x
full's learning rate, Biderman et al. 2024). Accuracy on 24 test examples per task, forgetting on the
bundled general prompts and questions. A budget this small measures the first steps of fine-tuning:
on a GPU raise train.steps, train.batch_size and compare.task_examples, and use
configs/compare.py's six arms (three learning rates per method).
"""

from jaxtune.compare.arms import compare_config


def get_config():
    config = compare_config()
    # Arms run in this order, one method after the other: a partial report is a LoRA vs full comparison.
    config.compare.arms = ("lora_r16_lr3e-4: mode=lora lora.rank=16 lora.alpha=32 optim.lr=3e-4; "
                           "full_lr1e-4: mode=full optim.lr=1e-4; "
                           "lora_r16_lr1e-3: mode=lora lora.rank=16 lora.alpha=32 optim.lr=1e-3; "
                           "full_lr3e-5: mode=full optim.lr=3e-5")
    config.lora.targets = "all-linear"
    config.lora.dropout = 0.0  # so few steps: dropout only adds noise
    config.data.train = "task:viggo+arithmetic"  # eval set: both validation splits; tasks scored: both
    config.data.max_len = 192  # 5 of 4,000 training examples are cut (by at most 4 tokens)
    config.train.batch_size = 4
    config.train.steps = 16
    config.train.log_every = 1
    config.train.eval_every = 8
    config.train.eval_batches = 2  # 8 held-out examples per eval: a coarse curve, cheap on CPU
    config.train.progress = False
    config.optim.warmup_steps = 2
    config.checkpoint.every = 8  # resumable mid-arm
    config.checkpoint.keep = 1  # a full checkpoint holds the weights and two Adam moments (~1.6 GB)
    config.checkpoint.keep_best = False
    config.compare.task_examples = 24
    config.compare.task_max_new_tokens = 96  # arithmetic answers run to ~96 tokens (generation stops at EOS)
    config.compare.samples = 8
    config.compare.forget_max_new_tokens = 32
    return config
