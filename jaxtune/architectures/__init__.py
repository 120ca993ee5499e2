"""Named model architectures without weights: the public config.json of popular models.

The planner (`python -m jaxtune.plan`) needs only shapes, so `model.path=arch:NAME` plans a model
that is not on this machine. Each folder holds exactly the config.json of the Hugging Face repo
named in `SOURCES` (base models; the instruct variants have the same shapes). There are no
weights and no tokenizer here: training, export or generation on an `arch:` name is refused by
`jaxtune.hf.resolve_model_dir` with a message saying what to pass instead.
"""

from __future__ import annotations

import pathlib

PREFIX = "arch:"
ROOT = pathlib.Path(__file__).parent

# name -> Hugging Face repo whose config.json the folder holds
SOURCES = {
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "mistral-7b": "mistralai/Mistral-7B-v0.3",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
}


def is_architecture(path: str) -> bool:
    return str(path).startswith(PREFIX)


def folder(path: str) -> pathlib.Path:
    """`arch:llama-3.1-8b` -> the bundled folder holding its config.json; ValueError naming the choices."""
    name = str(path)[len(PREFIX):].strip().lower()
    if name not in SOURCES:
        raise ValueError(f"model.path={path!r}: unknown architecture; bundled ones are "
                         + ", ".join(PREFIX + n for n in SOURCES))
    return ROOT / name


def source_repo(path: str) -> str:
    return SOURCES[str(path)[len(PREFIX):].strip().lower()]
