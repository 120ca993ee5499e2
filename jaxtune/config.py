"""Config schema (every key with its default and meaning) and validation before any compute.

Config files in configs/ start from `base_config()` and change what they need; every key can be
overridden on the command line (`--config.lora.rank=16`). The schema is locked: an unknown key,
from a file or an override, is an error that names the key and the nearest valid ones.
`validate(config, num_devices)` checks values and combinations and raises one `ConfigError`
listing every problem, before the model or data are touched.

`data.eval` and `train.task` default to `auto`: they follow `data.train` when it is a bundled task
(`task:NAME` -> held-out loss on NAME's validation split, accuracy on task NAME) and are empty
otherwise, so a run on the user's own data is never scored on a bundled task it did not ask for.
`resolve_auto(config)` gives the config with both resolved (what a run records in config.json).
"""

from __future__ import annotations

import difflib
import json
import sys
from typing import Any

import ml_collections

from jaxtune import data as data_lib
from jaxtune import lora as lora_lib
from jaxtune import tasks
from jaxtune.errors import JaxtuneError
from jaxtune.models.llama import DTYPES, LINEAR_TARGETS, REMAT_POLICIES
from jaxtune.models.quant import QuantConfig

SCHEDULES = ("cosine", "linear", "constant")
MIN_MAX_LEN = 8  # data.max_len (and evaluate --max_len): tokens per example, at least
BOOL_WORDS = {"true": True, "1": True, "false": False, "0": False}  # a bool written on a command line
AUTO = "auto"  # data.eval / train.task: follow data.train when it is `task:NAME`, else none
TASK_SPEC = "task:"


class ConfigError(JaxtuneError, ValueError):
    """A config that cannot run; the message lists every problem and how to fix it."""


def parse_bool(text: str) -> bool | None:
    """A bool as command lines write it (true / false / 1 / 0, any case); None for anything else."""
    return BOOL_WORDS.get(text.strip().lower())


def base_config() -> ml_collections.ConfigDict:
    """All keys jaxtune understands, with their defaults.

    LoRA defaults: rank 8, alpha 16 and dropout 0.05 on every linear layer of the blocks
    (`all-linear`, as QLoRA and most recipes since do; PEFT's own default for Llama is q_proj,v_proj
    only). The embedding and the output head are one override away (`all-linear,embed_tokens,lm_head`)."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.path = "smollm2-135m-instruct"  # HF folder, hub id, or built-in alias
    c.model.revision = ""  # hub revision (branch, tag or commit), '' = default
    c.model.dtype = "float32"  # storage dtype of the frozen weights; trained weights are always float32
    c.model.compute_dtype = "float32"  # activation/matmul dtype (bfloat16 on GPU/TPU)
    c.model.remat = "none"  # none | full | dots | dots_no_batch (rematerialisation per layer)
    c.model.allow_pickle = False  # allow pickled pytorch_model.bin weights (runs pickle!)
    # QLoRA: '' = none; nf4 = the frozen kernels of model.quantize_targets stored as 4-bit NormalFloat
    # (blocks of 64, jaxtune/models/quant.py), dequantised inside each matmul; LoRA runs only
    c.model.quantize = ""
    c.model.quantize_targets = "all-linear"  # q,k,v,o,gate,up,down (all-linear); also lm_head (untied models)
    c.model.quantize_double = False  # also quantise the absmax to 8 bits in blocks of 256 (bitsandbytes' nested)

    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = True  # False = full fine-tuning (every parameter trained)
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.05
    c.lora.targets = "all-linear"  # q,k,v,o,gate,up,down; also: short names, embed_tokens, lm_head, 'all'
    c.lora.rslora = False  # scaling alpha/sqrt(r) instead of alpha/r
    c.lora.init_from = ""  # start from an existing PEFT adapter folder
    c.lora.dora = False  # DoRA: a trained magnitude per output feature of each linear target (PEFT use_dora)
    c.lora.plus_ratio = 0.0  # LoRA+: lr of every lora_b (and DoRA magnitude) = ratio x lr; 0 = off (paper: 16)
    c.lora.plus_lr_embedding = 1e-6  # LoRA+: peak lr of embed_tokens adapters (PEFT's loraplus_lr_embedding)

    c.data = ml_collections.ConfigDict()
    c.data.train = "task:viggo"  # JSONL path, `hf:NAME[:CONFIG]:SPLIT`, or `task:NAME` (bundled)
    # same forms; '' = no eval set; `task:NAME` uses its validation split; auto = data.train's
    # validation split when data.train is `task:NAME`, else no eval set
    c.data.eval = AUTO
    c.data.format = "auto"  # auto | messages | prompt_completion (or prompt-completion) | text
    # auto = the tokenizer's chat template; none = raw concatenation; or a Jinja chat template.
    # Evaluation (held-out loss, task prompts, forgetting) renders with the same template.
    c.data.template = "auto"
    c.data.max_len = 512  # tokens per example (longer ones are truncated and counted)
    c.data.drop_long = False  # drop over-long examples instead of truncating them
    c.data.packing = False  # pack several examples per row (segment ids; no cross-attention)
    c.data.mask_prompt = True  # loss only on assistant tokens (their end-of-turn token included)
    c.data.add_tokens = ""  # comma-separated new special tokens added to the tokenizer

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.schedule = "cosine"  # cosine | linear | constant, after a linear warmup
    c.optim.warmup_steps = 10
    c.optim.min_lr_ratio = 0.1  # final lr = lr * min_lr_ratio (cosine / linear)
    c.optim.weight_decay = 0.0  # AdamW decoupled weight decay (not on norms, biases, embeddings)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_norm = 1.0  # global gradient-norm clipping; 0 = off
    c.optim.grad_accum = 1  # micro-batches per optimizer step

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8  # examples (rows) per optimizer step, over all devices and micro-batches
    c.train.steps = 100  # optimizer steps (ignored when epochs > 0)
    c.train.epochs = 0.0  # > 0: train this many passes over the data instead of `steps`
    c.train.seed = 0
    c.train.log_every = 5
    c.train.eval_every = 50  # 0 = only at the end
    c.train.eval_batches = 0  # 0 = the whole eval set
    # bundled task scored by generation before and after training; '' = none; auto = NAME when
    # data.train is `task:NAME`, else none
    c.train.task = AUTO
    c.train.task_examples = 48  # test examples scored
    c.train.task_max_new_tokens = 64
    c.train.progress = True  # progress bar on the terminal

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = "1,-1,1"  # (data, fsdp, tensor); one -1 takes the remaining devices
    c.mesh.rules = ""  # extra logical->mesh rules 'embed=fsdp,mlp=tensor'; '' = defaults

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 50  # steps between checkpoints (and always at the end); 0 = only at the end
    c.checkpoint.keep = 2  # last K checkpoints kept (plus the best by eval loss)
    c.checkpoint.keep_best = True  # also keep the best by eval loss (no eval set: only the last K)
    c.checkpoint.async_save = True
    return c


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in (config.items() if hasattr(config, "items") else []):
        name = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def unknown_key_problem(key: str, where: str = "") -> str | None:
    """None for a key of the schema, else 'unknown config key ... (did you mean ...?)'."""
    known = flatten(base_config())
    if key in known:
        return None
    close = difflib.get_close_matches(key, known, n=3)
    return (f"unknown config key {key!r}" + (f" in {where}" if where else "")
            + (f" (did you mean {', '.join(close)}?)" if close else ""))


def check_known_keys(config: ml_collections.ConfigDict) -> None:
    """Every key of `config` exists in the schema (catches typos in config files)."""
    problems = [p for p in map(unknown_key_problem, flatten(config)) if p]
    if problems:
        raise ConfigError("\n".join(problems))


def bundled_task(train_spec: str) -> str:
    """NAME when `train_spec` is exactly one bundled task (`task:NAME`), else ''."""
    spec = (train_spec or "").strip()
    if not spec.startswith(TASK_SPEC) or "," in spec or "+" in spec:
        return ""
    return spec[len(TASK_SPEC):].strip()


def resolve_eval(eval_spec: str, train_spec: str) -> str:
    """data.eval with `auto` resolved: data.train when it names only bundled tasks (`task:A+B`; their
    validation splits are the eval set), else ''."""
    if eval_spec != AUTO:
        return eval_spec
    spec = (train_spec or "").strip()
    parts = [part.strip() for part in spec.split(",")]
    return spec if spec and all(part.startswith(TASK_SPEC) for part in parts) else ""


def resolve_task(task: str, train_spec: str) -> str:
    """train.task with `auto` resolved: NAME when data.train is `task:NAME`, else '' (no task)."""
    return bundled_task(train_spec) if task == AUTO else task


def resolve_auto(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with data.eval and train.task resolved (explicit values are kept as they are)."""
    resolved = ml_collections.ConfigDict(config.to_dict())
    resolved.data.eval = resolve_eval(config.data.eval, config.data.train)
    resolved.train.task = resolve_task(config.train.task, config.data.train)
    resolved.lock()
    return resolved


def _task_names(spec: str) -> list[str]:
    """Task names of every `task:A+B` part of a comma-separated data spec."""
    parts = [part.strip() for part in (spec or "").split(",")]
    return [name.strip() for part in parts if part.startswith(TASK_SPEC)
            for name in part[len(TASK_SPEC):].split("+")]


def _task_problems(config: ml_collections.ConfigDict) -> list[str]:
    problems = []
    named = [("data.train", name) for name in _task_names(config.data.train)]
    named += [("data.eval", name) for name in _task_names(config.data.eval)]
    if config.train.task not in ("", AUTO):
        named.append(("train.task", config.train.task))
    for key, name in named:
        if name not in tasks.NAMES:
            close = difflib.get_close_matches(name, tasks.NAMES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            none = "; '' = none" if key == "train.task" else ""
            problems.append(f"{key}: unknown bundled task {name!r}{hint}; bundled tasks: {', '.join(tasks.NAMES)}{none}")
    return problems


def parse_mesh_shape(shape: Any) -> tuple[int, int, int]:
    if isinstance(shape, str):
        try:
            dims = tuple(int(s) for s in shape.replace("(", "").replace(")", "").split(",") if s.strip())
        except ValueError:
            raise ConfigError(f"mesh.shape={shape!r}: expected three integers 'data,fsdp,tensor', e.g. 1,-1,1") from None
    else:
        dims = tuple(int(s) for s in shape)
    if len(dims) != 3:
        raise ConfigError(f"mesh.shape={shape!r}: expected three sizes (data, fsdp, tensor), e.g. 1,-1,1")
    return dims  # type: ignore[return-value]


QUANTIZE_KINDS = ("", "nf4")
QUANTIZABLE = LINEAR_TARGETS + ("lm_head",)


def quant_config(model: ml_collections.ConfigDict) -> QuantConfig | None:
    """The QuantConfig of config.model (model.quantize*), or None when nothing is quantised."""
    if not model.quantize:
        return None
    return QuantConfig(kind=model.quantize, targets=lora_lib.parse_targets(model.quantize_targets),
                       double=bool(model.quantize_double))


def _quantize_problems(config: ml_collections.ConfigDict) -> list[str]:
    """The combinations model.quantize=nf4 supports, and a fix for each that it does not."""
    m = config.model
    if m.quantize not in QUANTIZE_KINDS:
        return [f"model.quantize={m.quantize!r}: choose '' (no quantisation) or nf4"]
    if not m.quantize:
        return []
    problems = []
    try:
        targets = lora_lib.parse_targets(m.quantize_targets)
    except ValueError as e:
        return [str(e).replace("lora.targets", "model.quantize_targets")]
    unsupported = [t for t in targets if t not in QUANTIZABLE]
    if unsupported:
        problems.append(f"model.quantize_targets={m.quantize_targets!r}: {', '.join(unsupported)} cannot be quantised "
                        f"(the embedding stays in model.dtype); choose from {', '.join(QUANTIZABLE)} or all-linear")
    if not config.lora.enabled:
        problems.append("model.quantize=nf4 with lora.enabled=False: a 4-bit base cannot be fully fine-tuned (QLoRA "
                        "trains LoRA adapters over the frozen NF4 weights); set --config.lora.enabled=True, or "
                        "--config.model.quantize='' to fine-tune every weight in float")
    if "lm_head" in targets and config.data.add_tokens:
        problems.append("model.quantize_targets includes lm_head and data.add_tokens adds tokens, whose lm_head rows "
                        "are trained: leave lm_head out of model.quantize_targets")
    if config.lora.get("dora", False):  # DoRA's magnitude needs the float column norms of each kernel
        problems.append("model.quantize=nf4 with lora.dora=True is not supported: set --config.lora.dora=False "
                        "(plain LoRA over the NF4 base) or --config.model.quantize=''")
    return problems


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise one ConfigError listing every problem of `config` (values and combinations)."""
    check_known_keys(config)
    problems: list[str] = []

    def need(ok: bool, message: str):
        if not ok:
            problems.append(message)

    m, lo, d, o, t = config.model, config.lora, config.data, config.optim, config.train
    need(bool(m.path), "model.path is empty: set it to an HF folder, a hub id or smollm2-135m-instruct")
    need(m.dtype in DTYPES, f"model.dtype={m.dtype!r}: choose one of {', '.join(DTYPES)}")
    need(m.compute_dtype in DTYPES, f"model.compute_dtype={m.compute_dtype!r}: choose one of {', '.join(DTYPES)}")
    need(m.remat in REMAT_POLICIES, f"model.remat={m.remat!r}: choose one of {', '.join(REMAT_POLICIES)}")
    problems.extend(_quantize_problems(config))
    if lo.enabled:
        try:
            lora_lib.lora_config(lo.rank, lo.alpha, lo.dropout, lo.targets, lo.rslora, lo.dora)
        except ValueError as e:
            problems.append(str(e))
        need(lo.alpha > 0, f"lora.alpha={lo.alpha}: must be > 0")
    problems.extend(_lora_variant_problems(lo))
    need(bool(d.train), "data.train is empty: give a JSONL file, hf:NAME:SPLIT or task:NAME")
    need(data_lib.format_name(d.format) is not None,
         f"data.format={d.format!r}: choose one of {', '.join(data_lib.FORMATS)}")
    need(d.template in ("auto", "none") or data_lib.is_jinja_template(d.template),
         f"data.template={d.template!r}: choose auto (the tokenizer's chat template), none (raw text) "
         f"or a Jinja chat template string")
    problems.extend(_task_problems(config))
    need(d.max_len >= MIN_MAX_LEN, f"data.max_len={d.max_len}: must be at least {MIN_MAX_LEN} tokens")
    need(o.lr > 0, f"optim.lr={o.lr}: the learning rate must be > 0")
    need(o.schedule in SCHEDULES, f"optim.schedule={o.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    need(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps}: must be >= 0")
    need(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio}: must be in [0, 1]")
    need(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay}: must be >= 0")
    need(o.clip_norm >= 0, f"optim.clip_norm={o.clip_norm}: must be >= 0 (0 = off)")
    need(o.grad_accum >= 1, f"optim.grad_accum={o.grad_accum}: must be >= 1")
    need(t.batch_size >= 1, f"train.batch_size={t.batch_size}: must be >= 1")
    need(t.steps >= 1 or t.epochs > 0, "train.steps must be >= 1 (or set train.epochs > 0)")
    if o.grad_accum >= 1 and t.batch_size % o.grad_accum:
        problems.append(f"train.batch_size={t.batch_size} is not divisible by optim.grad_accum={o.grad_accum}: "
                        f"each micro-batch must hold the same number of rows")
    try:
        mesh = parse_mesh_shape(config.mesh.shape)
    except ConfigError as e:
        problems.append(str(e))
        mesh = None
    if mesh is not None:
        problems.extend(_mesh_problems(mesh, num_devices, t.batch_size // max(o.grad_accum, 1), max(o.grad_accum, 1)))
    need(config.checkpoint.every >= 0, f"checkpoint.every={config.checkpoint.every}: must be >= 0")
    need(config.checkpoint.keep >= 1, f"checkpoint.keep={config.checkpoint.keep}: must be >= 1")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _lora_variant_problems(lo: ml_collections.ConfigDict) -> list[str]:
    """DoRA / LoRA+ settings and the combinations they do not support."""
    problems = []
    if lo.plus_ratio < 0:
        problems.append(f"lora.plus_ratio={lo.plus_ratio}: must be >= 0 (0 = off; the LoRA+ paper uses 16)")
    if lo.plus_lr_embedding <= 0:
        problems.append(f"lora.plus_lr_embedding={lo.plus_lr_embedding}: must be > 0 (PEFT's default is 1e-6)")
    if not lo.enabled:
        if lo.dora:
            problems.append("lora.dora=True with lora.enabled=False: DoRA is a LoRA adapter and full fine-tuning "
                            "has none; set --config.lora.enabled=true or --config.lora.dora=false")
        if lo.plus_ratio > 0:
            problems.append(f"lora.plus_ratio={lo.plus_ratio} with lora.enabled=False: LoRA+ sets the lr of the "
                            f"adapters' B matrices and full fine-tuning has none; set --config.lora.enabled=true "
                            f"or --config.lora.plus_ratio=0")
    return problems


def _mesh_problems(mesh: tuple[int, int, int], num_devices: int | None, micro_batch: int,
                   grad_accum: int = 1) -> list[str]:
    problems = []
    if sum(1 for s in mesh if s == -1) > 1 or any(s == 0 or s < -1 for s in mesh):
        return [f"mesh.shape={mesh}: sizes must be >= 1, with at most one -1"]
    if num_devices is None:
        return problems
    fixed = 1
    for s in mesh:
        fixed *= s if s != -1 else 1
    if num_devices % fixed or (-1 not in mesh and fixed != num_devices):
        problems.append(f"mesh.shape={','.join(map(str, mesh))} needs {fixed} devices but {num_devices} are "
                        f"available: try --config.mesh.shape=1,{num_devices},1 (FSDP) or "
                        f"{num_devices},1,1 (data parallel)")
        return problems
    sizes = [s if s != -1 else num_devices // fixed for s in mesh]
    batch_shards = sizes[0] * sizes[1]
    if micro_batch % batch_shards:
        problems.append(f"the micro-batch of {micro_batch} rows (train.batch_size / optim.grad_accum) cannot be "
                        f"split over data x fsdp = {batch_shards} devices: make it a multiple of {batch_shards} "
                        f"(e.g. --config.train.batch_size={batch_shards * grad_accum})")
    return problems


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    """A saved config.json -> ConfigDict on top of the current schema (new keys keep defaults)."""
    config = base_config()
    config.update_from_flattened_dict(flatten(json.loads(text)))
    return config


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing for the commands (`app.run(main, flags_parser=parse_flags)`), with one clear
    error (exit 2) for an unknown or ill-typed --config.KEY override."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        problems = [unknown_key_problem(arg[len("--config."):].split("=", 1)[0], arg)
                    for arg in argv[1:] if arg.startswith("--config.")]
        problems = [p for p in problems if p]
        message = "\n".join(problems) or f"bad command line: {str(e).strip(chr(39))}"
        print(f"error: {message}\nSee configs/*.py and jaxtune/config.py for every key.", file=sys.stderr)
        sys.exit(2)
