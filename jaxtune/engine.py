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

Each row stops at its own max_tokens, at EOS, or before the first of its `stop` strings. Adapters are
loaded (files read outside the lock) and unloaded between batches; `stats()` reports the batch sizes.
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
from collections.abc import Sequence

from jaxtune.errors import JaxtuneError
from jaxtune.generate import Sampling, generate
from jaxtune.multi_adapter import AdapterBank, AdapterError, read_adapter

log = logging.getLogger("jaxtune.engine")

RECENT_BATCHES = 64


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
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)

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


def padded_batch_size(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class Engine:
    """The batching engine; `start()` runs its thread, `stop()` ends it (pending requests fail)."""

    def __init__(self, model, bank: AdapterBank, *, max_batch: int = 32, window_s: float = 0.01,
                 max_queue: int = 256):
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError(f"max_batch {max_batch} and max_queue {max_queue} must be >= 1, window_s >= 0")
        self.model, self.bank = model, bank
        self.max_batch, self.window_s = max_batch, window_s
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
        with self.lock:
            self.bank.add(name, adapters, lora_cfg, path=str(path))

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            self.bank.remove(name)

    def stats(self) -> dict:
        with self.lock:
            return {"requests_done": self.requests_done, "tokens_generated": self.tokens_generated,
                    "queue_depth": self.queue.qsize(), "max_queue": self.queue.maxsize,
                    "max_batch": self.max_batch, "batch_window_ms": self.window_s * 1e3,
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
            rows = self.bank.rows([r.adapter for r in padded])
            params = self.bank.params(self.model.params, rows)
            first = runnable[0]
            seed = first.seed if first.seed is not None else random.getrandbits(31)
            sampling = Sampling(first.temperature, first.top_p)
            started = time.perf_counter()
            new_ids = generate(self.model, [list(r.prompt_ids) for r in padded], max(r.max_tokens for r in runnable),
                               temperature=sampling.temperature, top_p=sampling.top_p, seed=seed, params=params)
            seconds = time.perf_counter() - started
            results = [self._result(request, ids) for request, ids in zip(runnable, new_ids)]
            self.batch_sizes[len(runnable)] += 1
            self.recent.append({"size": len(runnable), "padded_to": len(padded),
                                "adapters": sorted({r.adapter or "" for r in runnable}),
                                "new_tokens": sum(len(res.token_ids) for res in results), "seconds": round(seconds, 4)})
            self.requests_done += len(runnable)
            self.tokens_generated += sum(len(res.token_ids) for res in results)
        for request, result in zip(runnable, results):
            request.future.set_result(result)

    def _result(self, request: Request, ids: list[int]) -> Result:
        token_ids = ids[:request.max_tokens]
        finish = "length" if len(token_ids) == request.max_tokens else "stop"
        tokenizer = self.model.tokenizer
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, request.stop)
        if stopped:  # the tokens up to the stop string (the shortest prefix whose text holds `text`)
            finish = "stop"
            kept = next(k for k in range(len(token_ids) + 1)
                        if tokenizer.decode(token_ids[:k], skip_special_tokens=True).startswith(text))
            token_ids = token_ids[:kept]
        return Result(token_ids, text, finish, len(request.prompt_ids))

