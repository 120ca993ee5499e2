"""Many adapters, one base, one batch (jaxtune.multi_adapter, jaxtune.models.multi_lora, the
generate CLI's --adapters/--prompts): every row of a mixed batch equals its adapter alone, and PEFT.

Adapters are made and saved by peft itself (random non-zero A and B, different ranks, alphas,
targets, rsLoRA), over tiny random models; the slow test does the same over the real SmolLM2.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build_tiny_hf_model, require_reference, save_random_peft_adapter
from jaxtune import api, multi_adapter
from jaxtune import generate as gen
from jaxtune import params as params_lib
from jaxtune import peft as peft_io
from jaxtune.models import multi_lora
from jaxtune.multi_adapter import AdapterBank, AdapterError

peft = require_reference("peft")
torch = require_reference("torch")
transformers = require_reference("transformers")

# name -> (rank, alpha, targets, rsLoRA): mixed ranks and target sets, one rsLoRA.
ADAPTERS = {
    "qv": (2, 4, ["q_proj", "v_proj"], False),
    "all": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
    "mlp": (4, 32, ["gate_proj", "down_proj", "o_proj"], False),
}
ROW_ADAPTERS = [None, "qv", "all", "mlp", "all", None, "mlp", "qv"]
WEIGHT_SCALE = 6.0  # sharper tiny models: greedy choices far from ties


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def fresh_hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def make_adapters(folder, root, specs=ADAPTERS, scale=0.05):
    """{name: (dir, PeftModel)} for specs, saved under root."""
    return {name: (root / name, save_random_peft_adapter(folder, root / name, *spec, seed=i, scale=scale))
            for i, (name, spec) in enumerate(specs.items())}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(base folder, HF base model, {name: (adapter dir, PeftModel)}) of a tiny tied Llama (SmolLM2-like)."""
    folder = tmp_path_factory.mktemp("multi_base")
    torch_model = build_tiny_hf_model("smollm2", folder)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if name.endswith("weight") and "norm" not in name:
                p.mul_(WEIGHT_SCALE)
    torch_model.save_pretrained(folder)
    return folder, torch_model, make_adapters(folder, tmp_path_factory.mktemp("multi_adapters"))


def bank_of(model, adapters, **kwargs):
    return AdapterBank.from_dirs(model.cfg, {name: str(d) for name, (d, _) in adapters.items()}, **kwargs)


def ragged_prompts(n, seed=0, vocab=256):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=int(rng.integers(2, 14))).tolist() for _ in range(n)]


# --------------------------------------------------------------------------------------------
# The per-row delta


@pytest.mark.parametrize("tokens", [1, 3])
def test_every_delta_kernel_equals_the_per_row_product(tokens):
    """Packed columns: adapter 1 owns columns 3, 0 (rank 2), adapter 2 columns 1, 4, 6 (rank 3), adapter 3
    column 5; column 2 is free (zeros). Rows of the base (slot 0) own none."""
    key_x, key_a, key_b = jax.random.split(jax.random.key(0), 3)
    x_BxTxI = jax.random.normal(key_x, (6, tokens, 16))
    columns_C = np.array([1, 2, -1, 1, 2, 3, 2], np.int32)
    a_IxC = jax.random.normal(key_a, (16, 7)).at[:, 2].set(0.0)
    b_CxO = jax.random.normal(key_b, (7, 12)).at[2].set(0.0)
    rows_B = np.array([2, 0, 3, 2, 1, 0], np.int32)
    row_columns_BxR = np.full((6, 3), 7, np.int32)
    for b, slot in enumerate(rows_B):
        own = np.flatnonzero(columns_C == slot) if slot else []
        row_columns_BxR[b, :len(own)] = own
    bank = {multi_lora.ROWS: jnp.asarray(rows_B), multi_lora.COLUMNS: jnp.asarray(columns_C),
            multi_lora.ROW_COLUMNS: jnp.asarray(row_columns_BxR)}
    want = np.stack([np.asarray(x_BxTxI[b] @ a_IxC[:, columns_C == r] @ b_CxO[columns_C == r])
                     for b, r in enumerate(rows_B.tolist())])
    for delta in (multi_lora.gathered_delta, multi_lora.all_columns_delta):
        got = jax.jit(lambda *args: delta(*args, dtype=jnp.float32))(x_BxTxI, a_IxC, b_CxO, bank)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=delta.__name__)
    assert not np.asarray(want[1]).any() and not np.asarray(want[5]).any()  # slot 0: the base, no delta
    assert np.asarray(want[2]).any()


def test_decoding_takes_the_all_columns_kernel_and_prefill_the_gathered_one():
    assert multi_lora.delta_kernel(1) is multi_lora.all_columns_delta
    assert multi_lora.delta_kernel(31) is multi_lora.gathered_delta


# --------------------------------------------------------------------------------------------
# The bank against PEFT and against one adapter at a time


@pytest.fixture(params=["gathered_delta", "all_columns_delta"])
def kernel(request, monkeypatch):
    """Every bank layer computes its delta with this kernel, whatever the shapes (programs retraced)."""
    chosen = getattr(multi_lora, request.param)
    monkeypatch.setattr(multi_lora, "delta_kernel", lambda tokens_per_row: chosen)
    jax.clear_caches()
    yield chosen
    jax.clear_caches()


def test_mixed_batch_logits_equal_peft_for_each_rows_adapter(tiny, kernel):
    folder, torch_model, adapters = tiny
    model = api.load(str(folder), with_tokenizer=False)
    bank = bank_of(model, adapters)
    assert bank.max_rank == 8 and bank.targets == tuple(ADAPTERS["all"][2])
    assert bank.columns == sum(spec[0] for spec in ADAPTERS.values())  # packed: the ranks' sum, no padding
    tokens = np.random.default_rng(1).integers(3, 256, size=(len(ROW_ADAPTERS), 9)).astype(np.int32)
    ours = api.logits(model, tokens, params=bank.params(model.params, bank.rows(ROW_ADAPTERS)))
    for row, name in enumerate(ROW_ADAPTERS):
        reference = torch_model if name is None else adapters[name][1]
        np.testing.assert_allclose(ours[row], torch_logits(reference, tokens[row:row + 1])[0], atol=1e-4,
                                   err_msg=f"row {row} ({name or 'base'})")
    base = torch_logits(torch_model, tokens)
    for row, name in enumerate(ROW_ADAPTERS):  # the adapters matter (so equality above means something)
        assert (np.abs(ours[row] - base[row]).max() > 1e-2) == (name is not None)


def test_mixed_batch_greedy_tokens_equal_each_adapter_alone(tiny):
    folder, _, adapters = tiny
    model = api.load(str(folder), with_tokenizer=False)
    bank = bank_of(model, adapters)
    prompts = ragged_prompts(len(ROW_ADAPTERS))
    mixed = gen.generate_with_adapters(model, bank, prompts, ROW_ADAPTERS, 12, eos_ids=[])
    for name in [None, *ADAPTERS]:
        rows = [i for i, n in enumerate(ROW_ADAPTERS) if n == name]
        if name is None:
            alone = gen.generate(model, [prompts[i] for i in rows], 12, eos_ids=[])
        else:  # the ordinary single-adapter path (lora_dense over the adapter's own params)
            tree, lora_cfg = peft_io.load_peft_adapter(adapters[name][0], model.cfg)
            alone = gen.generate(model, [prompts[i] for i in rows], 12, eos_ids=[],
                                 params=params_lib.merge_trees(model.params, tree), lora=lora_cfg)
        assert [mixed[i] for i in rows] == alone, name
    assert len({tuple(row) for row in mixed}) > 4  # rows differ: adapters and prompts matter


def test_one_compiled_program_serves_every_mix_of_adapters(tiny):
    folder, _, adapters = tiny
    model = api.load(str(folder), with_tokenizer=False)
    bank = bank_of(model, adapters)
    prompts = ragged_prompts(4, seed=3)
    gen.generate_with_adapters(model, bank, prompts, ["qv", "qv", "qv", "qv"], 8, eos_ids=[])
    compiled = gen.generate_padded._cache_size()
    outputs = [gen.generate_with_adapters(model, bank, prompts, mix, 8, eos_ids=[])
               for mix in (["all", None, "mlp", "qv"], [None] * 4, ["mlp", "mlp", "all", None])]
    assert gen.generate_padded._cache_size() == compiled
    assert outputs[0] != outputs[1]


def test_decoding_in_chunks_gives_the_tokens_of_one_loop(tiny):
    folder, _, adapters = tiny
    model = api.load(str(folder), with_tokenizer=False)
    bank = bank_of(model, adapters)
    prompts = ragged_prompts(len(ROW_ADAPTERS), seed=7)
    params = bank.params(model.params, bank.rows(ROW_ADAPTERS))
    for sampling in ({}, {"temperature": 0.8, "top_p": 0.9, "seed": 3}):
        whole = gen.generate(model, prompts, 13, eos_ids=[], params=params, **sampling)
        for chunk in (1, 5):
            pieces = list(gen.generate_chunks(model, prompts, 13, chunk, eos_ids=[], params=params, **sampling))
            assert [p.shape for p in pieces] == [(8, 1)] + [(8, chunk)] * (12 // chunk) + [(8, 12 % chunk)] * (chunk == 5)
            assert np.concatenate(pieces, axis=1).tolist() == whole, (sampling, chunk)
    eos = whole[0][4]  # a token row 0 emits (sampled, the last `whole`): every row stops at its first one
    stopped = gen.generate(model, prompts, 13, eos_ids=[eos], params=params, **sampling)
    pieces = list(gen.generate_chunks(model, prompts, 13, 3, eos_ids=[eos], params=params, **sampling))
    assert [gen.cut_at_eos(row, [eos], 13) for row in np.concatenate(pieces, axis=1)] == stopped
    assert len(stopped[0]) == whole[0].index(eos)


def test_load_and_unload_keep_shapes_and_free_slots(tiny):
    folder, _, adapters = tiny
    model = api.load(str(folder), with_tokenizer=False)
    bank = AdapterBank(model.cfg, capacity=3, max_rank=8)
    tree, lora_cfg = peft_io.load_peft_adapter(adapters["all"][0], model.cfg)
    prompts = ragged_prompts(2, seed=5)
    before = gen.generate(model, prompts, 6, eos_ids=[])
    assert bank.add("a", tree, lora_cfg) == 1
    with_adapter = gen.generate_with_adapters(model, bank, prompts, ["a", None], 6, eos_ids=[])
    assert with_adapter[1] == before[1] and with_adapter[0] != before[0]
    qv_tree, qv_cfg = peft_io.load_peft_adapter(adapters["qv"][0], model.cfg)
    assert bank.add("b", qv_tree, qv_cfg) == 2
    with pytest.raises(AdapterError, match="slots are taken"):
        bank.add("c", qv_tree, qv_cfg)
    bank.remove("a")
    assert bank.rows([None, "b"]).tolist() == [0, 2]
    with pytest.raises(AdapterError, match="unknown adapter"):
        bank.rows(["a"])
    assert bank.add("c", qv_tree, qv_cfg) == 1  # the freed slot, zeroed first: c's rows equal b's
    assert (gen.generate_with_adapters(model, bank, prompts, ["c", "c"], 6, eos_ids=[])
            == gen.generate_with_adapters(model, bank, prompts, ["b", "b"], 6, eos_ids=[]))


def test_ranks_are_packed_into_the_banks_columns(tiny):
    """An adapter takes as many columns as its rank, wherever they are free (after an unload, in pieces);
    the bank refuses one whose rank does not fit in the free columns, and rows still equal each adapter."""
    folder, _, adapters = tiny
    model = api.load(str(folder), with_tokenizer=False)
    trees = {name: peft_io.load_peft_adapter(adapters[name][0], model.cfg) for name in ("qv", "all", "mlp")}
    bank = AdapterBank(model.cfg, capacity=5, max_rank=8, columns=12)  # qv r2, all r8, mlp r4
    bank.add("qv", *trees["qv"])
    bank.add("all", *trees["all"])
    assert bank.column_slots.tolist() == [1] * 2 + [2] * 8 + [-1] * 2
    with pytest.raises(AdapterError, match="needs 4 rank columns but 2 of this bank's 12 are free"):
        bank.add("mlp", *trees["mlp"])
    bank.remove("qv")
    bank.add("mlp", *trees["mlp"])  # columns 0, 1 (qv's) and 10, 11: not adjacent
    assert bank.column_slots.tolist() == [1] * 2 + [2] * 8 + [1] * 2
    assert bank.row_columns(bank.rows(["mlp", None])).tolist() == [[0, 1, 10, 11] + [12] * 4, [12] * 8]
    prompts = ragged_prompts(4, seed=11)
    names = ["mlp", "all", None, "mlp"]
    mixed = gen.generate_with_adapters(model, bank, prompts, names, 6, eos_ids=[])
    for name in ("mlp", "all"):
        rows = [i for i, n in enumerate(names) if n == name]
        tree, lora_cfg = trees[name]
        alone = gen.generate(model, [prompts[i] for i in rows], 6, eos_ids=[],
                             params=params_lib.merge_trees(model.params, tree), lora=lora_cfg)
        assert [mixed[i] for i in rows] == alone, name


def test_bank_refusals_name_the_fix(tiny, tmp_path):
    folder, _, adapters = tiny
    model = api.load(str(folder), with_tokenizer=False)
    tree, lora_cfg = peft_io.load_peft_adapter(adapters["all"][0], model.cfg)
    with pytest.raises(AdapterError, match="max rank 4"):
        AdapterBank(model.cfg, capacity=4, max_rank=4).add("big", tree, lora_cfg)
    with pytest.raises(AdapterError, match="does not hold"):
        AdapterBank(model.cfg, capacity=4, max_rank=8, targets=["q_proj"]).add("x", tree, lora_cfg)
    with pytest.raises(AdapterError, match="linear layers only"):
        AdapterBank(model.cfg, capacity=4, max_rank=8, targets=["q_proj", "lm_head"])
    save_random_peft_adapter(folder, tmp_path / "embed", 4, 8, ["q_proj", "embed_tokens"], False, seed=9)
    with pytest.raises(AdapterError, match="embed_tokens"):
        AdapterBank.from_dirs(model.cfg, {"embed": str(tmp_path / "embed")})
    with pytest.raises(AdapterError, match="already loaded"):
        bank_of(model, adapters).add("qv", tree, lora_cfg)
    with pytest.raises(AdapterError, match="NAME=DIR"):
        multi_adapter.parse_adapter_specs("a=x,b")
    with pytest.raises(AdapterError, match="twice"):
        multi_adapter.parse_adapter_specs("a=x,a=y")
    assert multi_adapter.parse_adapter_specs(" a=x , b=y/z ") == {"a": "x", "b": "y/z"}


# --------------------------------------------------------------------------------------------
# The CLI: --adapters + --prompts


@pytest.fixture(scope="module")
def chat_adapters(tiny_chat_model, tmp_path_factory):
    """PEFT adapters over the tiny chat model (SmolLM2's tokenizer and template)."""
    return make_adapters(tiny_chat_model, tmp_path_factory.mktemp("chat_adapters"), scale=0.3)


def test_cli_prompts_file_completes_every_row_with_its_adapter(tiny_chat_model, chat_adapters, tmp_path, capsys):
    rows = [{"adapter": "qv", "prompt": "Hello there"}, {"adapter": None, "prompt": "What is 2+2?"},
            {"adapter": "all", "messages": [{"role": "user", "content": "Name a colour."}]},
            {"adapter": "mlp", "prompt": "Hello there", "id": 7}, {"prompt": "Hello there"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = ",".join(f"{name}={d}" for name, (d, _) in chat_adapters.items())
    gen.main([f"--model={tiny_chat_model}", f"--adapters={spec}", f"--prompts={prompts}", "--max_new_tokens=8",
              f"--out={tmp_path / 'out.jsonl'}", "--batch_size=4"])
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in row.items() if k != "completion"} for row in out] == rows
    for row, done in zip(rows, out):  # each equals that adapter (or the base) run on its own
        model, params, lora_cfg = gen.load_for_inference(
            str(tiny_chat_model), chat_adapters[row["adapter"]][0] if row.get("adapter") else None)
        [text] = gen.generate_text(model, [row.get("messages") or row["prompt"]], 8, params=params, lora=lora_cfg)
        assert done["completion"] == text, row
    assert len({row["completion"] for row in out}) >= 3

    gen.main([f"--model={tiny_chat_model}", f"--adapters={spec}", f"--prompts={prompts}", "--max_new_tokens=8"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == out  # stdout without --out


def test_cli_prompts_file_errors_name_the_line(tiny_chat_model, chat_adapters, tmp_path, capsys):
    spec = f"qv={chat_adapters['qv'][0]}"
    bad = {"unknown.jsonl": ('{"adapter": "nope", "prompt": "x"}\n', r"unknown.jsonl:1: adapter 'nope'"),
           "broken.jsonl": ('{"prompt": "x"}\n{"prompt": \n', r"broken.jsonl:2: not JSON"),
           "both.jsonl": ('{"prompt": "x", "messages": []}\n', r'both.jsonl:1: a row is an object with "prompt"')}
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            gen.main([f"--model={tiny_chat_model}", f"--adapters={spec}", f"--prompts={tmp_path / name}"])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The real model


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_mixed_batch_equals_peft_and_each_adapter_alone(smollm2_folder, tmp_path):
    model = api.load(str(smollm2_folder))
    chats = ["What is the capital of France?", "Write a haiku about rain.", "What is 12 * 7?", "Hi!"]
    names = [None, "qv", "all", "mlp", "all", "qv", None, "mlp"]
    prompts = gen.prompt_ids(model.tokenizer, [chats[i % len(chats)] for i in range(len(names))])
    tokens = np.asarray([p[-12:] for p in prompts], np.int32)  # equal lengths: no padding for PEFT
    # One torch model at a time (each is 540 MB): its reference logits for its rows, then dropped.
    reference = {None: torch_logits(fresh_hf_model(smollm2_folder), tokens)}
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        reference[name] = torch_logits(save_random_peft_adapter(smollm2_folder, tmp_path / name, *spec, seed=i,
                                                                scale=0.02), tokens)
    bank = AdapterBank.from_dirs(model.cfg, {name: str(tmp_path / name) for name in ADAPTERS})
    ours = api.logits(model, tokens, params=bank.params(model.params, bank.rows(names)))
    single = {None: api.logits(model, tokens)}  # jaxtune's one-adapter path (checked against PEFT in test_export)
    for name in ADAPTERS:
        tree, lora_cfg = peft_io.load_peft_adapter(tmp_path / name, model.cfg)
        single[name] = api.logits(model, tokens, params=params_lib.merge_trees(model.params, tree), lora=lora_cfg)
    # Over 30 float32 layers (logits up to ~40) the port itself is ~1.1e-4 from HF on the base model,
    # so the PEFT comparison allows 2e-4 (the tiny-model test above holds 1e-4); against the
    # one-adapter path, float32 rounding (scaling folded into B, another summation order) reached
    # 5e-5 after 30 layers.
    for row, name in enumerate(names):
        what = f"row {row} ({name or 'base'})"
        np.testing.assert_allclose(ours[row], single[name][row], atol=1e-4, err_msg=what)
        np.testing.assert_allclose(ours[row], reference[name][row], atol=2e-4, err_msg=what)
        if name is not None:
            assert np.abs(reference[name][row] - reference[None][row]).max() > 1e-2  # the adapter matters

    mixed = gen.generate_with_adapters(model, bank, prompts, names, 24)
    for name in [None, *ADAPTERS]:
        rows = [i for i, n in enumerate(names) if n == name]
        if name is None:
            alone = gen.generate(model, [prompts[i] for i in rows], 24)
        else:
            tree, lora_cfg = peft_io.load_peft_adapter(tmp_path / name, model.cfg)
            alone = gen.generate(model, [prompts[i] for i in rows], 24,
                                 params=params_lib.merge_trees(model.params, tree), lora=lora_cfg)
        assert [mixed[i] for i in rows] == alone, name
