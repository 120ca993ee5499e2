"""KV-cache text generation: batched greedy / sampled decoding, compiled end to end; the CLI.

This module owns decoding for every Llama-family model jaxtune loads:

    python -m jaxtune.generate --model=smollm2-135m-instruct \
        --prompt="What is the capital of France?" --max_new_tokens=32 [--temperature=0] [--top_p=1] \
        [--top_k=0] [--seed=0] [--template=auto|none|JINJA | --raw] [--dtype=float32] \
        [--adapter=WORKDIR|PEFT_DIR]

prints the completion. The prompt is rendered as the model was trained (`prompt_ids`, the one owner of
prompt rendering, which evaluate and train's task scores use too): with a jaxtune run's
data.template (from its config.json: the tokenizer's chat template for `auto`, raw text for `none`,
or its Jinja template), else with the tokenizer's chat template; --template overrides that and --raw
is --template=none. Many adapters over one base, batched together (jaxtune.multi_adapter; each JSONL
row {"adapter": NAME or null, "prompt": "..."} or {"adapter": ..., "messages": [...]}, written back with
its "completion"; each row rendered with its adapter's template, the base's rows with the chat template):

    python -m jaxtune.generate --model=BASE --adapters=NAME=DIR[,NAME=DIR...] --prompts=FILE.jsonl \
        [--out=FILE.jsonl] [--batch_size=32]

From Python:

    from jaxtune import api
    model = api.load("smollm2-135m-instruct")
    api.generate_text(model, ["What is the capital of France?"], max_new_tokens=32)   # -> [str]
    generate(model, [[ids...], [ids...]], max_new_tokens=32)                          # -> [[int]]

How a batch is laid out. Prompts of different lengths are left-padded into a length bucket P (a power
of two from 32 up to 256, then multiples of 256), and `max_new_tokens` is rounded up the same way to
N, so one compiled program serves every request of the same (batch, P, N, sampling settings). The KV
cache has P + N slots: slot s < P holds prompt token s of the padded row, slot P + i generated token
i. Pad slots carry segment id 0 and are never attended to; real tokens carry segment 1. Positions
count real tokens only, so left padding does not shift RoPE: a row of n prompt tokens gets positions
0..n-1 and its i-th new token is fed at position n + i.

One jitted function per bucket runs the prefill and then the whole decode loop as a
`jax.lax.while_loop` (stopping when every row has produced an EOS or after `max_new_tokens`), so
decoding is never bound by Python overhead. The prefill (the model's scan over stacked layers) writes
every prompt slot but the last and computes no logits; the last prompt slot is the first decode step.
Decode steps run the layers unrolled (`Llama(unroll_layers=True)`) over per-layer weights (zero-copy
views on CPU) and per-layer caches (k/v rows = (batch row, kv head) pairs, `unstack_cache`) updated in
place, so a step reads each weight and cache once and copies neither. The CLI keeps compiled programs in <jaxtune cache>/xla across runs.

Greedy decoding takes the argmax; sampling divides the
logits by the temperature, keeps the top-k (if k > 0) and the smallest top-p nucleus, and draws with
`jax.random.categorical` from `jax.random.key(seed)` folded with the step number: the same seed,
prompts and settings give the same tokens.

Returned token ids exclude the prompt and stop *before* the first EOS (the EOS itself is not returned);
the text is the decoded ids with special tokens skipped. EOS ids default to the model folder's
generation_config.json (else config.json) `eos_token_id`, plus the tokenizer's eos token.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxtune
from jaxtune import config as config_lib
from jaxtune import data as data_lib
from jaxtune.errors import JaxtuneError
from jaxtune.loading import adapter_template, base_model_path, load, load_for_inference
from jaxtune.multi_adapter import AdapterBank, parse_adapter_specs
from jaxtune.smollm2 import default_cache_dir
from jaxtune.models.llama import Llama, LoRAConfig, ModelConfig, init_cache, unstack_cache, unstack_layers

MIN_BUCKET = 32
POWER_OF_TWO_UP_TO = 256


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Token selection. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# --------------------------------------------------------------------------------------------
# Shapes and host-side layout


def bucket_length(n: int) -> int:
    """Compile bucket for a length: a power of two in [32, 256], then a multiple of 256."""
    if n <= POWER_OF_TWO_UP_TO:
        return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
    return -(-n // POWER_OF_TWO_UP_TO) * POWER_OF_TWO_UP_TO


def left_pad(prompts: Sequence[Sequence[int]], width: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> (tokens [B, width] int32, segments [B, width] int32: 1 real, 0 left padding)."""
    tokens_BxP = np.full((len(prompts), width), pad_id, np.int32)
    segments_BxP = np.zeros((len(prompts), width), np.int32)
    for i, row in enumerate(prompts):
        if len(row):
            tokens_BxP[i, width - len(row):] = row
            segments_BxP[i, width - len(row):] = 1
    return tokens_BxP, segments_BxP


def cut_at_eos(row: Sequence[int], eos_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """The first max_new_tokens ids of a generated row, stopping before the first EOS."""
    out = []
    for token in list(row)[:max_new_tokens]:
        if token in eos_ids:
            break
        out.append(int(token))
    return out


def default_eos_ids(model) -> tuple[int, ...]:
    """EOS ids as HF generate would use them: generation_config.json, else config.json, + tokenizer's."""
    ids: list[int] = []
    folder = pathlib.Path(model.folder) if getattr(model, "folder", None) else None
    for name in ("generation_config.json", "config.json"):
        if folder is not None and (folder / name).exists():
            value = json.loads((folder / name).read_text()).get("eos_token_id")
            if value is not None:
                ids += value if isinstance(value, list) else [value]
                break
    tokenizer_eos = getattr(model.tokenizer, "eos_token_id", None) if model.tokenizer is not None else None
    if tokenizer_eos is not None:
        ids.append(tokenizer_eos)
    return tuple(dict.fromkeys(int(i) for i in ids))


# --------------------------------------------------------------------------------------------
# Device side: prefill, one decode step, token selection, the compiled loop


def prompt_positions(segments_BxP):
    """Positions of left-padded prompt slots: the count of real tokens before them (0 on padding)."""
    return jnp.maximum(jnp.cumsum(segments_BxP, axis=1) - 1, 0)


def prefill(params, cfg: ModelConfig, tokens_BxP, segments_BxP, cache_len: int):
    """Write all prompt slots but the last into a fresh stacked cache of cache_len slots.

    The last slot (a real token in every left-padded row) goes through `decode_step`, which yields the
    first next-token logits: the prefill itself needs no logits, so XLA drops its [B, P, V] head."""
    # The barrier keeps XLA from constant-folding attention over the empty cache at compile time.
    cache, start = jax.lax.optimization_barrier((init_cache(cfg, tokens_BxP.shape[0], cache_len), jnp.int32(0)))
    _, cache = Llama(cfg).apply({"params": params}, tokens_BxP[:, :-1], prompt_positions(segments_BxP)[:, :-1],
                                segments_BxP[:, :-1], cache=cache, cache_index=start)
    return cache


def per_layer_params(params, cfg: ModelConfig):
    """Stacked params -> the per-layer params of `decode_step`. Host (CPU) arrays are split into
    zero-copy views; accelerator arrays into slices (one copy, fast there)."""
    def split(leaf):
        devices = leaf.devices() if isinstance(leaf, jax.Array) else set()
        if len(devices) == 1 and next(iter(devices)).platform == "cpu":
            host = np.asarray(leaf)
            return [jax.device_put(host[i], next(iter(devices))) for i in range(cfg.num_layers)]
        return [leaf[i] for i in range(cfg.num_layers)]

    return unstack_layers(params, cfg.num_layers, split)


def decode_step(layer_params, cfg: ModelConfig, token_B, position_B, layer_caches, cache_index):
    """Feed one token per row at slot cache_index -> (next-token logits [B, V], updated caches).

    Takes per-layer params (`per_layer_params`) and caches (`unstack_cache`): the layers run unrolled,
    so no layer's weights are copied out of a stack on every step."""
    segments_Bx1 = jnp.ones_like(token_B)[:, None]
    logits_Bx1xV, layer_caches = Llama(cfg, unroll_layers=True).apply(
        {"params": layer_params}, token_B[:, None], position_B[:, None], segments_Bx1,
        cache=layer_caches, cache_index=cache_index)
    return logits_Bx1xV[:, 0], layer_caches


def filter_top_k(logits_BxV, k: int):
    """Keep the k largest logits of each row (ties at the k-th value kept too); others -> -inf."""
    kth_B1 = jax.lax.top_k(logits_BxV, k)[0][:, -1:]
    return jnp.where(logits_BxV < kth_B1, -jnp.inf, logits_BxV)


def filter_top_p(logits_BxV, top_p: float):
    """Keep the smallest set of most likely tokens whose probability reaches top_p; others -> -inf."""
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_B = jnp.maximum(jnp.sum(mass_before_BxV < top_p, axis=-1), 1)
    threshold_B1 = jnp.take_along_axis(sorted_BxV, kept_B[:, None] - 1, axis=-1)
    return jnp.where(logits_BxV < threshold_B1, -jnp.inf, logits_BxV)


def greedy_tokens(logits_BxV):
    """`jnp.argmax(logits_BxV, axis=-1)` as int32, the same index on ties (the first) and NaN (the first NaN),
    as a max and then a min over the indices that hold it: two plain reductions that XLA:CPU runs ~5x faster
    than argmax's (value, index) pair reduction (SmolLM2's 49152-token vocabulary at 64 rows: 2.7 vs
    13.8 ms, at 8 rows 0.27 vs 1.76 ms, one process, 2026-11-30, load 2.3-2.9)."""
    best_Bx1 = logits_BxV.max(axis=-1, keepdims=True)
    is_best_BxV = (logits_BxV == best_Bx1) | jnp.isnan(logits_BxV)
    vocab = logits_BxV.shape[-1]
    return jnp.min(jnp.where(is_best_BxV, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)


def select_tokens(logits_BxV, key, sampling: Sampling):
    """Next token per row: argmax when greedy, else a draw from the filtered, tempered distribution."""
    if sampling.greedy:
        return greedy_tokens(logits_BxV)
    logits_BxV = logits_BxV / sampling.temperature
    if sampling.top_k > 0:
        logits_BxV = filter_top_k(logits_BxV, min(sampling.top_k, logits_BxV.shape[-1]))
    if sampling.top_p < 1.0:
        logits_BxV = filter_top_p(logits_BxV, sampling.top_p)
    # jax.random.categorical's own draw (the argmax of the logits plus Gumbel noise from `key`: the same
    # noise, so the same tokens), its argmax taken by `greedy_tokens`.
    return greedy_tokens(jax.random.gumbel(key, logits_BxV.shape, logits_BxV.dtype) + logits_BxV)


def is_eos(token_B, eos_ids_E):
    return jnp.any(token_B[:, None] == eos_ids_E[None, :], axis=-1)


def first_token(params, layer_params, tokens_BxP, segments_BxP, eos_ids_E, seed, *, cfg: ModelConfig,
                cache_len: int, sampling: Sampling):
    """Prefill (stacked params) + the first decode step (per-layer params, the same weights)
    -> (decoding state, the first new token of each row [B]).

    The state (a dict of arrays: the rows' last token and its position, the cache slot it goes to, the
    per-layer caches, which rows are done, the step count and the seed) is what `decode_steps` continues
    from."""
    B, P = tokens_BxP.shape
    # The barrier materialises the per-layer caches once, before the loop (the loop updates them in place).
    cache = jax.lax.optimization_barrier(unstack_cache(prefill(params, cfg, tokens_BxP, segments_BxP, cache_len)))
    position_B = prompt_positions(segments_BxP)[:, -1]
    logits_BxV, cache = decode_step(layer_params, cfg, tokens_BxP[:, -1], position_B, cache, P - 1)
    token_B = select_tokens(logits_BxV, jax.random.fold_in(jax.random.key(seed), 0), sampling)
    state = {"step": jnp.int32(1), "slot": jnp.int32(P), "token": token_B, "position": position_B + 1,
             "cache": cache, "done": is_eos(token_B, eos_ids_E), "seed": seed}
    return state, token_B


def decode_steps(layer_params, state, eos_ids_E, max_new_tokens, *, cfg: ModelConfig, sampling: Sampling,
                 chunk: int):
    """Up to `chunk` more decode steps from `state`, stopping early at step max_new_tokens or when every
    row is done -> (state, the new tokens [B, chunk]: columns past the last step run hold EOS ids[0]).

    Rows that have emitted an EOS keep emitting EOS ids[0]. Step s (the s-th new token, from 0) draws
    with `jax.random.key(seed)` folded with s, so the tokens do not depend on how the steps are chunked."""
    B = state["token"].shape[0]
    filler = eos_ids_E[0]
    key = jax.random.key(state["seed"])
    first = state["step"]
    end = jnp.minimum(first + chunk, max_new_tokens)

    def keep_going(carry):
        state, _ = carry
        return (state["step"] < end) & ~jnp.all(state["done"])

    def step_fn(carry):
        state, out_BxC = carry
        step = state["step"]
        logits_BxV, cache = decode_step(layer_params, cfg, state["token"], state["position"], state["cache"],
                                        state["slot"])
        token_B = jnp.where(state["done"], filler, select_tokens(logits_BxV, jax.random.fold_in(key, step), sampling))
        out_BxC = jax.lax.dynamic_update_slice(out_BxC, token_B[:, None], (0, step - first))
        state = {**state, "step": step + 1, "slot": state["slot"] + 1, "token": token_B,
                 "position": state["position"] + 1, "cache": cache, "done": state["done"] | is_eos(token_B, eos_ids_E)}
        return state, out_BxC

    out_BxC = jnp.full((B, chunk), filler, jnp.int32)
    return jax.lax.while_loop(keep_going, step_fn, (state, out_BxC))


@functools.partial(jax.jit, static_argnames=("cfg", "new_bucket", "sampling"))
def generate_padded(params, layer_params, tokens_BxP, segments_BxP, eos_ids_E, max_new_tokens, seed, *,
                    cfg: ModelConfig, new_bucket: int, sampling: Sampling):
    """The whole decode as one compiled program: `first_token`, then `decode_steps` to the end
    -> (new tokens [B, new_bucket] int32, steps run); slots past the last step hold EOS ids[0]."""
    state, token_B = first_token(params, layer_params, tokens_BxP, segments_BxP, eos_ids_E, seed, cfg=cfg,
                                 cache_len=tokens_BxP.shape[1] + new_bucket, sampling=sampling)
    state, rest_BxN = decode_steps(layer_params, state, eos_ids_E, max_new_tokens, cfg=cfg, sampling=sampling,
                                   chunk=new_bucket - 1)
    return jnp.concatenate([token_B[:, None], rest_BxN], axis=1), state["step"]


# The same two halves compiled apart, for decoding chunk by chunk (`generate_chunks`): the state's
# caches are donated to each chunk, which updates them in place.
start_decoding = jax.jit(first_token, static_argnames=("cfg", "cache_len", "sampling"))
continue_decoding = jax.jit(decode_steps, static_argnames=("cfg", "sampling", "chunk"), donate_argnames=("state",))


# --------------------------------------------------------------------------------------------
# Public API


@dataclasses.dataclass(frozen=True)
class DecodeInputs:
    """The device inputs of one batch, shared by `generate` and `generate_chunks`."""

    cfg: ModelConfig
    params: dict
    layer_params: dict
    tokens_BxP: jax.Array
    segments_BxP: jax.Array
    eos: tuple[int, ...]
    eos_ids_E: jax.Array
    seed: jax.Array
    sampling: Sampling


def decode_inputs(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_p: float,
                  top_k: int, seed: int, eos_ids: Sequence[int] | None, params: dict | None,
                  lora: LoRAConfig | None) -> DecodeInputs:
    """Check a batch's arguments (see `generate`) and lay it out for the device."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = Sampling(float(temperature), float(top_p), int(top_k))
    eos = tuple(default_eos_ids(model) if eos_ids is None else eos_ids)
    cfg = model.cfg if lora is None else model.cfg.replace(lora=lora)
    tokens_BxP, segments_BxP = left_pad(prompts, bucket_length(max(len(p) for p in prompts)))
    params = model.params if params is None else params
    return DecodeInputs(cfg, params, per_layer_params(params, cfg), jnp.asarray(tokens_BxP), jnp.asarray(segments_BxP),
                        eos, jnp.asarray(eos or (-1,), jnp.int32), jnp.uint32(seed & 0xFFFFFFFF), sampling)


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_ids: Sequence[int] | None = None,
    params: dict | None = None,
    lora: LoRAConfig | None = None,
    top_k: int = 0,
) -> list[list[int]]:
    """Complete each prompt (token ids) -> new token ids per row, without the prompt and without EOS.

    model: a `loading.LoadedModel`. eos_ids: None = the model's defaults (`default_eos_ids`), [] = never
    stop early. params/lora: override the model's params (e.g. base + adapters) and LoRA settings."""
    if not prompts:
        return []
    inputs = decode_inputs(model, prompts, max_new_tokens, temperature, top_p, top_k, seed, eos_ids, params, lora)
    out_BxN, _ = generate_padded(
        inputs.params, inputs.layer_params, inputs.tokens_BxP, inputs.segments_BxP, inputs.eos_ids_E,
        jnp.int32(max_new_tokens), inputs.seed, cfg=inputs.cfg, new_bucket=bucket_length(max_new_tokens),
        sampling=inputs.sampling)
    return [cut_at_eos(row, inputs.eos, max_new_tokens) for row in np.asarray(out_BxN)]


def generate_chunks(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, chunk: int,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                    eos_ids: Sequence[int] | None = None, params: dict | None = None, lora: LoRAConfig | None = None,
                    top_k: int = 0) -> Iterator[np.ndarray]:
    """`generate`, handing out the new tokens as they are decoded: yields [B, k] int32 arrays (the first
    new token of every row, then up to `chunk` tokens at a time) that join to each row's tokens, EOS
    included; after its EOS a row holds EOS ids[0]. Stops after max_new_tokens, or once every row has
    emitted an EOS. The same tokens as `generate` for the same arguments, whatever `chunk` is.

    Two compiled programs serve every batch of a shape (`start_decoding`, `continue_decoding`); the
    next chunk is dispatched before the current one is handed out, so the device keeps decoding while
    the caller reads. Closing the generator early drops the rest."""
    if not prompts:
        return
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    inputs = decode_inputs(model, prompts, max_new_tokens, temperature, top_p, top_k, seed, eos_ids, params, lora)
    limit = jnp.int32(max_new_tokens)
    state, pending = start_decoding(inputs.params, inputs.layer_params, inputs.tokens_BxP, inputs.segments_BxP,
                                    inputs.eos_ids_E, inputs.seed, cfg=inputs.cfg,
                                    cache_len=inputs.tokens_BxP.shape[1] + bucket_length(max_new_tokens),
                                    sampling=inputs.sampling)
    pending = pending[:, None]
    handed_out = 0
    done_B = np.zeros(len(prompts), bool)
    while True:
        count = min(pending.shape[1], max_new_tokens - handed_out)
        if handed_out + count < max_new_tokens:  # more to decode: start it before reading this chunk
            state, upcoming = continue_decoding(inputs.layer_params, state, inputs.eos_ids_E, limit, cfg=inputs.cfg,
                                                sampling=inputs.sampling, chunk=chunk)
        tokens_BxK = np.asarray(pending)[:, :count]
        yield tokens_BxK
        handed_out += count
        done_B |= np.isin(tokens_BxK, inputs.eos).any(axis=1)
        if handed_out >= max_new_tokens or done_B.all():
            return
        pending = upcoming


def prompt_template(tokenizer, template: str, needed_by: str, fix: str) -> str | None:
    """The chat template that renders prompts as training rendered conversations (None: raw text).

    template is data.template ('auto', 'none' or a Jinja template). 'auto' with a tokenizer that has
    no chat template raises a ConfigError naming `needed_by` (what needs prompts) and `fix`."""
    if template == "auto" and not getattr(tokenizer, "chat_template", None):
        raise config_lib.ConfigError(
            f"{needed_by} prompts the model with conversations, but the tokenizer has no chat template and "
            f"data.template is auto: {fix}")
    return data_lib.resolve_chat_template(tokenizer, template)


def prompt_ids(tokenizer, prompts: Sequence[str] | Sequence[Sequence[dict]], template: str = "auto"
               ) -> list[list[int]]:
    """Token ids of prompts (a user message each, or message lists) followed by what starts an answer,
    exactly as training with data.template=`template` tokenized the same conversation before its
    assistant turn: the rendered chat template with its generation prompt, or (template 'none') the
    raw contents after the tokenizer's leading special tokens (BOS). The one place prompts are
    rendered: generate, evaluate, train's task scores and serve's chat all come here."""
    chat_template = prompt_template(tokenizer, template, "generation", "set the template to none or to a "
                                    "Jinja chat template")
    conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    if chat_template is None:
        leading = data_lib.leading_special_ids(tokenizer)
        return [data_lib.raw_chat_ids(c, tokenizer, leading, False, "prompt")[0].tolist() for c in conversations]
    texts = [data_lib.render(tokenizer, chat_template, c, True, "prompt") for c in conversations]
    return data_lib.encode_many(tokenizer, texts)


def generate_text(
    model,
    prompts: Sequence[str] | Sequence[Sequence[dict]],
    max_new_tokens: int,
    template: str = "auto",
    **kwargs: Any,
) -> list[str]:
    """Complete texts or chats -> the generated text per prompt (special tokens skipped).

    Strings are single user messages, message lists ([{'role': ..., 'content': ...}, ...]) whole
    conversations, both rendered with `template` (see prompt_ids): 'auto' (the tokenizer's chat
    template), 'none' (raw text) or a Jinja chat template. kwargs: see `generate`."""
    if model.tokenizer is None:
        raise ValueError("generate_text needs the model's tokenizer: load it with with_tokenizer=True")
    ids = generate(model, prompt_ids(model.tokenizer, prompts, template), max_new_tokens, **kwargs)
    return [model.tokenizer.decode(row, skip_special_tokens=True) for row in ids]


def generate_with_adapters(model, bank: AdapterBank, prompts: Sequence[Sequence[int]],
                           adapters: Sequence[str | None], max_new_tokens: int, **kwargs: Any) -> list[list[int]]:
    """`generate` with one adapter of `bank` per prompt (None = the base model), all in one batch.

    The rows' adapter slots are an input of the compiled program (`AdapterBank.params`), so every
    mix of adapters in a batch of the same shape runs the same program. kwargs: see `generate`."""
    if len(adapters) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapter names")
    return generate(model, prompts, max_new_tokens, params=bank.params(model.params, bank.rows(adapters)), **kwargs)


# --------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxtune.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="built-in alias, HF model folder or hub id (default with --adapter: "
                                            "the run's model.path / the adapter's base model)")
    parser.add_argument("--adapter", help="a jaxtune workdir (its last checkpoint) or a PEFT adapter folder")
    parser.add_argument("--adapters", help="NAME=DIR[,NAME=DIR...]: several adapters over one base, batched "
                                           "together; each --prompts row names its adapter (or null = the base)")
    parser.add_argument("--prompt", help="user message (or raw text with --raw)")
    parser.add_argument("--prompts", help='JSONL file, one {"adapter": NAME or null, "prompt": "..."} '
                                          '(or "messages": [...]) per line')
    parser.add_argument("--out", help="with --prompts: write the rows plus \"completion\" here (default: stdout)")
    parser.add_argument("--batch_size", type=int, default=32, help="with --prompts: rows per batch")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="0 = no top-k filter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template", help="how prompts are rendered: auto (the tokenizer's chat template), none "
                        "(raw text) or a Jinja chat template; default: a jaxtune run's data.template, else auto")
    parser.add_argument("--raw", action="store_true", help="raw text, no chat template: --template=none")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="param and compute dtype")
    args = parser.parse_args(argv)
    if not (args.model or args.adapter or args.adapters):
        parser.error("give --model, or --adapter=DIR (a jaxtune workdir or a PEFT adapter folder)")
    if (args.prompt is None) == (args.prompts is None):
        parser.error("give one of --prompt=TEXT and --prompts=FILE.jsonl")
    if args.adapters and args.adapter:
        parser.error("give --adapter=DIR (one adapter) or --adapters=NAME=DIR,... (several), not both")
    if args.adapters and args.prompt is not None:
        parser.error("--adapters goes with --prompts=FILE.jsonl, whose rows name their adapter")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.raw and args.template not in (None, "none"):
        parser.error(f"--raw is --template=none: drop one of --raw and --template={args.template}")
    if args.raw:
        args.template = "none"
    return args


TEMPLATE_FIX = "pass --raw (or --template=none) for raw text, or --template=JINJA with the model's chat template"


def check_templates(tokenizer, templates: Iterable[str]) -> None:
    """Every one of `templates` can render prompts with `tokenizer`, or one ConfigError naming the
    fix, before anything is generated."""
    for template in set(templates):
        prompt_template(tokenizer, template, "python -m jaxtune.generate", TEMPLATE_FIX)


class PromptsError(JaxtuneError, ValueError):
    """A --prompts file row is not usable; the message names the file and line."""


def read_prompt_rows(path: str | pathlib.Path, adapters: Sequence[str] = ()) -> list[dict]:
    """The rows of a --prompts JSONL file, each checked: "prompt" (text) or "messages" (a list), and
    "adapter" absent, null or one of `adapters`."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptsError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
                raise PromptsError(f'{where}: a row is an object with "prompt" (text) or "messages" (a list), '
                                   f"one of them")
            if not isinstance(row.get("prompt", ""), str) or not isinstance(row.get("messages", []), list):
                raise PromptsError(f'{where}: "prompt" must be a string and "messages" a list of messages')
            adapter = row.get("adapter")
            if adapter is not None and adapter not in adapters:
                raise PromptsError(f"{where}: adapter {adapter!r} is not one of --adapters "
                                   f"({', '.join(adapters) or 'none given'}); null = the base model")
            rows.append(row)
    return rows


def complete_rows(model, rows: Sequence[dict], max_new_tokens: int, templates: dict, batch_size: int,
                  bank: AdapterBank | None = None, **kwargs: Any) -> list[dict]:
    """Each row plus its "completion", `batch_size` rows per batch, each row with its adapter
    (through `bank`) or the base model (or, without a bank, kwargs' params), its prompt rendered with
    templates[its adapter name, or None for the base]."""
    check_templates(model.tokenizer, [templates[row.get("adapter")] for row in rows])
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids = [prompt_ids(model.tokenizer, [row["messages"] if "messages" in row else row["prompt"]],
                          templates[row.get("adapter")])[0] for row in chunk]
        if bank is None:
            new_ids = generate(model, ids, max_new_tokens, **kwargs)
        else:
            new_ids = generate_with_adapters(model, bank, ids, [row.get("adapter") for row in chunk], max_new_tokens,
                                             **kwargs)
        out += [{**row, "completion": model.tokenizer.decode(row_ids, skip_special_tokens=True)}
                for row, row_ids in zip(chunk, new_ids)]
    return out


def run_prompts_file(args: argparse.Namespace) -> list[dict]:
    """--prompts (with --adapters, --adapter or the base model alone) -> the completed rows."""
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.adapters:
        dirs = parse_adapter_specs(args.adapters)
        rows = read_prompt_rows(args.prompts, list(dirs))
        model = load(base_model_path(args.model, next(iter(dirs.values()))), param_dtype=args.dtype,
                     compute_dtype=args.dtype)
        bank = AdapterBank.from_dirs(model.cfg, dirs)
        templates = {name: args.template or adapter_template(d) for name, d in {None: None, **dirs}.items()}
        return complete_rows(model, rows, args.max_new_tokens, templates, args.batch_size, bank=bank, **sampling)
    rows = read_prompt_rows(args.prompts)
    model, params, lora = load_for_inference(args.model, args.adapter, args.dtype)
    templates = {None: args.template or adapter_template(args.adapter)}
    return complete_rows(model, rows, args.max_new_tokens, templates, args.batch_size, params=params, lora=lora,
                         **sampling)


def write_rows(rows: Sequence[dict], out: str | None) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if out:
        pathlib.Path(out).write_text(text)
    else:
        sys.stdout.write(text)


def enable_compilation_cache() -> None:
    """Keep compiled programs across CLI runs in <jaxtune cache>/xla: a repeat run of the same shapes
    skips the ~10 s compile of the unrolled decode loop (measured on the 135M model, 2 CPU cores)."""
    jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "xla"))


def main(argv: Sequence[str] | None = None) -> None:
    jaxtune.setup_logging()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.prompts is not None:
            write_rows(run_prompts_file(args), args.out)
            return
        model, params, lora = load_for_inference(args.model, args.adapter, args.dtype)
        template = args.template or adapter_template(args.adapter)
        check_templates(model.tokenizer, [template])
        [text] = generate_text(model, [args.prompt], args.max_new_tokens, template=template,
                               temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                               params=params, lora=lora)
    except JaxtuneError as e:  # the user can fix it: one message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(text)


if __name__ == "__main__":
    enable_compilation_cache()  # command line only: main() called in-process leaves JAX's settings alone
    main()
