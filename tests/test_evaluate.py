"""Evaluation: distinct-n, the general-question filter, forgetting drift, the evaluate CLI end to end,
and loading adapters for inference (PEFT folders, run workdirs, `generate --adapter`)."""

import json

import jax
import numpy as np
import pytest

from conftest import leaves_equal, random_adapters, write_jsonl, write_run
from jaxtune import api, evaluate, generate, hf, loading, lora
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


def fake_run(workdir, model_folder, lora_cfg, params, step=7):
    """A run with one checkpoint of `params` at `step`, whose config names a task and a max_len."""
    return write_run(workdir, model_folder, lora_cfg, {step: (params, 1.0)},
                     {"data": {"max_len": 256}, "train": {"task": "arithmetic"}})


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
