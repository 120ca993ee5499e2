"""`python -m jaxtune.serve`: an OpenAI-compatible HTTP server for one base model and many LoRA adapters.

    python -m jaxtune.serve --model=smollm2-135m-instruct --adapters=sql=runs/sql,chat=peft/chat \
        [--host=127.0.0.1 --port=8000] [--max_loras=8 --max_lora_rank=16 --max_lora_columns=128] [--max_batch=32] \
        [--batch_window_ms=10] [--chunk_tokens=8] [--max_queue=256] [--max_model_len=N] [--default_max_tokens=256]

Like vLLM's `--lora-modules`: `model` in a request is an adapter's name or the base model's name
(--served_model_name, default --model). Endpoints:

    GET  /v1/models                    the base and each adapter
    POST /v1/completions               prompt (text, texts, token ids), max_tokens, temperature, top_p,
                                       seed, stop, stream (server-sent events)
    POST /v1/chat/completions          messages rendered as the adapter trained (a jaxtune run's
                                       data.template; else the tokenizer's chat template); same settings
    POST /v1/load_lora_adapter         {"lora_name": ..., "lora_path": ...}   (vLLM's names and bodies)
    POST /v1/unload_lora_adapter       {"lora_name": ...}
    GET  /v1/stats                     batch sizes, queue depth, requests and tokens served
    GET  /health

Requests that arrive together are batched across adapters by `jaxtune.engine` (its docstring says
how); this module only turns HTTP into engine requests and results into OpenAI's JSON. Bad requests
get OpenAI-style errors, `{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON,
a missing or wrong field, a prompt plus max_tokens over the context; 404 for an unknown model or
adapter; 429 when the queue is full; 503 while shutting down; 500 (logged) for a bug, and the server
keeps running. It binds to 127.0.0.1 unless --host says otherwise: it has no authentication.

Streams are incremental: the engine decodes in compiled chunks of --chunk_tokens steps and hands each
stream its new text after every chunk, so the events arrive while the batch is still decoding (text
that could be the start of a stop string waits until it is known not to be). An error before the
first event is an HTTP error status; one after it (the stream has begun with 200) is sent as an
`{"error": ...}` event. A client that hangs up stops its row at the next chunk.

fastapi and uvicorn are the `serve` extra: `pip install jaxtune[serve]`.
"""

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import jaxtune
from jaxtune.engine import CHUNK_TOKENS, Engine, EngineStopped, QueueFull, Request, Result
from jaxtune.errors import JaxtuneError, MissingPackageError
from jaxtune.generate import enable_compilation_cache, prompt_ids
from jaxtune.loading import base_model_path, load
from jaxtune.models.llama import LINEAR_TARGETS
from jaxtune.multi_adapter import AdapterBank, AdapterError, parse_adapter_specs, read_adapter

log = logging.getLogger("jaxtune.serve")


class ApiError(Exception):
    """An error answered as OpenAI's JSON error body with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# --------------------------------------------------------------------------------------------
# Request bodies -> engine requests (pure functions)


def parse_json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def number(body: dict, name: str, default: float, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise bad_request(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not low <= value <= high:
        raise bad_request(f"{name} must be in [{low}, {high}], got {value}", name)
    return value


def refuse_unsupported(body: dict) -> None:
    """Fields whose OpenAI meaning this server does not implement: refused, never silently ignored."""
    if number(body, "n", 1, 1, 1, integer=True) != 1 or number(body, "best_of", 1, 1, 1, integer=True) != 1:
        raise bad_request("n and best_of must be 1", "n")
    if body.get("logprobs") or body.get("top_logprobs") or body.get("echo") or body.get("tools") or body.get("suffix"):
        raise bad_request("logprobs, top_logprobs, echo, suffix and tools are not supported by jaxtune.serve")


def generation_settings(body: dict, default_max_tokens: int) -> dict:
    """max_tokens, temperature, top_p, seed, stop of a body (OpenAI's defaults: temperature 1, top_p 1)."""
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise bad_request("stop must be a string or a list of up to 4 strings", "stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return {"max_tokens": number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, 1, 1 << 30, integer=True),
            "temperature": float(number(body, "temperature", 1.0, 0.0, 2.0)),
            "top_p": float(number(body, "top_p", 1.0, 1e-9, 1.0)),
            "seed": number(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True),
            "stop": tuple(stop)}


def completion_prompts(body: dict, tokenizer) -> list[list[int]]:
    """`prompt`: a text, a list of texts, a list of token ids or a list of such lists -> token id rows."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise bad_request("prompt must be a text, a list of texts or a list of token ids", "prompt")
    rows = []
    for p in prompts:
        if isinstance(p, str):
            rows.append(tokenizer(p)["input_ids"])
        elif p and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < len(tokenizer) for t in p):
            rows.append(list(p))
        else:
            raise bad_request("a token-id prompt must be a non-empty list of ids in the vocabulary", "prompt")
    if any(not row for row in rows):
        raise bad_request("a prompt must hold at least one token", "prompt")
    return rows


def message_text(content: Any) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    raise bad_request("a message's content must be a string or a list of text parts", "messages")


def chat_prompt(body: dict, tokenizer, template: str = "auto") -> list[int]:
    """`messages` rendered as the adapter trained (`template`, a data.template value: 'auto' = the
    tokenizer's chat template, 'none' = raw text, or a Jinja template), with what starts an answer."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise bad_request("messages must be a non-empty list of {role, content} objects", "messages")
    normalised = [{"role": m["role"], "content": message_text(m.get("content", ""))} for m in messages]
    try:
        [ids] = prompt_ids(tokenizer, [normalised], template)
    except Exception as e:  # the template's own refusal (roles out of order, no template, ...)
        raise bad_request(f"the chat template refused these messages: {e}", "messages") from None
    return ids


# --------------------------------------------------------------------------------------------
# Results -> OpenAI's JSON


def usage(results: Sequence[Result]) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def completion_body(ids: dict, results: Sequence[Result]) -> dict:
    return {**ids, "object": "text_completion", "usage": usage(results),
            "choices": [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                        for i, r in enumerate(results)]}


def chat_body(ids: dict, result: Result) -> dict:
    return {**ids, "object": "chat.completion", "usage": usage([result]),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": result.finish_reason}]}


async def choice_events(first: tuple, events: asyncio.Queue, count: int) -> AsyncIterator[tuple[int, str | Result]]:
    """(choice index, new text) as the engine decodes, and (index, Result) once that choice has ended,
    until all `count` have ended; from `first` (already taken) and then the queue that
    `Server.stream` fills. A choice that failed raises its error, as an ApiError."""
    ended = 0
    index, item = first
    while True:
        if isinstance(item, str):
            yield index, item
        else:  # the request's future, done
            try:
                result = item.result()
            except Exception as e:
                error = api_error(e)
                if not isinstance(error, ApiError):  # a bug: logged, and sent as OpenAI's 500 body
                    log.error("stream failed: %s: %s", type(e).__name__, e, exc_info=e)
                    error = ApiError(500, f"internal error ({type(e).__name__}): the server logged it",
                                     type="server_error")
                raise error from None
            yield index, result
            ended += 1
            if ended == count:
                return
        index, item = await events.get()


async def completion_events(ids: dict, choices: AsyncIterator, include_usage: bool) -> AsyncIterator[str]:
    head = {**ids, "object": "text_completion"}
    results = []
    try:
        async for index, item in choices:
            if isinstance(item, str):
                yield sse({**head, "choices": [{"index": index, "text": item, "logprobs": None, "finish_reason": None}]})
            else:
                results.append(item)
                yield sse({**head, "choices": [{"index": index, "text": "", "logprobs": None,
                                                "finish_reason": item.finish_reason}]})
    except ApiError as e:  # the stream has started (status 200): the error travels as an event
        yield sse(e.body())
        return
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(results)})
    yield sse("[DONE]")


async def chat_events(ids: dict, choices: AsyncIterator, include_usage: bool) -> AsyncIterator[str]:
    head = {**ids, "object": "chat.completion.chunk"}
    choice = {"index": 0, "logprobs": None, "finish_reason": None}
    yield sse({**head, "choices": [{**choice, "delta": {"role": "assistant", "content": ""}}]})
    results = []
    try:
        async for _, item in choices:
            if isinstance(item, str):
                yield sse({**head, "choices": [{**choice, "delta": {"content": item}}]})
            else:
                results.append(item)
                yield sse({**head, "choices": [{**choice, "delta": {}, "finish_reason": item.finish_reason}]})
    except ApiError as e:
        yield sse(e.body())
        return
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(results)})
    yield sse("[DONE]")


def api_error(error: Exception) -> Exception:
    """The engine's refusals as HTTP errors (429 queue full, 503 stopping, 404 adapter unloaded); others as they are."""
    if isinstance(error, QueueFull):
        return ApiError(429, str(error), type="rate_limit_error", code="rate_limit_exceeded")
    if isinstance(error, EngineStopped):
        return ApiError(503, str(error), type="server_error")
    if isinstance(error, AdapterError):  # unloaded while the request waited
        return ApiError(404, str(error), param="model", code="model_not_found")
    return error


# --------------------------------------------------------------------------------------------
# The app


def server_stack():
    """(fastapi, uvicorn), or MissingPackageError naming the `serve` extra."""
    try:
        import fastapi
        import fastapi.concurrency
        import fastapi.exceptions
        import fastapi.responses
        import uvicorn
    except ImportError as e:
        raise MissingPackageError(e.name or "fastapi", "python -m jaxtune.serve (pip install 'jaxtune[serve]')",
                                  declared=False, cause=e) from e
    return fastapi, uvicorn


class Server:
    """What the endpoints share: the engine, the tokenizer, the names and limits."""

    def __init__(self, engine: Engine, base_name: str, max_model_len: int, default_max_tokens: int):
        self.engine, self.base_name = engine, base_name
        self.max_model_len, self.default_max_tokens = max_model_len, default_max_tokens
        self.tokenizer = engine.model.tokenizer
        self.created = int(time.time())

    def adapter_of(self, body: dict) -> str | None:
        """The adapter a request's `model` names (None = the base), or 404."""
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise bad_request("model is required: the base model's name or an adapter's (GET /v1/models)", "model")
        if name == self.base_name:
            return None
        if name in self.engine.adapters():
            return name
        raise ApiError(404, f"The model `{name}` does not exist (served: {', '.join(self.model_ids())})",
                       param="model", code="model_not_found")

    def template_of(self, body: dict) -> str:
        """The data.template the request's model renders chats with: a jaxtune run's own (as it trained),
        'auto' (the tokenizer's chat template) for the base model and PEFT folders; the engine read it
        when the adapter was loaded."""
        return self.engine.template(self.adapter_of(body))

    def model_ids(self) -> list[str]:
        return [self.base_name, *self.engine.adapters()]

    def models(self) -> dict:
        def card(name, root, parent):
            return {"id": name, "object": "model", "created": self.created, "owned_by": "jaxtune", "root": root,
                    "parent": parent, "max_model_len": self.max_model_len}
        return {"object": "list", "data": [card(self.base_name, self.base_name, None)] + [
            card(name, path, self.base_name) for name, path in self.engine.adapters().items()]}

    def requests(self, body: dict, prompts: list[list[int]]) -> list[Request]:
        adapter = self.adapter_of(body)
        refuse_unsupported(body)
        settings = generation_settings(body, self.default_max_tokens)
        for ids in prompts:
            if len(ids) + settings["max_tokens"] > self.max_model_len:
                raise bad_request(f"this model's maximum context length is {self.max_model_len} tokens; the prompt "
                                  f"has {len(ids)} and max_tokens asks for {settings['max_tokens']} more: shorten "
                                  f"the prompt or lower max_tokens", "max_tokens", "context_length_exceeded")
        return [Request(ids, adapter, **settings) for ids in prompts]

    def submit(self, requests: list[Request]) -> list[asyncio.Future]:
        """Queue the requests (a body's prompts) -> their futures; when the engine refuses one, the
        others are withdrawn and the refusal raised as an ApiError."""
        futures = []
        for request in requests:
            try:
                futures.append(asyncio.wrap_future(self.engine.submit(request)))
            except (QueueFull, EngineStopped) as e:
                for future in futures:  # the request's other prompts, already queued, will not run
                    future.cancel()
                raise api_error(e) from None
        return futures

    async def run(self, requests: list[Request]) -> list[Result]:
        try:
            return list(await asyncio.gather(*self.submit(requests)))
        except (EngineStopped, AdapterError) as e:
            raise api_error(e) from None

    async def stream(self, requests: list[Request]) -> AsyncIterator[tuple[int, str | Result]]:
        """Queue streaming requests -> `choice_events` over them. Waits for the first event (a piece
        of text or an ended choice), so a refusal before any token is still an HTTP error status."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for index, request in enumerate(requests):  # the engine thread hands the text to this loop
            request.on_text = lambda piece, index=index: loop.call_soon_threadsafe(events.put_nowait, (index, piece))
        for index, future in enumerate(self.submit(requests)):
            future.add_done_callback(lambda done, index=index: events.put_nowait((index, done)))
        first = await events.get()
        if not isinstance(first[1], str) and first[1].exception() is not None:
            for request in requests:
                request.abandoned = True
            raise api_error(first[1].exception())
        return abandon_when_closed(choice_events(first, events, len(requests)), requests)


async def abandon_when_closed(choices: AsyncIterator, requests: list[Request]) -> AsyncIterator:
    """`choices`, then (also when the client hangs up mid-stream) the requests marked abandoned, so the
    engine stops decoding rows that nobody reads."""
    try:
        async for event in choices:
            yield event
    finally:
        for request in requests:
            request.abandoned = True


def response_ids(model: str, prefix: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


def create_app(engine: Engine, base_name: str, max_model_len: int, default_max_tokens: int = 256):
    """The FastAPI app over a started engine (its lifecycle is the caller's)."""
    fastapi, _ = server_stack()
    JSONResponse, StreamingResponse = fastapi.responses.JSONResponse, fastapi.responses.StreamingResponse
    server = Server(engine, base_name, max_model_len, default_max_tokens)
    app = fastapi.FastAPI(title="jaxtune", description="OpenAI-compatible serving of a base model and LoRA adapters")

    @app.exception_handler(ApiError)
    async def api_error(_, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(fastapi.exceptions.StarletteHTTPException)
    async def http_error(_, error):
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_, error: Exception):
        log.error("internal error: %s: %s", type(error).__name__, error, exc_info=error)
        body = ApiError(500, f"internal error ({type(error).__name__}): the server logged it", type="server_error")
        return JSONResponse(body.body(), status_code=500)

    async def json_body(request) -> dict:
        return parse_json_body(await request.body())

    def stream_options(body: dict) -> bool:
        options = body.get("stream_options") or {}
        return bool(isinstance(options, dict) and options.get("include_usage"))

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        body = await json_body(request)
        requests = server.requests(body, completion_prompts(body, server.tokenizer))
        ids = response_ids(body["model"], "cmpl")
        if body.get("stream"):
            return StreamingResponse(completion_events(ids, await server.stream(requests), stream_options(body)),
                                     media_type="text/event-stream")
        return completion_body(ids, await server.run(requests))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        body = await json_body(request)
        requests = server.requests(body, [chat_prompt(body, server.tokenizer, server.template_of(body))])
        ids = response_ids(body["model"], "chatcmpl")
        if body.get("stream"):
            return StreamingResponse(chat_events(ids, await server.stream(requests), stream_options(body)),
                                     media_type="text/event-stream")
        [result] = await server.run(requests)
        return chat_body(ids, result)

    def lora_name(body: dict) -> str:
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise bad_request("lora_name is required", "lora_name")
        if name == server.base_name:
            raise bad_request(f"{name!r} is the base model's name", "lora_name")
        return name

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: fastapi.Request):
        body = await json_body(request)
        name, path = lora_name(body), body.get("lora_path")
        if not isinstance(path, str) or not path:
            raise bad_request("lora_path is required: a PEFT adapter folder or a jaxtune run on the server", "lora_path")
        try:
            await fastapi.concurrency.run_in_threadpool(engine.load_adapter, name, path)
        except JaxtuneError as e:
            raise bad_request(str(e), "lora_path") from None
        return fastapi.responses.PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: fastapi.Request):
        name = lora_name(await json_body(request))
        if name not in engine.adapters():
            raise ApiError(404, f"no adapter named {name!r} is loaded", param="lora_name", code="model_not_found")
        engine.unload_adapter(name)
        return fastapi.responses.PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.get("/v1/stats")
    async def stats():
        return engine.stats()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


# --------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxtune.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="base model: alias, HF folder or hub id (default: the first adapter's base)")
    parser.add_argument("--adapters", default="", help="NAME=DIR[,NAME=DIR...]: PEFT folders or jaxtune LoRA runs")
    parser.add_argument("--served_model_name", help="the base model's name in requests (default: --model)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default: no authentication)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_loras", type=int, default=None, help="adapter slots (default: the adapters given + 4)")
    parser.add_argument("--max_lora_rank", type=int, default=None,
                        help="largest rank loadable (default: 16, or the largest given)")
    parser.add_argument("--max_lora_columns", type=int, default=None,
                        help="rank columns shared by all adapters, packed (an adapter of rank r takes r; every row "
                             "of a decode step pays for all of them; default: max_loras x max_lora_rank)")
    parser.add_argument("--max_batch", type=int, default=32, help="requests per batch at most")
    parser.add_argument("--batch_window_ms", type=float, default=10.0, help="how long a batch waits for more requests")
    parser.add_argument("--chunk_tokens", type=int, default=CHUNK_TOKENS,
                        help="decode steps per compiled call: streams receive their text this many tokens at a time")
    parser.add_argument("--max_queue", type=int, default=256, help="waiting requests at most (then 429)")
    parser.add_argument("--max_model_len", type=int, default=None,
                        help="prompt + max_tokens at most (default: the model's max_position_embeddings)")
    parser.add_argument("--default_max_tokens", type=int, default=256, help="max_tokens when a request gives none")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    if not (args.model or args.adapters):
        parser.error("give --model, or --adapters=NAME=DIR,... (the base model is then the first adapter's)")
    for name in ("max_batch", "chunk_tokens", "max_queue", "default_max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def build(args: argparse.Namespace) -> tuple[Engine, str, int]:
    """(started engine, base model name, max_model_len) from the CLI's arguments."""
    dirs = parse_adapter_specs(args.adapters) if args.adapters else {}
    model_path = base_model_path(args.model, next(iter(dirs.values()), None))
    model = load(model_path, param_dtype=args.dtype, compute_dtype=args.dtype)
    if model.tokenizer is None:
        raise AdapterError(f"{model.folder} has no tokenizer files: the server needs one")
    loaded = {name: read_adapter(path, model.cfg) for name, path in dirs.items()}
    max_rank = args.max_lora_rank or max([16, *(cfg.rank for _, cfg in loaded.values())])
    bank = AdapterBank(model.cfg, capacity=1 + (args.max_loras or len(dirs) + 4), max_rank=max_rank,
                       targets=LINEAR_TARGETS, columns=args.max_lora_columns)
    for name, (adapters, lora_cfg) in loaded.items():
        bank.add(name, adapters, lora_cfg, path=dirs[name])
    engine = Engine(model, bank, max_batch=args.max_batch, window_s=args.batch_window_ms / 1e3,
                    max_queue=args.max_queue, chunk_tokens=args.chunk_tokens).start()
    return engine, args.served_model_name or model_path, args.max_model_len or model.cfg.max_position_embeddings


def main(argv: Sequence[str] | None = None) -> None:
    jaxtune.setup_logging()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        _, uvicorn = server_stack()
        engine, base_name, max_model_len = build(args)
    except JaxtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    app = create_app(engine, base_name, max_model_len, args.default_max_tokens)
    log.info("serving %s + adapters %s on http://%s:%d/v1", base_name, ", ".join(engine.adapters()) or "none",
             args.host, args.port)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.stop()


if __name__ == "__main__":
    enable_compilation_cache()
    main()
