"""Bundled tasks: deterministic disjoint generators, scorers, public-row mappers, shipped data."""

import json

import pytest

from jaxtune import tasks
from jaxtune.tasks import arithmetic, common, sql, viggo

SPLITS = ("train", "validation", "test")


def _assistant(example):
    return example["messages"][2]["content"]


# ----------------------------------------------------------------------------- generators

@pytest.mark.parametrize("name", tasks.NAMES)
def test_generator_is_deterministic_and_well_formed(name):
    task = tasks.get(name)
    first = task.generate("train", 60, seed=3)
    assert first == task.generate("train", 60, seed=3)
    assert first != task.generate("train", 60, seed=4)
    for ex in first:
        roles = [m["role"] for m in ex["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert ex["messages"][0]["content"] == task.DESCRIPTION
        assert ex["messages"][1]["content"].strip() and _assistant(ex).strip()
        assert ex["task"] == name
        json.dumps(ex)
    assert len({ex["id"] for ex in first}) == len(first)


@pytest.mark.parametrize("name", tasks.NAMES)
def test_splits_are_disjoint_even_with_equal_seeds(name):
    task = tasks.get(name)
    keys = {}
    for split in SPLITS:
        examples = task.generate(split, 150, seed=0)
        keys[split] = {ex["messages"][1]["content"] for ex in examples}
        answers = {ex["answer"] for ex in examples}
        keys[split + "/answer"] = answers
        assert len(keys[split]) == 150  # no duplicates inside a split
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    if name != "arithmetic":  # viggo and sql split on the reference itself
        assert not keys["train/answer"] & keys["test/answer"]


@pytest.mark.parametrize("name", tasks.NAMES)
def test_references_score_correct(name):
    task = tasks.get(name)
    examples = task.generate("validation", 40, seed=1)
    result = tasks.score_all(name, [_assistant(ex) for ex in examples], examples)
    assert result["n"] == 40 and result["accuracy"] == 1.0 and result["errors"] == 0


def test_unknown_task_and_split():
    with pytest.raises(KeyError, match="viggo"):
        tasks.get("nope")
    with pytest.raises(ValueError, match="split"):
        viggo.generate("dev", 3, 0)


def test_bad_task_requests_are_task_errors_naming_the_fix():
    """What a user can get wrong (a split, a size, a prediction list) is a JaxtuneError, which the CLIs
    print as one line, and still the ValueError it was."""
    from jaxtune.errors import JaxtuneError
    from jaxtune.tasks.common import TaskError

    assert issubclass(TaskError, JaxtuneError) and issubclass(TaskError, ValueError)
    with pytest.raises(TaskError, match="unknown split 'dev': use one of train, validation, test"):
        tasks.data_file("viggo", "dev")
    with pytest.raises(TaskError, match="viggo: asked for -1 train examples; the number of examples must be >= 0"):
        viggo.generate("train", -1, 0)
    with pytest.raises(TaskError, match=r"toy: asked for 5 distinct train examples, but .* found only [0-4]: .* "
                                        r"ask for at most"):
        common.generate_split("toy", "train", 5, 0, lambda rng: {"x": rng.randint(0, 3)}, lambda ex: str(ex["x"]))
    with pytest.raises(TaskError, match="2 predictions for 3 examples of task viggo: pass one prediction per example"):
        tasks.score_all("viggo", ["a", "b"], viggo.generate("test", 3, 0))


def test_the_build_command_reports_an_unknown_task_in_one_line(tmp_path, capsys):
    from jaxtune.tasks import build

    with pytest.raises(SystemExit) as exit_info:
        build.main(["--out", str(tmp_path), "--tasks", "nope"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: unknown task 'nope'; known tasks: ")


def test_viggo_examples_are_short():
    examples = viggo.generate("train", 300, 0)
    words = [len(ex["messages"][1]["content"].split()) for ex in examples]
    assert max(words) <= 40 and sum(words) / len(words) < 30
    assert max(len(ex["answer"]) for ex in examples) < 160
    assert {ex["act"] for ex in examples} == set(viggo.GENERATED_ACTS)


def test_arithmetic_steps_are_consistent():
    for ex in arithmetic.generate("train", 200, 0):
        lines = _assistant(ex).splitlines()
        assert lines[-1] == f"#### {ex['answer']}"
        assert 2 <= len(lines) - 1 <= 4
        assert int(ex["answer"]) >= 0


# ----------------------------------------------------------------------------- viggo scoring

VIGGO_EX = {"answer": "inform(name[Neon Drift], release_year[2004], genres[driving/racing], "
                      "platforms[PC, Xbox], rating[good])"}


def test_viggo_exact_match_ignores_order_case_and_spacing():
    pred = ("inform( rating[Good], platforms[xbox,PC], name[Neon Drift], "
            "genres[driving/racing], release_year[2004] )")
    result = viggo.score(pred, VIGGO_EX)
    assert result["correct"] and result["slot_f1"] == 1.0


def test_viggo_partial_credit():
    pred = "inform(name[Neon Drift], release_year[2005], platforms[PC], rating[good])"
    result = viggo.score(pred, VIGGO_EX)
    assert not result["correct"] and result["valid"] and result["act_correct"]
    # gold pairs: act, name, year, genre, PC, Xbox, rating = 7; predicted: act, name, 2005, PC,
    # rating = 5; hits = 4.
    assert result["slot_precision"] == pytest.approx(4 / 5)
    assert result["slot_recall"] == pytest.approx(4 / 7)
    wrong_act = viggo.score(VIGGO_EX["answer"].replace("inform", "recommend"), VIGGO_EX)
    assert not wrong_act["correct"] and not wrong_act["act_correct"]
    assert wrong_act["slot_f1"] == pytest.approx(6 / 7)


@pytest.mark.parametrize("pred", [
    "inform(name[Neon Drift, release_year[2004])",      # unbalanced brackets
    "inform(name[Neon Drift]], release_year[2004])",
    "inform(name[Neon Drift], release_year[2004]",       # missing closing parenthesis
    "describe(name[Neon Drift])",                       # unknown act
    "inform(name[Neon Drift] release_year[2004])",      # missing comma
    "",
    "Neon Drift is a racing game.",
])
def test_viggo_malformed_scores_zero(pred):
    result = viggo.score(pred, VIGGO_EX)
    assert result["correct"] is False and result["valid"] is False
    assert result["slot_f1"] == 0.0 and result["error"]


def test_viggo_values_with_parentheses_and_empty_slots_parse():
    act, slots = viggo.parse_mr("verify_attribute(name[X], esrb[M (for Mature)], rating[poor])")
    assert act == "verify_attribute" and slots["esrb"] == {"m (for mature)"}
    act, slots = viggo.parse_mr("request_attribute(player_perspective[])")
    assert slots == {"player_perspective": {""}}


# ----------------------------------------------------------------------------- sql scoring

SQL_CONTEXT = "CREATE TABLE employees (name TEXT, department TEXT, salary INTEGER, age INTEGER)"


def _sql_example(query, seed=7):
    return {"context": SQL_CONTEXT, "answer": query, "db_seed": seed}


def test_sql_equivalent_queries_score_correct_by_execution():
    ex = _sql_example("SELECT name FROM employees WHERE department = 'Sales' AND age > 30")
    for pred in [
        "SELECT name FROM employees WHERE age > 30 AND department = 'Sales'",
        "select e.name from employees as e where e.department = 'Sales' and e.age > 30;",
        "SELECT name FROM employees WHERE department = 'Sales' INTERSECT "
        "SELECT name FROM employees WHERE age >= 31",
        "```sql\nSELECT name FROM employees WHERE age > 30 AND department = 'Sales'\n```",
    ]:
        result = sql.score(pred, ex)
        assert result["correct"] and result["execution_match"] and result["valid"], (pred, result)
        assert not result["exact_match"] or "```" in pred
    assert sql.score(ex["answer"], ex)["exact_match"]


def test_sql_wrong_queries_score_zero():
    ex = _sql_example("SELECT name FROM employees WHERE department = 'Sales' AND age > 30")
    for pred in [
        "SELECT name FROM employees WHERE department = 'Sales'",
        "SELECT name FROM employees WHERE department = 'Sales' AND age >= 30",
        "SELECT name, age FROM employees WHERE department = 'Sales' AND age > 30",
        "SELECT name FROM employees WHERE department = 'Legal' AND age > 30",
    ]:
        result = sql.score(pred, ex)
        assert not result["correct"] and result["valid"], pred


def test_sql_order_matters_only_with_order_by():
    ordered = _sql_example("SELECT name FROM employees ORDER BY salary DESC LIMIT 3")
    assert sql.score("SELECT name FROM employees ORDER BY salary DESC LIMIT 3", ordered)["correct"]
    assert not sql.score("SELECT name FROM (SELECT name, salary FROM employees ORDER BY salary "
                         "DESC LIMIT 3) ORDER BY salary ASC", ordered)["correct"]
    unordered = _sql_example("SELECT name FROM employees WHERE age > 40")
    assert sql.score("SELECT name FROM employees WHERE age > 40 ORDER BY name DESC",
                     unordered)["correct"]


def test_sql_unparsable_query_scores_zero_with_error():
    ex = _sql_example("SELECT COUNT(*) FROM employees")
    for pred in ["SELEC COUNT(*) FROM employees", "SELECT COUNT(*) FROM staff",
                 "SELECT salary FROM employees WHERE", ""]:
        result = sql.score(pred, ex)
        assert result["correct"] is False and result["valid"] is False and result["error"]


def test_sql_destructive_queries_change_nothing():
    ex = _sql_example("SELECT COUNT(*) FROM employees")
    conn = sql.make_read_only(sql.build_database(SQL_CONTEXT, ex["answer"], 7))
    before = sql.execute_readonly(conn, "SELECT * FROM employees")
    for attack in ["DROP TABLE employees", "DELETE FROM employees",
                   "UPDATE employees SET salary = 0", "INSERT INTO employees VALUES ('x','y',1,2)",
                   "PRAGMA query_only = OFF", "ATTACH DATABASE ':memory:' AS other",
                   "SELECT 1; DROP TABLE employees", "CREATE TABLE t (x INTEGER)"]:
        with pytest.raises(sql.QueryError):
            sql.execute_readonly(conn, attack)
        result = sql.score(attack, ex)
        assert result["correct"] is False and result["error"], attack
    assert sql.execute_readonly(conn, "SELECT * FROM employees") == before
    assert len(before) == sql.ROWS_PER_TABLE


def test_sql_runaway_query_is_stopped():
    ex = _sql_example("SELECT COUNT(*) FROM employees")
    loop = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
            "SELECT COUNT(*) FROM c")
    result = sql.score(loop, ex)
    assert result["correct"] is False and "steps" in result["error"]
    many = "SELECT a.name FROM employees a, employees b, employees c"
    assert "rows" in sql.score(many, ex)["error"]
    huge = "SELECT length(zeroblob(100000000))"
    assert "too big" in sql.score(huge, ex)["error"]


def test_sql_databases_are_deterministic_and_plant_filter_values():
    ref = "SELECT name FROM employees WHERE department = 'Legal' AND age > 30"
    a = sql.build_database(SQL_CONTEXT, ref, 11).execute("SELECT * FROM employees").fetchall()
    b = sql.build_database(SQL_CONTEXT, ref, 11).execute("SELECT * FROM employees").fetchall()
    assert a == b
    assert any(row[1] == "Legal" for row in a) and any(row[3] == 30 for row in a)


# ----------------------------------------------------------------------------- arithmetic scoring

MATH_EX = {"answer": "72"}


@pytest.mark.parametrize("pred,correct", [
    ("48 / 2 = 24\n48 + 24 = 72\n#### 72", True),
    ("#### 72.0", True),
    ("The answer is $72.", True),                  # no marker: last number
    ("#### 1,072", False),
    ("48 + 24 = 72\n#### 70", False),              # the marker wins over earlier numbers
    ("so 72 in total\n#### 71", False),
])
def test_arithmetic_final_number(pred, correct):
    assert arithmetic.score(pred, MATH_EX)["correct"] is correct


def test_arithmetic_thousands_separator():
    assert arithmetic.score("#### 1,250", {"answer": "1250"})["correct"]


def test_arithmetic_no_number_scores_zero():
    result = arithmetic.score("I am not sure about this one.", MATH_EX)
    assert result == {"correct": False, "has_marker": False, "predicted": None,
                      "error": "no number in the output"}


# ----------------------------------------------------------------------------- score_all

def test_score_all_aggregates_metrics():
    examples = viggo.generate("test", 4, 0)
    preds = [_assistant(examples[0]), _assistant(examples[1]), "garbage(", "inform()"]
    result = tasks.score_all("viggo", preds, examples)
    assert result["n"] == 4 and result["accuracy"] == 0.5
    assert result["errors"] == 1 and 0.5 <= result["slot_f1"] < 1.0
    assert result["valid"] == 0.75
    with pytest.raises(ValueError):
        tasks.score_all("viggo", preds[:3], examples)
    assert tasks.score_all("sql", [], [])["accuracy"] == 0.0


# ----------------------------------------------------------------------------- public rows

VIGGO_ROW = {
    "gem_id": "viggo-train-0",
    "meaning_representation": "give_opinion(name[Quiet Harbor], rating[good], "
                              "genres[adventure, puzzle], player_perspective[third person])",
    "target": "Quiet Harbor is a fun third person adventure puzzle game, I'd say.",
    "references": ["Quiet Harbor is a fun third person adventure puzzle game, I'd say."],
}
GSM8K_ROW = {
    "question": "A farmer has 12 hens. Each hen lays 3 eggs a day. How many eggs in 2 days?",
    "answer": "The hens lay 12*3=<<12*3=36>>36 eggs a day.\n"
              "In 2 days they lay 36*2=<<36*2=72>>72 eggs.\n#### 72",
}
SQL_ROW = {
    "question": "How many ships are longer than 120 meters?",
    "context": "CREATE TABLE ship (name VARCHAR, length INTEGER, port VARCHAR)",
    "answer": "SELECT COUNT(*) FROM ship WHERE length > 120",
}


def test_from_viggo_row():
    ex = tasks.from_viggo_row(VIGGO_ROW)
    assert ex["messages"][0]["content"] == viggo.DESCRIPTION
    assert ex["messages"][1]["content"] == VIGGO_ROW["target"]
    assert _assistant(ex) == ex["answer"] == VIGGO_ROW["meaning_representation"]
    assert ex["act"] == "give_opinion" and ex["id"] == "viggo-train-0"
    assert viggo.score(ex["answer"], ex)["correct"]
    with pytest.raises(common.TaskError, match="viggo-train-0.*fix or drop that row"):
        tasks.from_viggo_row({**VIGGO_ROW, "meaning_representation": "oops(name[x"})


def test_from_gsm8k_row():
    ex = tasks.from_gsm8k_row(GSM8K_ROW)
    assert ex["answer"] == "72" and ex["messages"][1]["content"] == GSM8K_ROW["question"]
    assert _assistant(ex) == ("The hens lay 12*3=36 eggs a day.\nIn 2 days they lay 36*2=72 "
                              "eggs.\n#### 72")
    assert "<<" in _assistant(tasks.from_gsm8k_row(GSM8K_ROW, keep_calculator=True))
    assert arithmetic.score(_assistant(ex), ex)["correct"]
    assert tasks.from_gsm8k_row({"question": "q", "answer": "#### 1,200"})["answer"] == "1200"
    with pytest.raises(common.TaskError, match="without a '####' line.*fix or drop that row"):
        tasks.from_gsm8k_row({"question": "q", "answer": "no final line"})


def test_from_sql_create_context_row():
    ex = tasks.from_sql_create_context_row(SQL_ROW)
    assert ex["context"] == SQL_ROW["context"] and ex["answer"] == SQL_ROW["answer"]
    assert SQL_ROW["context"] in ex["messages"][1]["content"]
    assert SQL_ROW["question"] in ex["messages"][1]["content"]
    assert sql.score("SELECT count(*) FROM ship AS s WHERE s.length > 120", ex)["correct"]
    assert not sql.score("SELECT COUNT(*) FROM ship WHERE length >= 120", ex)["correct"]
    multi = tasks.from_sql_create_context_row({
        "question": "Which ports have a ship named Aurora?",
        "context": "CREATE TABLE ship (name VARCHAR, port_id VARCHAR); "
                   "CREATE TABLE port (port_id VARCHAR, city VARCHAR)",
        "answer": "SELECT T2.city FROM ship AS T1 JOIN port AS T2 ON T1.port_id = T2.port_id "
                  "WHERE T1.name = 'Aurora'"})
    assert sql.score(multi["answer"], multi)["correct"]


def test_load_public_maps_and_carves_splits():
    calls = []

    def fake_loader(*args, split):
        calls.append((args, split))
        return [{**SQL_ROW, "question": f"How many ships are longer than {i} meters?",
                 "answer": f"SELECT COUNT(*) FROM ship WHERE length > {i}"} for i in range(200)]

    parts = {s: tasks.load_public("sql", s, loader=fake_loader) for s in SPLITS}
    assert calls[0] == (("b-mc2/sql-create-context",), "train")
    assert sum(len(p) for p in parts.values()) == 200 and len(parts["test"]) > 0
    questions = {s: {ex["question"] for ex in p} for s, p in parts.items()}
    assert not questions["train"] & questions["test"]
    assert parts["train"] == tasks.load_public("sql", "train", loader=fake_loader)

    gsm = tasks.load_public("arithmetic", "test", loader=lambda *a, split: [GSM8K_ROW])
    assert gsm[0]["answer"] == "72" and gsm[0]["id"] == "arithmetic-public-test-0"


def test_load_public_errors_clearly_offline():
    def offline(*args, split):
        raise ConnectionError("Couldn't reach the Hub")

    from jaxtune.errors import JaxtuneError

    with pytest.raises(RuntimeError, match="GEM/viggo.*Couldn't reach") as info:
        tasks.load_public("viggo", "train", loader=offline)
    assert isinstance(info.value, JaxtuneError)
    with pytest.raises(KeyError, match="no public dataset for task 'nope'; tasks with one: ") as info:
        tasks.load_public("nope", "train", loader=offline)
    assert isinstance(info.value, JaxtuneError)


# ----------------------------------------------------------------------------- shipped data

@pytest.mark.parametrize("name", tasks.NAMES)
def test_shipped_files_match_the_generator(name):
    counts = {}
    keys = {}
    for split in SPLITS:
        examples = tasks.load_examples(name, split)
        counts[split] = len(examples)
        keys[split] = {ex["messages"][1]["content"] for ex in examples}
        head = tasks.get(name).generate(split, 20, seed=0)
        assert examples[:20] == head
    assert counts == tasks.DEFAULT_SIZES
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]


def test_write_split_files(tmp_path):
    paths = tasks.write_split_files("arithmetic", tmp_path, {"train": 5, "test": 3}, seed=2)
    again = tasks.write_split_files("arithmetic", tmp_path / "again", {"train": 5, "test": 3},
                                    seed=2)
    assert sorted(paths) == ["test", "train"]
    assert paths["train"].read_bytes() == again["train"].read_bytes()
    rows = tasks.read_jsonl(paths["test"])
    assert len(rows) == 3 and rows == arithmetic.generate("test", 3, 2)


def test_split_partition_is_stable():
    # The partition is part of the data contract: changing it would leak test items.
    keys = "abcdefghijklmnopqrst"
    assert [common.split_of("viggo", k) for k in keys] == ["train"] * 19 + ["test"]
    shares = [common.split_of("sql", str(i)) for i in range(5000)]
    assert 0.77 < shares.count("train") / 5000 < 0.83
