"""Evaluation: distinct-n, the general-question filter, forgetting drift, the evaluate CLI end to end,
loading adapters for inference (PEFT folders, run workdirs, `generate --adapter`), and rendering with
the run's data.template (chat template, raw text, or a clear error without a chat template)."""

import json

import jax
import numpy as np
import pytest

from conftest import leaves_equal, random_adapters, write_jsonl, write_run
from jaxtune import api, evaluate, generate, hf, loading, lora
from jaxtune import workdir as workdir_lib
from jaxtune import params as params_lib
from jaxtune import peft as peft_io

PROMPTS = ["Say hello.", "Name a fruit.", "Count to three.", "What is rain?"]
QUESTIONS = [{"question": "What is the capital of France?", "answers": ["Paris"]},
             {"question": "What is 2 + 2?", "answers": ["4", "four"]}]


def noisy_adapters(cfg, seed=0):
    return random_adapters(cfg, seed, scale=0.5)


def zero_adapters(cfg):
    return jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), lora.adapter_shapes(cfg))


def lively(params, seed=0):
    """Random weights with larger scales than HF's init, whose greedy text varies (HF's tiny init
    repeats one newline token, which decodes to an empty answer)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        jax.random.normal(k, x.shape, x.dtype) / np.sqrt(x.shape[-2]) * (8.0 if x.ndim == 2 else 1.0)
        if x.ndim >= 2 else x for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def model_folder(tiny_chat_model, tmp_path_factory):
    """tiny_chat_model (real SmolLM2 tokenizer and template) with lively random weights."""
    model = api.load(str(tiny_chat_model))
    return hf.save_merged_model(lively(model.params), model.cfg, tmp_path_factory.mktemp("lively") / "model",
                                    model.tokenizer, tiny_chat_model, "float32")


@pytest.fixture(scope="module")
def chat_model(model_folder):
    return api.load(str(model_folder))


LORA = lora.lora_config(4, 8.0, 0.0, "q_proj,v_proj,down_proj", rslora=False)


# --------------------------------------------------------------------------------------------
# Pure pieces


def test_distinct_n_on_hand_made_strings():
    assert evaluate.distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert evaluate.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert evaluate.distinct_n(["The cat.", "the DOG"], 1) == pytest.approx(3 / 4)  # pooled, case-folded
    assert evaluate.distinct_n(["the cat", "the dog"], 2) == 1.0  # n-grams never span two texts
    assert evaluate.distinct_n(["same same same"], 1) == pytest.approx(1 / 3)
    assert evaluate.distinct_n(["one", ""], 2) == 0.0  # no bigram at all


def test_general_questions_filter_keeps_what_the_base_gets_right():
    questions = QUESTIONS + [{"question": "Opposite of hot?", "answers": ["cold"]},
                             {"question": "Largest ocean?", "answers": ["Pacific"]}]
    base_answers = ["It is Paris.", "Four", "Coldplay", "the pacific ocean"]
    assert evaluate.questions_base_knows(questions, base_answers) == [0, 1, 3]  # 'Coldplay' is not 'cold'
    assert evaluate.answer_matches("forty two", ["42", "forty two"])
    assert not evaluate.answer_matches("Parisian", ["Paris"])
    assert not evaluate.answer_matches("", ["Paris"])


# --------------------------------------------------------------------------------------------
# Forgetting on a tiny model


def test_drift_is_zero_against_itself_and_grows_when_params_change(chat_model):
    settings = evaluate.Settings(forget_max_new_tokens=12, batch_size=4)
    answers = evaluate.greedy_answers(chat_model, PROMPTS, max_new_tokens=12)
    assert any(answers)
    same = evaluate.drift(chat_model, chat_model.params, chat_model.params, None, PROMPTS, answers, settings)
    assert same["n_prompts"] == sum(1 for a in answers if a)
    assert same["delta"] == pytest.approx(0.0, abs=1e-6)
    assert same["finetuned_loss"] == pytest.approx(same["base_loss"], abs=1e-6)

    cfg = chat_model.cfg.replace(lora=LORA)
    zero = params_lib.merge_trees(chat_model.params, zero_adapters(cfg))
    assert evaluate.drift(chat_model, chat_model.params, zero, LORA, PROMPTS, answers,
                          settings)["delta"] == pytest.approx(0.0, abs=1e-5)
    changed = params_lib.merge_trees(chat_model.params, noisy_adapters(cfg))
    moved = evaluate.drift(chat_model, chat_model.params, changed, LORA, PROMPTS, answers, settings)
    assert moved["base_loss"] == pytest.approx(same["base_loss"], abs=1e-6)
    assert moved["delta"] > 0.1


def test_general_qa_reports_on_base_correct_questions_only(chat_model):
    settings = evaluate.Settings(batch_size=4)
    result = evaluate.general_qa(chat_model, chat_model.params, None, QUESTIONS, ["Paris", "no idea"], settings)
    assert (result["n_questions"], result["n_base_correct"], result["base_accuracy"]) == (2, 1, 0.5)
    assert result["finetuned_accuracy_on_base_correct"] in (0.0, 1.0)
    nothing = evaluate.general_qa(chat_model, chat_model.params, None, QUESTIONS, ["", ""], settings)
    assert nothing["finetuned_accuracy_on_base_correct"] is None


# --------------------------------------------------------------------------------------------
# Adapters for inference and the CLIs


@pytest.fixture(scope="module")
def peft_dirs(model_folder, chat_model, tmp_path_factory):
    """{'noisy': PEFT folder with random adapters, 'zero': PEFT folder with zero adapters}."""
    cfg = chat_model.cfg.replace(lora=LORA)
    root = tmp_path_factory.mktemp("adapters")
    return {name: peft_io.save_peft_adapter(adapters, cfg, root / name, str(model_folder))
            for name, adapters in (("noisy", noisy_adapters(cfg)), ("zero", zero_adapters(cfg)))}


def generate_cli(capsys, *args):
    generate.main(["--prompt", "Tell me about the sea.", "--max_new_tokens", "12", *args])
    return capsys.readouterr().out


def test_generate_with_a_peft_adapter(model_folder, peft_dirs, capsys):
    base = generate_cli(capsys, "--model", str(model_folder))
    assert base.strip()
    assert generate_cli(capsys, "--model", str(model_folder), "--adapter", str(peft_dirs["zero"])) == base
    noisy = generate_cli(capsys, "--model", str(model_folder), "--adapter", str(peft_dirs["noisy"]))
    assert noisy != base
    # Without --model the adapter's base_model_name_or_path is loaded.
    assert generate_cli(capsys, "--adapter", str(peft_dirs["noisy"])) == noisy


def fake_run(workdir, model_folder, lora_cfg, params, step=7, data=None, train=None):
    """A run with one checkpoint of `params` at `step`, whose config names a task and a max_len
    (`data` / `train` change keys of those groups)."""
    return write_run(workdir, model_folder, lora_cfg, {step: (params, 1.0)},
                     {"data": {"max_len": 256, **(data or {})}, "train": {"task": "arithmetic", **(train or {})}})


def test_load_for_inference_from_run_workdirs(model_folder, chat_model, tmp_path):
    cfg = chat_model.cfg.replace(lora=LORA)
    adapters = noisy_adapters(cfg, seed=3)
    run = fake_run(tmp_path / "lora_run", model_folder, LORA, adapters)
    model, params, lora_cfg = loading.load_for_inference(None, run)
    assert lora_cfg == LORA and model.cfg.lora is None
    assert leaves_equal(params, params_lib.merge_trees(chat_model.params, adapters))
    assert leaves_equal(model.params, chat_model.params)

    full = jax.tree_util.tree_map(lambda x: x + 0.01, chat_model.params)
    run = fake_run(tmp_path / "full_run", model_folder, None, full)
    model, params, lora_cfg = loading.load_for_inference(None, run)
    assert lora_cfg is None and leaves_equal(params, full)  # the run's params replace the base
    assert leaves_equal(model.params, chat_model.params)

    with pytest.raises(loading.InferenceError, match="neither a jaxtune workdir"):
        loading.load_for_inference(None, tmp_path)


def small_general_files(tmp_path):
    return ["--general_prompts", str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])),
            "--general_questions", str(write_jsonl(tmp_path / "q.jsonl", QUESTIONS))]


def test_evaluate_cli_with_a_peft_adapter_writes_every_section(model_folder, peft_dirs, tmp_path, capsys):
    out = tmp_path / "reports" / "eval.json"
    args = ["--model", str(model_folder), "--adapter", str(peft_dirs["noisy"]), "--task", "arithmetic",
            "--limit", "3", "--samples", "4", "--max_new_tokens", "8", "--batch_size", "4", "--max_len", "256",
            "--out", str(out), *small_general_files(tmp_path)]
    assert evaluate.main(args) == 0
    table = capsys.readouterr().out
    assert "held-out loss" in table and "distinct_2" in table and "finetuned" in table
    report = json.loads(out.read_text())
    assert report["task"] == "arithmetic" and report["adapter_kind"] == "peft"
    heldout = report["heldout"]
    assert heldout["n_examples"] == 3
    assert heldout["base"]["loss"] > 0 and heldout["finetuned"]["loss"] != heldout["base"]["loss"]
    assert heldout["base"]["perplexity"] == pytest.approx(np.exp(heldout["base"]["loss"]), rel=1e-4)
    assert set(report["task_scores"]) == {"base", "finetuned"}
    assert report["task_scores"]["finetuned"]["n"] == 3 and len(report["task_predictions"]) == 3
    forgetting = report["forgetting"]
    assert forgetting["drift"]["n_prompts"] > 0 and forgetting["drift"]["delta"] > 0
    assert forgetting["general_qa"]["n_questions"] == 2
    for column in ("base", "finetuned"):
        assert 0 < forgetting["diversity"][column]["distinct_1"] <= 1
        assert forgetting["diversity"][column]["samples"] == 4
    cache = out.parent / evaluate.BASE_CACHE
    assert len(json.loads(cache.read_text())["prompt_answers"]) == len(PROMPTS)


def test_evaluate_cli_on_a_workdir_defaults_to_its_model_task_and_reports_dir(model_folder, chat_model,
                                                                              tmp_path, capsys):
    run = fake_run(tmp_path / "run", model_folder, LORA, zero_adapters(chat_model.cfg.replace(lora=LORA)))
    assert evaluate.main(["--workdir", str(run), "--limit", "2", "--samples", "2", "--max_new_tokens", "8",
                          "--batch_size", "4", *small_general_files(tmp_path)]) == 0
    report = json.loads((run / "reports" / "eval_arithmetic.json").read_text())
    assert report["step"] == 7 and report["model"] == str(model_folder)
    # Zero adapters: the fine-tuned model is the base model.
    assert report["heldout"]["finetuned"]["loss"] == pytest.approx(report["heldout"]["base"]["loss"], abs=1e-5)
    assert report["forgetting"]["drift"]["delta"] == pytest.approx(0.0, abs=1e-5)
    assert report["task_scores"]["finetuned"]["accuracy"] == report["task_scores"]["base"]["accuracy"]
    assert (run / "reports" / evaluate.BASE_CACHE).exists()
    assert "error" not in capsys.readouterr().err


def test_evaluate_cli_user_errors_exit_2_with_one_message(model_folder, tmp_path, capsys):
    out = ["--out", str(tmp_path / "eval.json")]
    assert evaluate.main(["--model", str(model_folder), "--task", "nope", *out]) == 2
    assert capsys.readouterr().err.startswith("error: unknown task 'nope'; known tasks: ")
    missing = tmp_path / "missing.jsonl"  # found only once the model is loaded and the report starts
    assert evaluate.main(["--model", str(model_folder), "--eval_file", str(missing), "--max_len", "256", *out]) == 2
    assert capsys.readouterr().err.startswith(f"error: {missing}: no such file or directory")


# --------------------------------------------------------------------------------------------
# The run's template: prompts and scored conversations rendered as training rendered them


@pytest.fixture(scope="module")
def no_template_folder(model_folder, tmp_path_factory):
    """model_folder's weights and tokenizer without a chat template (as base models ship)."""
    import shutil

    folder = tmp_path_factory.mktemp("no_template") / "model"
    shutil.copytree(model_folder, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_file = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config.pop("chat_template", None)
    config_file.write_text(json.dumps(tokenizer_config))
    assert not api.load_tokenizer(folder).chat_template
    return folder


def task_example():
    from jaxtune import tasks

    return tasks.load_examples("viggo", "test")[0]


@pytest.mark.parametrize("template", ["auto", "none", "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                                      "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"])
def test_prompt_ids_are_the_training_tokens_before_the_answer(chat_model, template):
    from jaxtune import data

    example = task_example()
    [tokenized], _ = data.tokenize_examples([example], chat_model.tokenizer, 4096, template=template)
    [prompt] = generate.prompt_ids(chat_model.tokenizer, [evaluate.prompt_messages(example)], template)
    first_trained = int(np.argmax(tokenized.trained))
    assert prompt == tokenized.ids[:first_trained].tolist()  # the model continues where training taught it


def test_raw_prompts_have_no_chat_markup(chat_model):
    [chat] = generate.prompt_ids(chat_model.tokenizer, ["Name a fruit."], "auto")
    [raw] = generate.prompt_ids(chat_model.tokenizer, ["Name a fruit."], "none")
    assert "<|im_start|>" in chat_model.tokenizer.decode(chat)
    assert raw == chat_model.tokenizer("Name a fruit.")["input_ids"]


def test_greedy_answers_use_the_template(chat_model):
    from jaxtune import generate

    prompts = PROMPTS[:2]
    raw_ids = [chat_model.tokenizer(p)["input_ids"] for p in prompts]
    expected = [chat_model.tokenizer.decode(row, skip_special_tokens=True).strip()
                for row in generate.generate(chat_model, raw_ids, 8)]
    assert evaluate.greedy_answers(chat_model, prompts, max_new_tokens=8, template="none") == expected
    assert evaluate.greedy_answers(chat_model, prompts, max_new_tokens=8, template="auto") != expected


def generated_prompts(monkeypatch) -> list:
    """The prompt ids of every generate.generate call from now on (generate, evaluate and train all decode there)."""
    seen = []
    real = generate.generate
    monkeypatch.setattr(generate, "generate", lambda model, prompts, *args, **kwargs: (
        seen.append([list(p) for p in prompts]), real(model, prompts, *args, **kwargs))[1])
    return seen


@pytest.mark.parametrize("template", ["none", "auto", "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                                      "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"])
def test_generate_prompts_a_run_with_its_template_as_evaluate_does(model_folder, chat_model, tmp_path, monkeypatch,
                                                                   capsys, template):
    """`generate --adapter=RUN` renders its prompt with the run's data.template (here on a tokenizer
    that has a chat template), token for token as evaluate prompts that run."""
    run = fake_run(tmp_path / "run", model_folder, LORA, zero_adapters(chat_model.cfg.replace(lora=LORA)),
                   data={"template": template})
    seen = generated_prompts(monkeypatch)
    generate_cli(capsys, "--adapter", str(run))
    evaluate.greedy_answers(chat_model, ["Tell me about the sea."], max_new_tokens=4, template=template)
    from_cli, from_evaluate = seen
    assert from_cli == from_evaluate
    text = chat_model.tokenizer.decode(from_cli[0])
    assert ("<|im_start|>" in text) == (template == "auto") and ("<assistant>" in text) == (template not in
                                                                                            ("auto", "none"))
    # --template overrides the run's, and --raw is --template=none.
    generate_cli(capsys, "--adapter", str(run), "--raw")
    generate_cli(capsys, "--adapter", str(run), "--template", "none")
    assert seen[2] == seen[3] == generate.prompt_ids(chat_model.tokenizer, ["Tell me about the sea."], "none")


def test_a_run_given_as_adapter_is_evaluated_with_its_template(model_folder, chat_model, tmp_path, monkeypatch):
    run = fake_run(tmp_path / "run", model_folder, LORA, zero_adapters(chat_model.cfg.replace(lora=LORA)),
                   data={"template": "none"})
    assert loading.adapter_template(run) == "none" and loading.adapter_template(None) == "auto"
    out = tmp_path / "eval.json"
    assert evaluate.main(["--model", str(model_folder), "--adapter", str(run), "--task", "arithmetic", "--limit", "1",
                          "--samples", "1", "--max_new_tokens", "2", "--batch_size", "4", "--out", str(out),
                          *small_general_files(tmp_path)]) == 0
    assert json.loads(out.read_text())["settings"]["template"] == "none"


def test_max_len_and_mask_prompt_come_from_a_run_given_as_adapter_and_the_flags(model_folder, chat_model, peft_dirs,
                                                                              tmp_path, capsys):
    """Without --workdir the held-out loss is computed as the run trained (its data.max_len and
    data.mask_prompt) when --adapter is a run, and --max_len / --mask_prompt set them for any adapter."""
    run = fake_run(tmp_path / "run", model_folder, LORA, zero_adapters(chat_model.cfg.replace(lora=LORA)),
                   data={"max_len": 96, "mask_prompt": False})
    common = ["--model", str(model_folder), "--task", "arithmetic", "--limit", "2", "--samples", "1",
              "--max_new_tokens", "2", "--batch_size", "4", *small_general_files(tmp_path)]

    def evaluated(*flags):
        out = tmp_path / f"eval_{len(list(tmp_path.glob('eval_*.json')))}.json"
        assert evaluate.main([*common, *flags, "--out", str(out)]) == 0, capsys.readouterr().err
        report = json.loads(out.read_text())
        return report["settings"], report["heldout"]["base"]["target_tokens"]

    settings, run_tokens = evaluated("--adapter", str(run))
    assert (settings["max_len"], settings["mask_prompt"]) == (96, False)
    settings, masked_tokens = evaluated("--adapter", str(run), "--max_len", "128", "--mask_prompt", "true")
    assert (settings["max_len"], settings["mask_prompt"]) == (128, True)
    settings, peft_tokens = evaluated("--adapter", str(peft_dirs["zero"]), "--max_len", "96", "--mask_prompt", "false")
    assert (settings["max_len"], settings["mask_prompt"]) == (96, False)
    assert peft_tokens == run_tokens > masked_tokens  # prompt tokens count only without the mask


@pytest.mark.parametrize("flag, message", [
    (["--mask_prompt", "maybe"], "argument --mask_prompt: 'maybe': give true or false"),
    (["--max_len", "4"], "--max_len=4: give at least 8 tokens (or 0 for the default)"),
])
def test_bad_max_len_or_mask_prompt_is_one_usage_error_naming_the_flag(flag, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args(["--model", "m", "--task", "arithmetic", *flag])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_generate_without_a_chat_template_is_one_clear_error(no_template_folder, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--model", str(no_template_folder), "--prompt", "Hi", "--max_new_tokens", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "the tokenizer has no chat template" in err and "--raw" in err


def test_the_base_answers_cache_is_keyed_by_the_template():
    auto, none = evaluate.Settings(template="auto"), evaluate.Settings(template="none")
    assert (evaluate.reference_key("m", PROMPTS, QUESTIONS, auto)
            != evaluate.reference_key("m", PROMPTS, QUESTIONS, none))


def test_evaluate_on_a_raw_text_run_scores_with_raw_text(no_template_folder, chat_model, tmp_path, capsys):
    """A run trained with data.template=none on a tokenizer without a chat template: every section
    renders raw text (the same figures as tokenizing with template none), and nothing crashes."""
    from jaxtune import data

    run = fake_run(tmp_path / "run", no_template_folder, LORA, noisy_adapters(chat_model.cfg.replace(lora=LORA)),
                   data={"template": "none"})
    assert evaluate.main(["--workdir", str(run), "--limit", "3", "--samples", "2", "--max_new_tokens", "8",
                          "--batch_size", "4", *small_general_files(tmp_path)]) == 0
    report = json.loads((run / "reports" / "eval_arithmetic.json").read_text())
    assert report["settings"]["template"] == "none"
    rows, _ = evaluate.heldout_rows("arithmetic", "test", None, 3)
    raw, _ = data.tokenize_examples(rows, chat_model.tokenizer, 256, template="none")
    expected = evaluate.tokenized_loss(chat_model, raw)
    assert report["heldout"]["base"]["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert report["heldout"]["base"]["target_tokens"] == expected["target_tokens"]
    chat, _ = data.tokenize_examples(rows, chat_model.tokenizer, 256, template="auto")
    assert evaluate.tokenized_loss(chat_model, chat)["loss"] != pytest.approx(expected["loss"], rel=1e-3)
    assert report["task_scores"]["base"]["n"] == 3 and report["forgetting"]["drift"]["n_prompts"] > 0
    assert "error" not in capsys.readouterr().err


def test_no_chat_template_and_a_task_is_one_clear_error(no_template_folder, chat_model, tmp_path, capsys):
    run = fake_run(tmp_path / "run", no_template_folder, LORA, zero_adapters(chat_model.cfg.replace(lora=LORA)),
                   data={"template": "auto"})
    assert evaluate.main(["--workdir", str(run), "--limit", "2", *small_general_files(tmp_path)]) == 2
    err = capsys.readouterr().err
    [error] = [line for line in err.splitlines() if line.startswith("error:")]  # one line (logs aside)
    assert error.startswith("error: task arithmetic prompts the model with conversations, but the tokenizer has no "
                            "chat template") and "--template=none" in error and "Traceback" not in err
    assert not (run / "reports").exists()  # stopped before any compute
    # The same run evaluated with the template named on the command line works.
    assert evaluate.main(["--workdir", str(run), "--template", "none", "--limit", "2", "--samples", "2",
                          "--max_new_tokens", "4", "--batch_size", "4", *small_general_files(tmp_path)]) == 0


def test_a_run_without_a_task_is_evaluated_on_its_eval_set(model_folder, chat_model, tmp_path, capsys):
    held_out = write_jsonl(tmp_path / "valid.jsonl", [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "Fine."}]} for p in PROMPTS])
    run = fake_run(tmp_path / "run", model_folder, LORA, zero_adapters(chat_model.cfg.replace(lora=LORA)),
                   data={"train": "my.jsonl", "eval": str(held_out)}, train={"task": "auto"})
    assert evaluate.main(["--workdir", str(run), "--samples", "2", "--batch_size", "4",
                          *small_general_files(tmp_path)]) == 0
    report = json.loads((run / "reports" / "eval_heldout.json").read_text())
    assert report["task"] is None and "task_scores" not in report
    assert report["heldout"]["source"] == str(held_out) and report["heldout"]["n_examples"] == len(PROMPTS)
    nothing = fake_run(tmp_path / "bare", model_folder, LORA, zero_adapters(chat_model.cfg.replace(lora=LORA)),
                       data={"train": "my.jsonl", "eval": "auto"}, train={"task": "auto"})
    capsys.readouterr()
    assert evaluate.main(["--workdir", str(nothing)]) == 2
    assert "--task=NAME or --eval_file=JSONL" in capsys.readouterr().err


def tiny_run_config(model, data_file, **changes):
    """configs/tiny.py for `model` and `data_file`, with 'group.key': value changes."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
    spec = importlib.util.spec_from_file_location("tiny_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.path, config.data.train = str(model), str(data_file)
    for key, value in changes.items():
        group, name = key.split(".")
        setattr(config[group], name, value)
    return config


def arithmetic_rows(n=8):
    return [{"prompt": f"What is {i} + {i}?", "completion": str(2 * i)} for i in range(n)]


def test_training_with_a_task_but_no_chat_template_stops_before_any_compute(no_template_folder, tmp_path):
    from jaxtune import config as config_lib
    from jaxtune import train

    data = write_jsonl(tmp_path / "text.jsonl", [{"text": f"Line {i} of plain text."} for i in range(8)])
    config = tiny_run_config(no_template_folder, data, **{"train.task": "arithmetic"})
    with pytest.raises(config_lib.ConfigError, match=r"train.task=arithmetic prompts the model with conversations, "
                       r"but the tokenizer has no chat template and data.template is auto: set data.template=none"):
        train.run(config, tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()  # stopped before data, weights and steps


def test_a_raw_text_run_scores_its_task_with_raw_prompts_and_keeps_the_last_checkpoints(
        no_template_folder, tmp_path, monkeypatch):
    """data.template=none on a tokenizer without a chat template: the task is prompted with raw text
    before and after training; without an eval set only the last K checkpoints are kept, and
    `export --step=best` says why there is no best."""
    from jaxtune import train

    templates = []
    prompt_ids = generate.prompt_ids
    monkeypatch.setattr(generate, "prompt_ids", lambda tok, prompts, template="auto": (
        templates.append(template), prompt_ids(tok, prompts, template))[1])
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows())
    config = tiny_run_config(no_template_folder, data, **{
        "data.template": "none", "train.task": "arithmetic", "train.task_examples": 2, "train.task_max_new_tokens": 4,
        "train.steps": 3, "checkpoint.every": 1, "checkpoint.keep": 1})
    result = train.run(config, tmp_path / "run")
    assert result.task_before["n"] == 2 and result.task_after["n"] == 2 and result.eval_before is None
    assert templates and set(templates) == {"none"}
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (recorded["data"]["eval"], recorded["train"]["task"]) == ("", "arithmetic")  # auto resolved
    from jaxtune import checkpoint

    assert sorted(checkpoint.step_dirs(tmp_path / "run" / "checkpoints")) == [3]  # keep_best without eval: last K
    with pytest.raises(hf.ExportError, match="data.eval"):
        workdir_lib.resolve_step(tmp_path / "run", "best")
