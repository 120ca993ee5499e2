"""jaxtune.data: loading, validation errors, chat-template loss masks, truncation, packing, batching.

The tokenizers are small byte-level BPEs trained here on a few strings, wrapped in
PreTrainedTokenizerFast with a ChatML and a Llama-3-style chat template, saved and reloaded with
AutoTokenizer like a real model folder. Expected ids and masks are built piece by piece from the
hand-written rendering, never from the code under test.
"""

import json
import logging

import numpy as np
import pytest

from conftest import require_reference, skip_or_fail_in_ci
from jaxtune import data
from jaxtune.data import DataError, TokenizedExample

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}"
          "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
          "{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Renders the last assistant message differently from earlier ones (like reasoning templates do).
LAST_TURN_DIFFERS = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
                     "{% if loop.last and m['role'] == 'assistant' %}{{ ' [final]' }}{% endif %}"
                     "{{ '<|im_end|>\n' }}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
STRICT_ALTERNATION = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]"
                      "['role'] %}{{ raise_exception('roles must alternate') }}{% endif %}"
                      "{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
CORPUS = ["hello world, how are you today?", "the assistant answers questions briefly",
          "user: what is two plus two? four. and three plus three? six.", "Be brief. Q: 2+2= 4",
          "system prompt for a helpful assistant"] * 4


def _build_tokenizer(tmp_path_factory, name, chat_template, add_bos):
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


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return _build_tokenizer(tmp_path_factory, "chatml", CHATML, add_bos=False)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return _build_tokenizer(tmp_path_factory, "llama3", LLAMA3, add_bos=True)


def enc(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def expected(tokenizer, pieces):
    """ids and trained mask from (text, trained) pieces of a hand-written rendering."""
    ids, trained = [], []
    for text, is_trained in pieces:
        piece_ids = enc(tokenizer, text)
        ids += piece_ids
        trained += [is_trained] * len(piece_ids)
    return ids, trained


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def tokenize_one(tokenizer, example, **options):
    options = {"max_len": 512, **options}
    kept, _ = data.tokenize_examples([{"source": "t.jsonl:1", **example}], tokenizer, **options)
    assert len(kept) == 1
    return kept[0]


def chat(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def test_load_detects_each_format_and_normalises(tmp_path):
    messages = chat(("system", "s"), ("user", "u"), ("assistant", "a"))
    files = {
        "m.jsonl": [messages],
        "pc.jsonl": [{"prompt": "p", "completion": "c", "extra": 1}],
        "t.jsonl": [{"text": "hello"}],
    }
    paths = {name: write_jsonl(tmp_path / name, rows) for name, rows in files.items()}
    assert data.load_examples(paths["m.jsonl"]) == [{**messages, "source": f"{paths['m.jsonl']}:1"}]
    assert data.load_examples(paths["pc.jsonl"]) == [
        {"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}],
         "source": f"{paths['pc.jsonl']}:1"}]
    assert data.load_examples(paths["t.jsonl"]) == [{"text": "hello", "source": f"{paths['t.jsonl']}:1"}]
    # Several sources, each detected on its own; blank lines are skipped but line numbers kept.
    (tmp_path / "blank.jsonl").write_text('\n{"text": "x"}\n\n{"text": "y"}\n')
    both = data.load_examples([paths["pc.jsonl"], str(tmp_path / "blank.jsonl")])
    assert [e["source"].rsplit(":", 1)[1] for e in both] == ["1", "2", "4"]


def test_load_prompt_completion_message_lists_and_weights(tmp_path):
    row = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
           "completion": [{"role": "assistant", "content": "c", "weight": 1}]}
    path = write_jsonl(tmp_path / "x.jsonl", [row])
    assert data.load_examples(path)[0]["messages"] == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u"},
        {"role": "assistant", "content": "c", "weight": 1}]


def test_load_json_array_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [e["text"] for e in data.load_examples(str(path))] == ["a", "b"]


BAD_FILES = [
    ('{"text": "a"}\n{"text": \n', 2, "invalid JSON"),
    ('{"messages": [{"role": "user", "content": "u"}]}\n{"text": "t"}\n', 2, "missing field 'messages'"),
    ('{"messages": []}\n', 1, "empty conversation"),
    ('{"messages": [{"role": "tool", "content": "x"}]}\n', 1, "unknown role 'tool'"),
    ('{"messages": [{"role": "user", "content": null}]}\n', 1, "string 'content', got null"),
    ('{"messages": [{"role": "user", "content": ["a"]}]}\n', 1, "string 'content', got list"),
    ('{"messages": [{"role": "user"}]}\n', 1, "string 'content'"),
    ('{"messages": "hi"}\n', 1, "must be a list of messages"),
    ('{"messages": ["hi"]}\n', 1, "message 0 must be an object"),
    ('{"messages": [{"role": "assistant", "content": "a", "weight": 2}]}\n', 1, "must be 0 or 1"),
    ('{"prompt": "p", "completion": 3}\n', 1, "'completion' must be a string"),
    ('{"prompt": "p"}\n', 1, "cannot tell the data format"),
    ('\n\n{"question": "q"}\n', 3, "cannot tell the data format"),
    ('{"text": ""}\n', 1, "'text' is empty"),
    ('{"text": 5}\n', 1, "'text' must be a string"),
    ('"just a string"\n', 1, "expected a JSON object"),
]


@pytest.mark.parametrize("content,line,message", BAD_FILES)
def test_bad_rows_give_one_error_with_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        data.load_examples(str(path))
    assert f"{path}:{line}: " in str(info.value)
    assert message in str(info.value)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no examples"):
        data.load_examples(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        data.load_examples(str(tmp_path / "absent.jsonl"))
    with pytest.raises(DataError, match="unknown data format"):
        data.load_examples(str(tmp_path / "empty.jsonl"), format="chat")
    with pytest.raises(DataError, match="hf:NAME"):
        data.load_examples("hf:a:b:c:d")


def test_explicit_format_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "t", "prompt": "p", "completion": "c"}])
    assert data.load_examples(path, format="text")[0]["text"] == "t"
    assert data.load_examples(path)[0]["messages"][1]["content"] == "c"


def test_datasets_sources(tmp_path):
    datasets = require_reference("datasets")
    rows = [chat(("user", "u1"), ("assistant", "a1")), chat(("user", "u2"), ("assistant", "a2"))]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    loaded = data.load_examples(str(tmp_path / "single"))
    assert [e["messages"] for e in loaded] == [r["messages"] for r in rows]
    assert loaded[1]["source"] == f"{tmp_path / 'single'} row 1"

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]),
                                   "test": datasets.Dataset.from_list([{"text": "c"}])})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert [e["text"] for e in data.load_examples(f"{tmp_path / 'dict'}:test")] == ["c"]
    with pytest.raises(DataError, match="SPLIT"):
        data.load_examples(str(tmp_path / "dict"))

    datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}]).to_parquet(str(tmp_path / "x.parquet"))
    assert data.load_examples(str(tmp_path / "x.parquet"))[0]["messages"][1] == {"role": "assistant",
                                                                               "content": "c"}
    bad = datasets.Dataset.from_list([{"text": "ok"}, {"text": ""}])
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad row 1: 'text' is empty"):
        data.load_examples(str(tmp_path / "bad"))


# ---------------------------------------------------------------------------------------------
# Tokenisation and loss masks
# ---------------------------------------------------------------------------------------------

def test_chatml_trains_exactly_assistant_content_and_im_end(chatml):
    example = chat(("system", "Be brief."), ("user", "what is two plus two?"), ("assistant", "four"),
                   ("user", "and three plus three?"), ("assistant", "six."))
    ids, trained = expected(chatml, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nwhat is two plus two?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("four<|im_end|>", True),
        ("\n<|im_start|>user\nand three plus three?<|im_end|>\n<|im_start|>assistant\n", False),
        ("six.<|im_end|>", True),
        ("\n", False),
    ])
    result = tokenize_one(chatml, example)
    assert result.ids.tolist() == ids
    assert result.trained.tolist() == trained
    assert result.ids.dtype == np.int32 and result.trained.dtype == np.bool_
    assert chatml.decode(result.ids[result.trained]) == "four<|im_end|>six.<|im_end|>"
    # The tokens that close each trained span are <|im_end|>, the newline after it is not trained.
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    ends = np.flatnonzero(np.diff(result.trained.astype(int)) == -1)
    assert result.ids[ends].tolist() == [im_end, im_end]
    assert chatml.decode(result.ids[ends + 1]) == "\n\n"


def test_llama3_template_with_bos_in_template(llama3):
    example = chat(("user", "hello world"), ("assistant", " the assistant answers "))
    ids, trained = expected(llama3, [
        ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello world<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("the assistant answers<|eot_id|>", True),
    ])
    result = tokenize_one(llama3, example)
    assert result.ids.tolist() == ids
    assert result.trained.tolist() == trained
    assert result.ids.tolist().count(llama3.bos_token_id) == 1  # BOS from the template only


def test_weight_zero_turn_is_not_trained(chatml):
    example = chat(("user", "hello"), ("assistant", "world"), ("user", "how are you"), ("assistant", "four"))
    example["messages"][1]["weight"] = 0
    result = tokenize_one(chatml, example)
    assert chatml.decode(result.ids[result.trained]) == "four<|im_end|>"


def test_mask_prompt_false_trains_everything_but_the_first_token(chatml):
    example = chat(("user", "hello"), ("assistant", "world"))
    result = tokenize_one(chatml, example, mask_prompt=False)
    assert result.ids.tolist() == enc(chatml, "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
                                               "world<|im_end|>\n")
    assert result.trained.tolist() == [False] + [True] * (len(result.ids) - 1)
    # Without mask_prompt a conversation needs no assistant turn.
    assert tokenize_one(chatml, chat(("user", "hello")), mask_prompt=False).trained[1:].all()


def test_text_and_raw_prompt_completion(chatml, llama3):
    eos = chatml.eos_token_id
    text = tokenize_one(chatml, {"text": "hello world"})
    assert text.ids.tolist() == enc(chatml, "hello world") + [eos]
    assert text.trained.tolist() == [False] + [True] * len(enc(chatml, "hello world"))
    # The Llama-3 tokenizer puts BOS before raw text, which is never a target.
    bos, eot = llama3.bos_token_id, llama3.eos_token_id
    text = tokenize_one(llama3, {"text": "hello"})
    assert text.ids.tolist() == [bos] + enc(llama3, "hello") + [eot]
    assert text.trained.tolist() == [False] + [True] * (len(text.ids) - 1)

    example = chat(("user", "Q: 2+2="), ("assistant", " 4"))
    raw = tokenize_one(llama3, example, template="none")
    prompt, completion = enc(llama3, "Q: 2+2="), enc(llama3, " 4")
    assert raw.ids.tolist() == [bos] + prompt + completion + [eot]
    assert raw.trained.tolist() == [False] * (1 + len(prompt)) + [True] * (len(completion) + 1)


def test_template_string_and_missing_template(chatml, llama3):
    # The ChatML template given as a string to a tokenizer whose own template is Llama-3.
    example = chat(("user", "hello"), ("assistant", "world"))
    result = tokenize_one(llama3, example, template=CHATML)
    assert llama3.decode(result.ids[result.trained]) == "world<|im_end|>"
    with pytest.raises(DataError, match="unknown data.template"):
        tokenize_one(chatml, example, template="chatml")
    no_template = chatml.__class__.from_pretrained(chatml.name_or_path)
    no_template.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        tokenize_one(no_template, example)
    assert tokenize_one(no_template, {"text": "hello"}).trained.sum() == len(enc(chatml, "hello"))


@pytest.mark.parametrize("template,example,message", [
    (LAST_TURN_DIFFERS, chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")),
     "not prefix-consistent"),
    (STRICT_ALTERNATION, chat(("user", "a"), ("user", "b"), ("assistant", "c")), "roles must alternate"),
    (CHATML, chat(("user", "a"), ("user", "b")), "no assistant message"),
    (CHATML, chat(("assistant", "a"), ("user", "b"), ("assistant", "c")), "starts with an assistant"),
    (CHATML, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]},
     "weight 0"),
])
def test_chat_errors_name_the_source(chatml, template, example, message):
    with pytest.raises(DataError) as info:
        tokenize_one(chatml, example, template=template)
    assert str(info.value).startswith("t.jsonl:1: ")
    assert message in str(info.value)


# transformers' own error when jinja2 is not installed (its `chat-template` extra), and a package
# missing under jinja2 itself.
MISSING_JINJA2 = ImportError("apply_chat_template requires jinja2 to be installed. Please install it using "
                             "`pip install jinja2`.")
MISSING_MARKUPSAFE = ModuleNotFoundError("No module named 'markupsafe'", name="markupsafe")


@pytest.mark.parametrize("error,package", [(MISSING_JINJA2, "jinja2"), (MISSING_MARKUPSAFE, "markupsafe")])
def test_a_missing_package_is_an_environment_error_not_a_data_error(chatml, monkeypatch, error, package):
    import jaxtune

    def apply_chat_template(*args, **kwargs):
        raise error

    monkeypatch.setattr(chatml, "apply_chat_template", apply_chat_template)
    with pytest.raises(jaxtune.MissingPackageError) as info:
        tokenize_one(chatml, chat(("user", "a"), ("assistant", "b")))
    message = str(info.value)
    assert not isinstance(info.value, DataError) and info.value.name == package
    assert f"the Python package {package!r} is not installed" in message
    assert "pip install -e ." in message and f"pip install {package}" in message
    assert "t.jsonl" not in message and "conversation" not in message  # the data is not blamed


def test_single_turn_with_differing_last_turn_is_fine(chatml):
    result = tokenize_one(chatml, chat(("user", "a"), ("assistant", "b")), template=LAST_TURN_DIFFERS)
    assert chatml.decode(result.ids[result.trained]) == "b [final]<|im_end|>"


# ---------------------------------------------------------------------------------------------
# Truncation and stats
# ---------------------------------------------------------------------------------------------

def test_truncation_stats_and_drops(chatml, caplog):
    short = {"text": "hello", "source": "f:1"}
    long = {"text": "zebras quickly vex jumpy wolves; " * 3, "source": "f:2"}
    late = {**chat(("user", "what is two plus two? and three plus three?"), ("assistant", "four")),
            "source": "f:3"}
    n_short, n_long = len(enc(chatml, short["text"])) + 1, len(enc(chatml, long["text"])) + 1
    prompt_len = len(enc(chatml, "<|im_start|>user\nwhat is two plus two? and three plus three?<|im_end|>\n"
                                 "<|im_start|>assistant\n"))
    n_late = prompt_len + len(enc(chatml, "four<|im_end|>\n"))
    max_len = prompt_len  # cuts the whole answer of `late` away
    assert n_short <= max_len < n_long
    with caplog.at_level(logging.WARNING, logger="jaxtune.data"):
        kept, stats = data.tokenize_examples([short, long, late], chatml, max_len=max_len)
    assert [e.source for e in kept] == ["f:1", "f:2"]
    assert kept[1].ids.tolist() == (enc(chatml, long["text"]) + [chatml.eos_token_id])[:max_len]
    assert stats.as_dict() == dict(name="train", max_len=max_len, examples=2, tokens=n_short + max_len,
                                   trained_tokens=n_short - 1 + max_len - 1, longest=max(n_long, n_late),
                                   truncated_examples=2, truncated_tokens=n_long - max_len + n_late - max_len,
                                   dropped_long=0, dropped_untrained=1)
    assert "2 examples truncated (" in caplog.text and "1 dropped with no trained token" in caplog.text
    assert "2 truncated" in str(stats) and "1 dropped with no trained token" in str(stats)

    kept, stats = data.tokenize_examples([short, long, late], chatml, max_len=max_len, drop_long=True)
    assert [e.source for e in kept] == ["f:1"]
    assert (stats.dropped_long, stats.truncated_examples, stats.examples) == (2, 0, 1)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

def example(ids, trained):
    return TokenizedExample(np.asarray(ids, np.int32), np.asarray(trained, bool))


A = example([5, 6, 7, 8], [0, 0, 1, 1])
B = example([9, 10, 11], [0, 1, 1])


def test_make_batch_exact_contents():
    batch = data.make_batch([[A, B], [B], []], seq_len=8, pad_id=99)
    assert {k: v.dtype for k, v in batch.items()} == {"tokens": np.int32, "targets": np.int32,
                                                      "loss_mask": np.float32, "positions": np.int32,
                                                      "segment_ids": np.int32}
    np.testing.assert_array_equal(batch["tokens"], [[5, 6, 7, 8, 9, 10, 11, 99],
                                                    [9, 10, 11, 99, 99, 99, 99, 99], [99] * 8])
    np.testing.assert_array_equal(batch["targets"], [[6, 7, 8, 99, 10, 11, 99, 99],
                                                     [10, 11, 99, 99, 99, 99, 99, 99], [99] * 8])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0, 1, 1, 0, 0],
                                                       [1, 1, 0, 0, 0, 0, 0, 0], [0] * 8])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 0, 1, 2, 0],
                                                       [0, 1, 2, 0, 0, 0, 0, 0], [0] * 8])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 2, 2, 2, 0],
                                                         [1, 1, 1, 0, 0, 0, 0, 0], [0] * 8])
    with pytest.raises(ValueError, match="more than the batch length"):
        data.make_batch([[A, B]], seq_len=6, pad_id=0)


def check_contract(batch, pad_id):
    """Batch-contract invariants that hold for any batch."""
    tokens, targets, mask = batch["tokens"], batch["targets"], batch["loss_mask"]
    positions, segments = batch["positions"], batch["segment_ids"]
    assert len({v.shape for v in batch.values()}) == 1
    same_next = (segments[:, :-1] == segments[:, 1:]) & (segments[:, :-1] > 0)
    np.testing.assert_array_equal(targets[:, :-1][same_next], tokens[:, 1:][same_next])
    assert not mask[:, -1].any()
    assert not mask[:, :-1][~same_next].any()  # no loss across examples, on last tokens or on pad
    assert (tokens[segments == 0] == pad_id).all() and (positions[segments == 0] == 0).all()
    starts = (segments > 0) & np.concatenate([np.ones_like(segments[:, :1], bool),
                                              segments[:, 1:] != segments[:, :-1]], axis=1)
    assert (positions[starts] == 0).all()
    inner = (segments[:, 1:] > 0) & ~starts[:, 1:]
    np.testing.assert_array_equal(positions[:, 1:][inner], positions[:, :-1][inner] + 1)


def random_examples(count, seed=0, low=2, high=30):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = int(rng.integers(low, high))
        ids = rng.integers(1, 1000, n)
        ids[0] = 100_000 + i  # first token identifies the example
        out.append(example(ids, rng.random(n) < 0.7))
    return out


def first_tokens(batch):
    """Example ids (first tokens) in a batch, row by row."""
    starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
    return [batch["tokens"][r][starts[r]].tolist() for r in range(len(starts))]


def test_pack_first_fit_exact_and_matches_reference():
    assert data.pack_first_fit([5, 3, 4, 2, 6, 1], 8) == [[4, 3], [0, 1], [2, 5]]
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 64, 300).tolist()
    reference_rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), len(free))
        if row == len(free):
            reference_rows.append([])
            free.append(64)
        reference_rows[row].append(i)
        free[row] -= lengths[i]
    assert data.pack_first_fit(lengths, 64) == reference_rows
    with pytest.raises(ValueError):
        data.pack_first_fit([9], 8)


@pytest.mark.parametrize("length,max_len,bucket,padded", [
    (5, 64, "pow2", 8), (64, 512, "pow2", 64), (65, 100, "pow2", 100), (1, 8, "pow2", 1),
    (70, 512, 64, 128), (64, 512, 64, 64), (70, 100, 64, 100)])
def test_bucket_len(length, max_len, bucket, padded):
    assert data.bucket_len(length, max_len, bucket) == padded


@pytest.mark.parametrize("packing", [False, True])
def test_batcher_epoch_covers_every_example_and_keeps_the_contract(packing):
    examples = random_examples(37)
    batcher = data.Batcher(examples, batch_size=4, max_len=32, pad_id=0, seed=3, packing=packing, epochs=1)
    batches = list(batcher)
    assert len(batches) == batcher.steps_per_epoch == -(-len(batcher.rows) // 4)
    seen = [e for b in batches for row in first_tokens(b) for e in row]
    assert set(seen) == {100_000 + i for i in range(37)}
    visited = batcher.epoch_order(0).flatten()  # every row once, then a few again to fill the last batch
    assert sorted(set(visited.tolist())) == list(range(len(batcher.rows)))
    assert len(visited) == 4 * batcher.steps_per_epoch
    assert len(seen) == sum(len(batcher.rows[r]) for r in visited)
    for batch in batches:
        check_contract(batch, pad_id=0)
        assert batch["tokens"].shape[0] == 4
        if packing:
            assert batch["tokens"].shape[1] == 32
        else:
            longest = int((batch["segment_ids"] > 0).sum(1).max())
            assert batch["tokens"].shape[1] == data.bucket_len(longest, 32)
    if packing:
        assert len(batcher.rows) < 37 and 0.5 < batcher.fill <= 1.0
    # The loss falls on exactly the trained tokens of the rows the epoch visits.
    total_trained = sum(int(examples[i].trained[1:].sum()) for r in visited for i in batcher.rows[r])
    assert sum(b["loss_mask"].sum() for b in batches) == total_trained


def test_batcher_batch_holds_the_examples_tokens():
    batcher = data.Batcher([A, B], batch_size=2, max_len=8, pad_id=99, seed=0, packing=True)
    batch = next(batcher)
    np.testing.assert_array_equal(batch["tokens"], [[5, 6, 7, 8, 9, 10, 11, 99]] * 2)  # 1 row, wrapped
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0, 1, 1, 0, 0]] * 2)


def test_batcher_is_deterministic_and_shuffles_per_epoch():
    examples = random_examples(40)

    def run(seed, steps):
        batcher = data.Batcher(examples, batch_size=4, max_len=32, pad_id=0, seed=seed)
        return [first_tokens(next(batcher)) for _ in range(steps)]

    assert run(0, 20) == run(0, 20)
    assert run(0, 10) != run(1, 10)
    epoch0, epoch1 = run(0, 20)[:10], run(0, 20)[10:]
    assert epoch0 != epoch1
    assert sorted(sum(sum(epoch0, []), [])) == sorted(sum(sum(epoch1, []), []))


def test_batcher_groups_lengths_in_padded_mode():
    examples = [example(np.arange(n) + 1, [0] + [1] * (n - 1)) for n in range(2, 18)]  # lengths 2..17
    batcher = data.Batcher(examples, batch_size=4, max_len=32, pad_id=0, seed=5, epochs=1)
    groups = sorted(sorted(((b["segment_ids"] > 0).sum(1)).tolist()) for b in batcher)
    assert groups == [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13], [14, 15, 16, 17]]
    shapes = [b["tokens"].shape[1] for b in data.Batcher(examples, 4, 32, 0, seed=5, epochs=1)]
    assert sorted(shapes) == [8, 16, 16, 32]


@pytest.mark.parametrize("packing", [False, True])
def test_batcher_resumes_exactly(packing):
    examples = random_examples(23)
    options = dict(batch_size=4, max_len=32, pad_id=0, seed=7, packing=packing)
    reference = data.Batcher(examples, **options)
    expected_batches = [next(reference) for _ in range(17)]  # crosses epoch boundaries
    for stop in (0, 3, reference.steps_per_epoch, 11):
        first = data.Batcher(examples, **options)
        for _ in range(stop):
            next(first)
        state = json.loads(json.dumps(first.state()))
        resumed = data.Batcher(examples, **options)
        resumed.restore(state)
        for want in expected_batches[stop:]:
            got = next(resumed)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
    with pytest.raises(ValueError, match="out of range"):
        resumed.restore({"epoch": 0, "index": 999})
    with pytest.raises(ValueError, match="epoch"):
        resumed.restore({"step": 3})


def test_batcher_epochs_limit():
    batcher = data.Batcher(random_examples(10), batch_size=4, max_len=32, pad_id=0, epochs=2)
    assert len(list(batcher)) == 2 * 3
    assert batcher.state() == {"epoch": 2, "index": 0}


@pytest.mark.parametrize("packing", [False, True])
def test_multi_host_slices_concatenate_to_the_global_batch(packing):
    examples = random_examples(50)
    options = dict(batch_size=8, max_len=32, pad_id=0, seed=11, packing=packing)
    single = data.Batcher(examples, **options)
    global_batches = [next(single) for _ in range(6)]
    for count in (2, 4, 8):
        hosts = [data.Batcher(examples, **options, process_index=i, process_count=count) for i in range(count)]
        for want in global_batches:
            parts = [next(host) for host in hosts]
            assert {p["tokens"].shape for p in parts} == {(8 // count, want["tokens"].shape[1])}
            for key in want:
                np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
    with pytest.raises(ValueError, match="divisible"):
        data.Batcher(examples, batch_size=6, max_len=32, pad_id=0, process_count=4)


@pytest.mark.parametrize("packing", [False, True])
def test_eval_batches_cover_the_set_once_with_pad_rows(packing):
    examples = random_examples(5, seed=2, high=12)
    batches = list(data.eval_batches(examples, batch_size=2, max_len=16, pad_id=0, packing=packing))
    seen = [e for b in batches for row in first_tokens(b) for e in row]
    assert sorted(seen) == [100_000 + i for i in range(5)]
    if not packing:
        assert seen == [100_000 + i for i in range(5)] and len(batches) == 3
        last = batches[-1]
        assert last["segment_ids"][1].sum() == 0 and last["loss_mask"][1].sum() == 0
    assert sum(b["loss_mask"].sum() for b in batches) == sum(int(e.trained[1:].sum()) for e in examples)
    for batch in batches:
        check_contract(batch, pad_id=0)
    halves = [list(data.eval_batches(examples, 2, 16, 0, packing=packing, process_index=i, process_count=2))
              for i in range(2)]
    for want, part0, part1 in zip(batches, *halves):
        np.testing.assert_array_equal(np.concatenate([part0["tokens"], part1["tokens"]]), want["tokens"])


def test_pad_never_trained_even_when_pad_is_eos(chatml):
    # SmolLM2 pads with <|im_end|> = EOS: trained EOS targets must still come from real tokens.
    pad_id = chatml.eos_token_id
    examples, _ = data.tokenize_examples(
        [chat(("user", "hello"), ("assistant", "world")), chat(("user", "a b c d e f"), ("assistant", "four"))],
        chatml, max_len=64)
    for packing in (False, True):
        batch = next(data.Batcher(examples, batch_size=2, max_len=64, pad_id=pad_id, packing=packing))
        check_contract(batch, pad_id)
        trained = batch["loss_mask"] == 1
        assert (batch["segment_ids"][trained] > 0).all()
        assert (np.roll(batch["segment_ids"], -1, axis=1)[trained] == batch["segment_ids"][trained]).all()
        examples_in_batch = ((batch["positions"] == 0) & (batch["segment_ids"] > 0)).sum()
        assert (batch["targets"][trained] == pad_id).sum() == examples_in_batch  # each one's real <|im_end|>


# ---------------------------------------------------------------------------------------------
# From config.data
# ---------------------------------------------------------------------------------------------

def test_build_datasets_from_config(chatml, tmp_path):
    ml_collections = require_reference("ml_collections")
    train = write_jsonl(tmp_path / "train.jsonl", [chat(("user", "hello"), ("assistant", "world"))] * 3)
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"prompt": "hello", "completion": "four"}])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"text": "hello world"}])
    config = ml_collections.ConfigDict(dict(train=f"{train},{extra}", eval=evals, format="auto", template="auto",
                                            max_len=64, packing=True, mask_prompt=True, drop_long=False))
    built = data.build_datasets(config, chatml)
    assert built.train_stats.examples == 4 and built.eval_stats.examples == 1
    assert chatml.decode(built.train[3].ids[built.train[3].trained]) == "four<|im_end|>"
    assert built.pad_id == chatml.pad_token_id
    config.eval = ""
    assert data.build_datasets(config, chatml).eval is None
    config.train = ""
    with pytest.raises(DataError, match="config.data.train is empty"):
        data.build_datasets(config, chatml)


@pytest.mark.real_model
def test_smollm2_real_tokenizer_masks():
    smollm2 = require_reference("jaxtune.smollm2")
    from transformers import AutoTokenizer

    try:
        folder = smollm2.materialize()
    except smollm2.SourceUnavailableError as e:
        skip_or_fail_in_ci(f"SmolLM2 not available: {e}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    example = chat(("user", "What is the capital of France?"), ("assistant", "Paris."),
                   ("user", "And of Italy?"), ("assistant", "Rome."))
    result = tokenize_one(tokenizer, example, max_len=1024)
    assert tokenizer.decode(result.ids[result.trained]) == "Paris.<|im_end|>Rome.<|im_end|>"
    rendered = tokenizer.apply_chat_template(example["messages"], tokenize=False)
    assert result.ids.tolist() == enc(tokenizer, rendered)
    assert rendered.endswith("<|im_start|>assistant\nRome.<|im_end|>\n")
