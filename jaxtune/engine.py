"""The serving engine: one background thread that owns the model, the adapter bank and the device.

    engine = Engine(model, bank, max_batch=32, window_s=0.01, max_queue=256)
    engine.start()
    future = engine.submit(Request(prompt_ids, adapter="sql", max_tokens=64))   # QueueFull when full
    result = future.result()          # Result(token_ids, text, finish_reason, prompt_tokens)

Requests wait in a bounded queue. The engine thread takes the first one, keeps collecting for
`window_s` (or until `max_batch` requests), and runs them as batches across adapters: each row
names its adapter slot (`jaxtune.multi_adapter`), so requests for different adapters share one
batch and one compiled program. Rows of one batch share the token-selection settings (greedy, or
temperature/top_p and a seed), which are compile-time constants of the decode loop: requests with
different settings run as separate batches of the same cycle. The batch size is padded to a power
of two (repeating the first row; the copies' output is dropped) so a handful of programs serves
every number of requests.

A batch decodes in compiled chunks of `chunk_tokens` steps (`generate.generate_chunks`: two programs
per batch shape, the KV cache carried from chunk to chunk in place). After each chunk the engine reads
the new tokens of every row: a row stops at its own max_tokens, at EOS, or before the first of its
`stop` strings, and its future is resolved then, not when the batch's longest row ends; a request with
`on_text` (a stream) gets its new text after every chunk (held back while it could still be the start
of a stop string, or is half of a multi-byte character). The batch ends when every row has stopped.
Adapters are loaded (files read outside the lock) and unloaded between batches, each with the chat
template its prompts are rendered with (a jaxtune run's data.template, read once when it is loaded);
`stats()` reports the batch sizes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import pathlib
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence

from jaxtune.errors import JaxtuneError
from jaxtune.generate import Sampling, default_eos_ids, generate_chunks
from jaxtune.loading import adapter_template
from jaxtune.multi_adapter import AdapterBank, AdapterError, read_adapter

log = logging.getLogger("jaxtune.engine")

RECENT_BATCHES = 64
CHUNK_TOKENS = 8  # decode steps per compiled call: a stream's text arrives this many tokens at a time


class QueueFull(JaxtuneError):
    """The request queue is full: the client should retry later (HTTP 429)."""


class EngineStopped(JaxtuneError):
    """The engine stopped before the request ran (HTTP 503)."""


@dataclasses.dataclass
class Request:
    """One completion: prompt token ids, the adapter (None = the base) and its generation settings."""

    prompt_ids: Sequence[int]
    adapter: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None  # streaming: called (engine thread) with each new piece of text
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    abandoned: bool = False  # set by the caller when nobody waits any more: the row stops at the next chunk

    def batch_key(self) -> tuple:
        """Requests with equal keys can share a batch: the same token selection (and seed when sampling)."""
        if self.temperature == 0.0:
            return (0.0, 1.0, None)
        return (self.temperature, self.top_p, self.seed)


@dataclasses.dataclass(frozen=True)
class Result:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """text before the first occurrence of any stop string -> (text, whether one was found)."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (not to stream yet)."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def template_of_folder(path: str) -> str:
    """`loading.adapter_template` of an adapter's folder ('auto' for an adapter added without one)."""
    return adapter_template(path) if path else "auto"


def padded_batch_size(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class Progress:
    """One request's row while its batch decodes: its tokens, its text so far, what was streamed.

    The text is decoded incrementally, as vLLM does: each time, only the tokens from `prefix_offset` on
    are decoded, and the text past that of the already-read tokens (`read_offset`) is appended, unless
    it ends in half a multi-byte character (then it waits for the next tokens)."""

    def __init__(self, request: Request, tokenizer, eos_ids: Sequence[int]):
        self.request, self.tokenizer, self.eos_ids = request, tokenizer, frozenset(eos_ids)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None  # "stop" (EOS, a stop string) or "length"
        self.text = self.sent = ""
        self.prefix_offset = self.read_offset = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.request.abandoned

    def add(self, tokens: Sequence[int]) -> None:
        """The row's next tokens (from one decoded chunk): stop at EOS / max_tokens / a stop string,
        stream the new text."""
        for token in tokens:
            if self.finished:
                break
            if token in self.eos_ids:
                self.finish_reason = "stop"
            else:
                self.token_ids.append(int(token))
                if len(self.token_ids) >= self.request.max_tokens:
                    self.finish_reason = "length"
        if not (self.request.stop or self.request.on_text):
            return
        self._read_text()
        if cut_at_stop(self.text, self.request.stop)[1]:
            self.finish_reason = "stop"
        elif self.request.on_text is not None and self.finish_reason is None:
            self._stream(self.text[:len(self.text) - held_back(self.text, self.request.stop)])

    def result(self) -> Result:
        """The final Result (text cut before a stop string, tokens up to it); a stream gets its last piece."""
        token_ids = self.token_ids
        text, stopped = cut_at_stop(self.tokenizer.decode(token_ids, skip_special_tokens=True), self.request.stop)
        if stopped:  # the tokens up to the stop string (the shortest prefix whose text holds `text`)
            token_ids = token_ids[:next(k for k in range(len(token_ids) + 1) if self.tokenizer.decode(
                token_ids[:k], skip_special_tokens=True).startswith(text))]
        if self.request.on_text is not None:
            self._stream(text)
        finish = "stop" if stopped else self.finish_reason or "stop"  # None: abandoned
        return Result(token_ids, text, finish, len(self.request.prompt_ids))

    def _read_text(self) -> None:
        ids = self.token_ids
        before = self.tokenizer.decode(ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        now = self.tokenizer.decode(ids[self.prefix_offset:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)

    def _stream(self, text: str) -> None:
        """Send the part of `text` past what was sent. (A tokenizer whose decoded text changes behind the
        streamed part cannot be streamed exactly: not the case of byte-level BPE; the Result stays right.)"""
        if not text.startswith(self.sent):
            log.warning("stream of %d tokens: the text changed before the streamed part", len(self.token_ids))
        elif len(text) > len(self.sent):
            self.request.on_text(text[len(self.sent):])
            self.sent = text


class Engine:
    """The batching engine; `start()` runs its thread, `stop()` ends it (pending requests fail)."""

    def __init__(self, model, bank: AdapterBank, *, max_batch: int = 32, window_s: float = 0.01,
                 max_queue: int = 256, chunk_tokens: int = CHUNK_TOKENS):
        if max_batch < 1 or max_queue < 1 or chunk_tokens < 1 or window_s < 0:
            raise ValueError(f"max_batch {max_batch}, max_queue {max_queue} and chunk_tokens {chunk_tokens} must be "
                             f">= 1, window_s >= 0")
        self.model, self.bank = model, bank
        # data.template of each loaded adapter (read from its folder once, here or in load_adapter)
        self.templates = {name: template_of_folder(path) for name, path in bank.paths.items()}
        self.max_batch, self.window_s, self.chunk_tokens = max_batch, window_s, chunk_tokens
        self.eos_ids = default_eos_ids(model)
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.lock = threading.Lock()  # held while a batch runs or the bank changes
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.recent: collections.deque[dict] = collections.deque(maxlen=RECENT_BATCHES)
        self.requests_done = 0
        self.tokens_generated = 0

    # ---- lifecycle

    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self._loop, name="jaxtune-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout)
        while True:  # whatever is still queued fails cleanly
            try:
                request = self.queue.get_nowait()
            except queue.Empty:
                break
            if not request.future.done():
                request.future.set_exception(EngineStopped("the server is shutting down"))

    # ---- requests

    def submit(self, request: Request) -> concurrent.futures.Future:
        if self.stopping.is_set():
            raise EngineStopped("the server is shutting down")
        try:
            self.queue.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self.queue.maxsize} requests are already waiting: retry later") from None
        return request.future

    def adapters(self) -> dict[str, str]:
        """Loaded adapters: name -> the folder they came from."""
        with self.lock:
            return dict(self.bank.paths)

    def load_adapter(self, name: str, path: str) -> None:
        """Read an adapter folder (PEFT or jaxtune run) and put it into a free slot of the bank."""
        if not pathlib.Path(path).is_dir():
            raise AdapterError(f"lora_path {path!r} is not a folder on the server")
        adapters, lora_cfg = read_adapter(path, self.bank.cfg)  # outside the lock: batches keep running
        template = template_of_folder(path)
        with self.lock:
            self.bank.add(name, adapters, lora_cfg, path=str(path))
            self.templates[name] = template

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            self.bank.remove(name)
            del self.templates[name]

    def template(self, adapter: str | None) -> str:
        """The data.template that chats for `adapter` are rendered with ('auto' for the base model, PEFT
        folders and an adapter unloaded meanwhile, whose request then fails as unknown)."""
        with self.lock:
            return self.templates.get(adapter, "auto") if adapter else "auto"

    def stats(self) -> dict:
        with self.lock:
            return {"requests_done": self.requests_done, "tokens_generated": self.tokens_generated,
                    "queue_depth": self.queue.qsize(), "max_queue": self.queue.maxsize,
                    "max_batch": self.max_batch, "batch_window_ms": self.window_s * 1e3,
                    "chunk_tokens": self.chunk_tokens,
                    "batches": sum(self.batch_sizes.values()),
                    "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                    "recent_batches": list(self.recent), "adapters": list(self.bank.names)}

    # ---- the thread

    def _collect(self) -> list[Request]:
        """The next requests: the first waiting one, plus whatever arrives within the window."""
        try:
            first = self.queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                batch.append(self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while not self.stopping.is_set():
            requests = self._collect()
            groups: dict[tuple, list[Request]] = {}
            for request in requests:
                groups.setdefault(request.batch_key(), []).append(request)
            for group in groups.values():
                try:
                    self._run_batch(group)
                except Exception as e:  # never lose the thread: fail this batch's requests, keep serving
                    log.exception("batch of %d failed", len(group))
                    for request in group:
                        if not request.future.done():
                            request.future.set_exception(e)

    def _run_batch(self, requests: list[Request]) -> None:
        with self.lock:
            runnable = []
            for request in requests:
                if not request.future.set_running_or_notify_cancel():  # the client went away
                    continue
                if request.adapter and request.adapter not in self.bank.slots:  # unloaded while it waited
                    request.future.set_exception(AdapterError(f"adapter {request.adapter!r} is not loaded"))
                else:
                    runnable.append(request)
            if not runnable:
                return
            padded = runnable + [runnable[0]] * (padded_batch_size(len(runnable)) - len(runnable))
            params = self.bank.params(self.model.params, self.bank.rows([r.adapter for r in padded]))
            first = runnable[0]
            seed = first.seed if first.seed is not None else random.getrandbits(31)
            sampling = Sampling(first.temperature, first.top_p)
            rows = [Progress(request, self.model.tokenizer, self.eos_ids) for request in runnable]
            started = time.perf_counter()
            chunks = generate_chunks(self.model, [list(r.prompt_ids) for r in padded], max(r.max_tokens for r in runnable),
                                     self.chunk_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                                     seed=seed, eos_ids=self.eos_ids, params=params)
            try:
                for tokens_BxK in chunks:
                    for row, tokens in zip(rows, tokens_BxK.tolist()):
                        if not row.request.future.done():
                            row.add(tokens)
                            if row.finished:  # answered now, not when the batch's longest row ends
                                row.request.future.set_result(row.result())
                    if all(row.request.future.done() for row in rows):
                        break
            finally:
                chunks.close()
            seconds = time.perf_counter() - started
            new_tokens = sum(len(row.token_ids) for row in rows)
            self.batch_sizes[len(runnable)] += 1
            self.recent.append({"size": len(runnable), "padded_to": len(padded),
                                "adapters": sorted({r.adapter or "" for r in runnable}),
                                "new_tokens": new_tokens, "seconds": round(seconds, 4)})
            self.requests_done += len(runnable)
            self.tokens_generated += new_tokens
