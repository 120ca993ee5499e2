"""python -m jaxtune.serve, driven by the official `openai` client against 127.0.0.1 (a free port).

A tiny random Llama with SmolLM2's tokenizer and chat template, PEFT adapters made by peft itself.
Every answer is checked against the generate CLI's for the same adapter (greedy), and the engine's
reported batch sizes show that concurrent requests for different adapters were batched together.
"""

import concurrent.futures
import json
import socket
import threading
import time

import urllib.error
import urllib.request

import pytest

from conftest import require_reference, save_random_peft_adapter
from jaxtune import engine as engine_lib
from jaxtune import generate as gen
from jaxtune import serve

openai = require_reference("openai")
uvicorn = require_reference("uvicorn")
require_reference("peft")

ADAPTERS = {"qv": (4, 8, ["q_proj", "v_proj"], False), "mlp": (8, 16, ["gate_proj", "up_proj", "down_proj"], True),
            "late": (2, 4, ["o_proj", "k_proj"], False)}
MAX_TOKENS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Answer:
    """An HTTP answer read with the standard library: status, text, json()."""

    def __init__(self, status: int, text: str):
        self.status_code, self.text = status, text

    def json(self):
        return json.loads(self.text)


def http(method: str, url: str, body=None) -> Answer:
    """A raw request (`body`: a dict sent as JSON, or bytes as they are) -> its Answer, error statuses included."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return Answer(response.status, response.read().decode())
    except urllib.error.HTTPError as e:
        return Answer(e.code, e.read().decode())


class Running:
    """A uvicorn server for `app` on a free loopback port, in a thread."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_chat_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_adapters")
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        save_random_peft_adapter(tiny_chat_model, root / name, *spec, seed=10 + i, scale=0.3)
    return {name: str(root / name) for name in ADAPTERS}


@pytest.fixture(scope="module")
def served(tiny_chat_model, adapter_dirs):
    """The server as the CLI builds it, with qv and mlp loaded (late is loaded at runtime)."""
    args = serve.parse_args([f"--model={tiny_chat_model}", f"--adapters=qv={adapter_dirs['qv']},mlp={adapter_dirs['mlp']}",
                             "--served_model_name=base", "--batch_window_ms=300", "--max_loras=3", "--max_lora_rank=8",
                             "--max_model_len=200", "--chunk_tokens=2"])
    engine, base_name, max_model_len = serve.build(args)
    running = Running(serve.create_app(engine, base_name, max_model_len, default_max_tokens=MAX_TOKENS))
    running.engine = engine
    yield running
    running.close()
    engine.stop()


def cli_completions(tiny_chat_model, adapter_dirs, rows, tmp_path, raw: bool) -> list[str]:
    """The generate CLI's completions (--adapters + --prompts) for rows [(adapter or None, prompt or messages)]."""
    prompts = tmp_path / f"prompts_{raw}.jsonl"
    prompts.write_text("".join(json.dumps({"adapter": a, **({"prompt": p} if isinstance(p, str) else {"messages": p})})
                               + "\n" for a, p in rows))
    spec = ",".join(f"{name}={d}" for name, d in adapter_dirs.items())
    out = tmp_path / f"out_{raw}.jsonl"
    gen.main([f"--model={tiny_chat_model}", f"--adapters={spec}", f"--prompts={prompts}",
              f"--max_new_tokens={MAX_TOKENS}", f"--out={out}"] + (["--raw"] if raw else []))
    return [json.loads(line)["completion"] for line in out.read_text().splitlines()]


def test_models_lists_the_base_and_each_adapter(served, adapter_dirs):
    models = served.client.models.list().data
    assert [m.id for m in models] == ["base", "qv", "mlp"]
    assert models[1].model_extra["parent"] == "base" and models[1].model_extra["root"] == adapter_dirs["qv"]


def test_completions_and_chat_per_adapter_equal_the_cli(served, tiny_chat_model, adapter_dirs, tmp_path):
    client = served.client
    texts = ["Once upon a time", "The capital of France is"]
    rows = [(name, text) for name in (None, "qv", "mlp") for text in texts]
    want = cli_completions(tiny_chat_model, {k: adapter_dirs[k] for k in ("qv", "mlp")}, rows, tmp_path, raw=True)
    for (name, text), expected in zip(rows, want):
        got = client.completions.create(model=name or "base", prompt=text, max_tokens=MAX_TOKENS, temperature=0)
        assert got.choices[0].text == expected, (name, text)
        assert got.usage.completion_tokens <= MAX_TOKENS and got.choices[0].finish_reason in ("stop", "length")
    assert len(set(want)) >= 4  # the adapters change the answers

    chats = [[{"role": "user", "content": "Name a colour."}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]]
    rows = [(name, chat) for name in (None, "qv", "mlp") for chat in chats]
    want = cli_completions(tiny_chat_model, {k: adapter_dirs[k] for k in ("qv", "mlp")}, rows, tmp_path, raw=False)
    for (name, chat), expected in zip(rows, want):
        got = client.chat.completions.create(model=name or "base", messages=chat, max_tokens=MAX_TOKENS, temperature=0)
        assert got.choices[0].message.content == expected and got.choices[0].message.role == "assistant"


def test_streaming_sends_the_same_text_in_pieces(served):
    client = served.client
    whole = client.completions.create(model="qv", prompt="Once upon a time", max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(client.completions.create(model="qv", prompt="Once upon a time", max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason

    messages = [{"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model="mlp", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(client.chat.completions.create(model="mlp", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streams_get_their_text_while_the_batch_is_still_decoding(served, monkeypatch):
    """The engine is held after its first decoded chunks until the client has read text: a server that
    sent nothing before the end of the batch would keep it held (and the test would fail at the timeout)."""
    client_has_text, released_by_client = threading.Event(), []
    real_chunks = engine_lib.generate_chunks

    def held_after_the_first_chunks(*args, **kwargs):
        for number, tokens in enumerate(real_chunks(*args, **kwargs)):
            yield tokens
            if number == 3:  # the first token, then 3 chunks of chunk_tokens (2): 7 tokens decoded, 17 to go
                released_by_client.append(client_has_text.wait(timeout=60))

    whole = served.client.completions.create(model="mlp", prompt="Once upon a time", max_tokens=24, temperature=0)
    assert whole.usage.completion_tokens == 24  # no EOS before the end: the hold point is reached
    monkeypatch.setattr(engine_lib, "generate_chunks", held_after_the_first_chunks)
    stream = served.client.completions.create(model="mlp", prompt="Once upon a time", max_tokens=24, temperature=0,
                                              stream=True)
    pieces = []
    for chunk in stream:
        pieces.append(chunk.choices[0].text)
        if chunk.choices[0].text:
            client_has_text.set()
    assert released_by_client == [True]  # released by the client's first text, not by the timeout
    assert "".join(pieces) == whole.choices[0].text and len([p for p in pieces if p]) >= 3


def test_streamed_text_stops_before_a_stop_string(served):
    client = served.client
    full = client.completions.create(model="qv", prompt="Once upon a time", max_tokens=MAX_TOKENS, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    kwargs = dict(model="qv", prompt="Once upon a time", max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    cut = client.completions.create(**kwargs)
    pieces = [c.choices[0].text for c in client.completions.create(**kwargs, stream=True)]
    assert "".join(pieces) == cut.choices[0].text == text[:text.find(stop)]


def test_concurrent_requests_for_different_adapters_are_batched_together(served):
    client = served.client
    before = len(http("GET", served.url + "/v1/stats").json()["recent_batches"])
    jobs = [("base", "Once upon a time"), ("qv", "Hello"), ("mlp", "The capital of France is"), ("qv", "Once"),
            ("mlp", "Hello"), ("base", "Hi")]
    alone = [client.completions.create(model=m, prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
             for m, p in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: client.completions.create(
            model=job[0], prompt=job[1], max_tokens=MAX_TOKENS, temperature=0).choices[0].text, jobs))
    assert together == alone  # batching does not change a greedy answer
    stats = http("GET", served.url + "/v1/stats").json()
    batches = stats["recent_batches"][before:]
    biggest = max(batches[len(jobs):], key=lambda b: b["size"])  # the concurrent ones came after the 6 alone
    assert biggest["size"] >= 4 and len(biggest["adapters"]) >= 3, batches
    assert all(b["size"] == 1 for b in batches[:len(jobs)])
    assert sum(int(k) * v for k, v in stats["batch_sizes"].items()) == stats["requests_done"]


def test_stop_strings_cut_the_completion(served):
    client = served.client
    full = client.completions.create(model="qv", prompt="Once upon a time", max_tokens=MAX_TOKENS, temperature=0)
    text = full.choices[0].text
    assert len(text) >= 4, text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.completions.create(model="qv", prompt="Once upon a time", max_tokens=MAX_TOKENS, temperature=0,
                                    stop=["never there", stop])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens


def test_seeded_sampling_is_reproducible(served):
    client = served.client
    texts = [client.completions.create(model="mlp", prompt="Once upon a time", max_tokens=MAX_TOKENS, temperature=1.0,
                                       top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    assert texts[0] == texts[1]


def test_adapters_load_and_unload_at_runtime(served, tiny_chat_model, adapter_dirs, tmp_path):
    client = served.client
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="Hello", max_tokens=4)
    answer = http("POST", served.url + "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": adapter_dirs["late"]})
    assert answer.status_code == 200 and "late" in answer.text
    assert [m.id for m in client.models.list().data] == ["base", "qv", "mlp", "late"]
    got = client.completions.create(model="late", prompt="Once upon a time", max_tokens=MAX_TOKENS, temperature=0)
    [want] = cli_completions(tiny_chat_model, {"late": adapter_dirs["late"]}, [("late", "Once upon a time")],
                             tmp_path, raw=True)
    assert got.choices[0].text == want

    full = http("POST", served.url + "/v1/load_lora_adapter", {"lora_name": "again", "lora_path": adapter_dirs["qv"]})
    assert full.status_code == 400 and "slots are taken" in full.json()["error"]["message"]
    assert http("POST", served.url + "/v1/unload_lora_adapter", {"lora_name": "late"}).status_code == 200
    assert [m.id for m in client.models.list().data] == ["base", "qv", "mlp"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="Hello", max_tokens=4)
    missing = http("POST", served.url + "/v1/unload_lora_adapter", {"lora_name": "late"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, tmp_path):
    client, url = served.client, served.url
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="nope", prompt="Hello", max_tokens=4)
    assert unknown.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="qv", prompt="Hello " * 50, max_tokens=190)
    assert too_long.value.body["code"] == "context_length_exceeded" and "200" in too_long.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="qv", messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError) as hot:
        client.completions.create(model="qv", prompt="Hello", temperature=5)
    assert hot.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="qv", prompt="Hello", n=2)

    malformed = http("POST", url + "/v1/completions", b'{"model": "qv", "prompt": ')
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]["message"]
    assert malformed.json()["error"]["type"] == "invalid_request_error"
    no_route = http("GET", url + "/v1/nothing")
    assert no_route.status_code == 404 and "error" in no_route.json()
    bad_path = http("POST", url + "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "none")})
    assert bad_path.status_code == 400 and "not a folder" in bad_path.json()["error"]["message"]
    assert http("POST", url + "/v1/load_lora_adapter", {"lora_name": "x"}).status_code == 400

    assert client.completions.create(model="qv", prompt="Hello", max_tokens=2, temperature=0).choices[0].text


def test_a_full_queue_answers_429_and_shutdown_503(served):
    """An engine that is not running (nothing drains its queue of one): the second request is refused."""
    idle = engine_lib.Engine(served.engine.model, served.engine.bank, max_queue=1)
    other = Running(serve.create_app(idle, "base", 200, default_max_tokens=4))
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(other.client.completions.create, model="base", prompt="Hello", max_tokens=2)
            deadline = time.monotonic() + 30
            while idle.queue.qsize() < 1:
                assert time.monotonic() < deadline, "the first request never reached the queue"
                time.sleep(0.02)
            with pytest.raises(openai.RateLimitError) as limited:
                other.client.completions.create(model="base", prompt="Hello", max_tokens=2)
            assert limited.value.body["code"] == "rate_limit_exceeded"
            idle.stop()
            with pytest.raises(openai.InternalServerError) as stopped:
                waiting.result(60)
            assert stopped.value.status_code == 503
    finally:
        other.close()


def test_chat_is_rendered_with_the_template_the_adapter_trained_with(served, adapter_dirs, tmp_path, monkeypatch):
    """A jaxtune run trained with data.template=none gets its chats as raw text (as generate --adapter and
    evaluate render them); the base model and PEFT folders get the tokenizer's chat template. The run's
    config.json is read once, when the adapter is loaded, not on every request; unloading forgets it."""
    from jaxtune import config as config_lib
    from jaxtune import peft as peft_io
    from jaxtune.multi_adapter import AdapterBank

    model = served.engine.model
    run = tmp_path / "run"
    run.mkdir()
    run_config = config_lib.base_config()
    run_config.data.template = "none"
    (run / "config.json").write_text(config_lib.to_json(run_config))
    # The run's weights: the qv PEFT adapter's (the run folder holds only its config here).
    monkeypatch.setattr(engine_lib, "read_adapter",
                        lambda path, cfg: peft_io.load_peft_adapter(adapter_dirs["qv"], cfg))
    bank = AdapterBank(model.cfg, capacity=3, max_rank=8)
    engine = engine_lib.Engine(model, bank)  # not started: only its adapters are used here
    engine.load_adapter("raw_run", str(run))
    engine.load_adapter("qv", adapter_dirs["qv"])
    (run / "config.json").unlink()  # read once: requests no longer need it
    server = serve.Server(engine, "base", max_model_len=200, default_max_tokens=MAX_TOKENS)
    tokenizer = model.tokenizer
    messages = [{"role": "user", "content": "Name a colour."}]
    rendered = {name: serve.chat_prompt({"model": name, "messages": messages}, tokenizer,
                                        server.template_of({"model": name}))
                for name in ("base", "qv", "raw_run")}
    assert rendered["base"] == rendered["qv"] == gen.prompt_ids(tokenizer, [messages], "auto")[0]
    assert rendered["raw_run"] == gen.prompt_ids(tokenizer, [messages], "none")[0] != rendered["base"]
    assert "<|im_start|>" not in tokenizer.decode(rendered["raw_run"])
    engine.unload_adapter("raw_run")
    assert engine.templates == {"qv": "auto"}
    with pytest.raises(serve.ApiError, match="does not exist"):
        server.template_of({"model": "raw_run"})
