"""LoRA vs full fine-tuning on your task: every arm trained on the same batches, then evaluated.

    python -m jaxtune.compare --config=configs/compare.py --workdir=runs/compare
    python -m jaxtune.compare --config=configs/compare.py --config.data.train=my.jsonl \
        --config.data.eval=my_valid.jsonl --config.compare.tasks= --workdir=runs/compare_mine
    python -m jaxtune.compare --config=configs/compare.py \
        --config.compare.arms="lora_r8: mode=lora lora.rank=8 optim.lr=1e-3; full: mode=full optim.lr=3e-5"

Every key outside `compare` is a jaxtune.train key (configs/lora_llama.py, jaxtune/config.py) applied
to every arm; an arm changes only what it lists (`NAME: mode=lora|full KEY=VALUE ...`, arms separated
by `;`), never data.* or train.* (every arm sees the same batches in the same order). Rerun the same
command to resume: finished arms are skipped, an interrupted one resumes its latest checkpoint.
DIR/report.md, report.html and report.json hold the table, the plots and the verdict.
"""

from jaxtune.compare.arms import compare_config


def get_config():
    config = compare_config()
    # Defaults of compare_config(): LoRA r16 (alpha 32) at lr 1e-4, 3e-4, 1e-3 and full fine-tuning
    # at 1e-5, 3e-5, 1e-4 (LoRA's best lr is typically ~10x full's, Biderman et al. 2024).
    config.lora.targets = "all-linear"
    config.lora.dropout = 0.05
    config.data.train = "task:viggo"  # data.eval (validation split) and compare.tasks (auto) follow it
    config.data.max_len = 256
    config.train.batch_size = 8
    config.train.steps = 200
    config.train.eval_every = 50
    config.train.eval_batches = 8
    config.checkpoint.every = 50
    config.checkpoint.keep = 1  # a full fine-tuning checkpoint holds the weights and two Adam moments
    config.checkpoint.keep_best = False
    config.compare.task_examples = 100
    return config
