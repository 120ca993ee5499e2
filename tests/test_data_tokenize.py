"""jaxtune.data.tokenize: chat-template loss masks, raw templates, errors naming the source, truncation.

The tokenizers (`chatml`, `llama3` in conftest.py) are small byte-level BPEs trained on a few strings,
wrapped in PreTrainedTokenizerFast with a ChatML and a Llama-3-style chat template, saved and reloaded
with AutoTokenizer like a real model folder. Expected ids and masks are built piece by piece from the
hand-written rendering, never from the code under test.
"""

import logging

import numpy as np
import pytest

from conftest import CHATML, chat, require_reference, skip_or_fail_in_ci
from jaxtune import data
from jaxtune.data import DataError

# Renders the last assistant message differently from earlier ones (like reasoning templates do).
LAST_TURN_DIFFERS = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
                     "{% if loop.last and m['role'] == 'assistant' %}{{ ' [final]' }}{% endif %}"
                     "{{ '<|im_end|>\n' }}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
STRICT_ALTERNATION = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]"
                      "['role'] %}{{ raise_exception('roles must alternate') }}{% endif %}"
                      "{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}")


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


def tokenize_one(tokenizer, example, **options):
    options = {"max_len": 512, **options}
    kept, _ = data.tokenize_examples([{"source": "t.jsonl:1", **example}], tokenizer, **options)
    assert len(kept) == 1
    return kept[0]


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
