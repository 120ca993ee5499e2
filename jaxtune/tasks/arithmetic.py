"""Grade-school math word problems with worked steps ending in `#### <answer>` (GSM8K format).

Owns the `arithmetic` task: twelve story templates, each a small pure function of an RNG that
picks numbers so every intermediate result is a non-negative integer (divisions are exact),
with two to four operations; the worked solution (one line per step, `a * b = c`) and the
final-answer extraction used by the scorer.

Scoring reads the number after the last `####` (commas and `$` ignored); without a marker it
falls back to the last number in the text; an output with no number scores 0. The comparison is
numeric (`72`, `72.0` and `$72` all equal 72).
"""

from __future__ import annotations

import decimal
import random
import re

from jaxtune.tasks import common

NAME = "arithmetic"
DESCRIPTION = ("Solve the math word problem step by step, then give the final answer on the last "
               "line as '#### <number>'.")

PEOPLE = (("Maya", "she"), ("Leo", "he"), ("Aisha", "she"), ("Tom", "he"), ("Sofia", "she"),
          ("Ravi", "he"), ("Nora", "she"), ("Omar", "he"), ("Lena", "she"), ("Kenji", "he"),
          ("Zara", "she"), ("Diego", "he"), ("Ivy", "she"), ("Mateo", "he"), ("Hana", "she"),
          ("Felix", "he"))
ITEMS = ("stickers", "pencils", "marbles", "trading cards", "stamps", "beads", "crayons",
         "seashells")
FOODS = ("cookies", "muffins", "bagels", "cupcakes", "rolls")
THINGS = (("bike", "bike"), ("video game", "game"), ("jacket", "jacket"), ("guitar", "guitar"),
          ("tablet", "tablet"))
VEHICLES = ("car", "bus", "train", "truck")


def _person(rng: random.Random) -> tuple[str, str, str]:
    """(name, subject pronoun, possessive pronoun)."""
    name, pronoun = rng.choice(PEOPLE)
    return name, pronoun, "her" if pronoun == "she" else "his"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _packs(rng):
    name, he, _ = _person(rng)
    friend, _, _ = _person(rng)
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(4, 24)
    total = a * b
    c = rng.randint(1, total - 1)
    left = total - c
    q = (f"{name} buys {a} packs of {item} with {b} {item} in each pack. "
         f"{_cap(he)} gives {c} {item} to {friend}")
    steps = [f"{name} buys {a} * {b} = {total} {item}.",
             f"After giving {c} away, {he} has {total} - {c} = {left} {item}."]
    if rng.random() < 0.5:
        d = rng.randint(2, 20)
        q += f" and then buys {d} more"
        steps.append(f"After buying {d} more, {he} has {left} + {d} = {left + d} {item}.")
        left += d
    return q + f". How many {item} does {name} have now?", steps, left


def _wages(rng):
    name, he, _ = _person(rng)
    thing, short = rng.choice(THINGS)
    rate, hours, weeks = rng.randint(8, 30), rng.randint(5, 40), rng.randint(2, 8)
    weekly = rate * hours
    total = weekly * weeks
    spend = rng.randint(total // 4, total - 1)
    q = (f"{name} earns ${rate} per hour and works {hours} hours each week. After {weeks} weeks, "
         f"{he} spends ${spend} on a {thing}.")
    steps = [f"Each week {name} earns {rate} * {hours} = {weekly} dollars.",
             f"In {weeks} weeks {he} earns {weekly} * {weeks} = {total} dollars."]
    if rng.random() < 0.4:
        bonus = rng.randint(1, 20) * 5
        q += f" {_cap(he)} also gets a bonus of ${bonus}."
        steps.append(f"With the bonus {he} has {total} + {bonus} = {total + bonus} dollars.")
        total += bonus
    steps.append(f"After buying the {short}, {he} has {total} - {spend} = {total - spend} "
                 f"dollars left.")
    return q + f" How much money does {he} have left?", steps, total - spend


def _bakery(rng):
    name, he, _ = _person(rng)
    food = rng.choice(FOODS)
    a, b = rng.randint(2, 8), rng.randint(6, 24)
    total = a * b
    c = rng.randint(1, total - 2)
    if (total - c) % 2:
        c += 1
    rest = total - c
    half = rest // 2
    q = (f"A baker named {name} makes {a} batches of {b} {food}. {_cap(he)} sells {c} {food} in "
         f"the morning and half of the remaining {food} in the afternoon. How many {food} are "
         f"left?")
    steps = [f"{name} makes {a} * {b} = {total} {food}.",
             f"After the morning, {total} - {c} = {rest} {food} remain.",
             f"In the afternoon {he} sells {rest} / 2 = {half} {food}.",
             f"So {rest} - {half} = {rest - half} {food} are left."]
    return q, steps, rest - half


def _trip(rng):
    vehicle = rng.choice(VEHICLES)
    s1, h1 = rng.randint(3, 9) * 10, rng.randint(2, 6)
    s2, h2 = rng.randint(3, 9) * 10, rng.randint(1, 5)
    d1, d2 = s1 * h1, s2 * h2
    q = (f"A {vehicle} travels at {s1} km per hour for {h1} hours and then at {s2} km per hour "
         f"for {h2} hours. How many kilometers does it travel in total?")
    steps = [f"First it travels {s1} * {h1} = {d1} km.",
             f"Then it travels {s2} * {h2} = {d2} km.",
             f"In total it travels {d1} + {d2} = {d1 + d2} km."]
    return q, steps, d1 + d2


def _sharing(rng):
    name, _, his = _person(rng)
    item = rng.choice(ITEMS)
    a, k = rng.randint(3, 30), rng.randint(2, 5)
    total = a * (1 + k)
    m = rng.choice([d for d in range(2, 11) if total % d == 0])
    q = (f"{name} has {a} {item}. {_cap(his)} brother has {k} times as many {item}. They put all "
         f"their {item} together and share them equally among {m} friends. How many {item} does "
         f"each friend get?")
    steps = [f"The brother has {a} * {k} = {a * k} {item}.",
             f"Together they have {a} + {a * k} = {total} {item}.",
             f"Each friend gets {total} / {m} = {total // m} {item}."]
    return q, steps, total // m


def _garden(rng):
    name, _, _ = _person(rng)
    r, c, t = rng.randint(3, 12), rng.randint(4, 15), rng.randint(2, 9)
    plants = r * c
    tomatoes = plants * t
    q = (f"A garden has {r} rows with {c} tomato plants in each row. Each plant grows {t} "
         f"tomatoes.")
    steps = [f"There are {r} * {c} = {plants} plants.",
             f"They grow {plants} * {t} = {tomatoes} tomatoes."]
    if rng.random() < 0.6:
        g = rng.randint(1, tomatoes - 1)
        q += f" {name} gives away {g} tomatoes. How many tomatoes does {name} have left?"
        steps.append(f"After giving some away, {name} has {tomatoes} - {g} = {tomatoes - g} "
                     f"tomatoes.")
        return q, steps, tomatoes - g
    return q + " How many tomatoes grow in the garden?", steps, tomatoes


def _ages(rng):
    name, he, his = _person(rng)
    a, k, d = rng.randint(4, 15), rng.randint(2, 4), rng.randint(20, 30)
    mother = a * k
    grandmother = mother + d
    him = "her" if he == "she" else "him"
    q = (f"{name} is {a} years old. {_cap(his)} mother is {k} times as old as {him}. "
         f"{_cap(his)} grandmother is {d} years older than {his} mother.")
    steps = [f"The mother is {a} * {k} = {mother} years old.",
             f"The grandmother is {mother} + {d} = {grandmother} years old."]
    if rng.random() < 0.6:
        y = rng.randint(2, 10)
        q += f" How old will the grandmother be in {y} years?"
        steps.append(f"In {y} years she will be {grandmother} + {y} = {grandmother + y} years old.")
        return q, steps, grandmother + y
    return q + " How old is the grandmother?", steps, grandmother


def _percent(rng):
    p = rng.choice((10, 20, 25, 40, 50, 60, 75, 80))
    unit = {10: 10, 20: 5, 25: 4, 40: 5, 50: 2, 60: 5, 75: 4, 80: 5}[p]
    n = unit * rng.randint(max(1, 12 // unit), 40 // unit)
    girls = n * p // 100
    b = rng.randint(2, 9)
    q = f"There are {n} students in a class and {p}% of them are girls."
    steps = [f"There are {n} * {p} / 100 = {girls} girls."]
    if rng.random() < 0.5:
        q += f" Each girl brings {b} pencils. How many pencils do the girls bring in total?"
        steps.append(f"The girls bring {girls} * {b} = {girls * b} pencils.")
        return q, steps, girls * b
    q += " How many of the students are boys?"
    steps.append(f"There are {n} - {girls} = {n - girls} boys.")
    return q, steps, n - girls


def _change(rng):
    name, he, _ = _person(rng)
    price = rng.randint(8, 40)
    off = rng.randint(1, price // 4)
    count = rng.randint(2, 6)
    each = price - off
    total = each * count
    bill = (total // 50 + 1) * 50
    q = (f"A shirt costs ${price}. During a sale the store takes ${off} off each shirt. {name} "
         f"buys {count} shirts and pays with ${bill}. How much change does {he} get?")
    steps = [f"Each shirt costs {price} - {off} = {each} dollars.",
             f"{count} shirts cost {each} * {count} = {total} dollars.",
             f"The change is {bill} - {total} = {bill - total} dollars."]
    return q, steps, bill - total


def _reading(rng):
    name, he, _ = _person(rng)
    a = rng.randint(5, 40)
    b = rng.randint(1, 2 * a - 1)
    tue, wed = 2 * a, 2 * a - b
    q = (f"{name} reads {a} pages on Monday, twice as many pages on Tuesday, and {b} fewer pages "
         f"on Wednesday than on Tuesday. How many pages does {he} read over the three days?")
    steps = [f"On Tuesday {he} reads 2 * {a} = {tue} pages.",
             f"On Wednesday {he} reads {tue} - {b} = {wed} pages.",
             f"In total {he} reads {a} + {tue} + {wed} = {a + tue + wed} pages."]
    return q, steps, a + tue + wed


def _bags(rng):
    a, b, d = rng.randint(3, 12), rng.randint(10, 30), rng.randint(3, 8)
    total = a * b
    c = rng.randint(1, total // 3)
    c += (total - c) % d
    good = total - c
    q = (f"A store has {a} boxes of apples with {b} apples in each box. {c} apples are rotten "
         f"and thrown away. The rest are packed into bags of {d}. How many bags are filled?")
    steps = [f"There are {a} * {b} = {total} apples.",
             f"Without the rotten ones there are {total} - {c} = {good} apples.",
             f"They fill {good} / {d} = {good // d} bags."]
    return q, steps, good // d


def _saving(rng):
    name, he, _ = _person(rng)
    thing, _ = rng.choice(THINGS)
    s, weeks, have = rng.randint(2, 15) * 5, rng.randint(2, 20), rng.randint(1, 20) * 5
    cost = have + s * weeks
    q = (f"{name} wants to buy a {thing} that costs ${cost}. {_cap(he)} already has ${have} and "
         f"saves ${s} each week. How many weeks will it take {name} to save enough?")
    steps = [f"{name} still needs {cost} - {have} = {cost - have} dollars.",
             f"That takes {cost - have} / {s} = {weeks} weeks."]
    return q, steps, weeks


TEMPLATES = (_packs, _wages, _bakery, _trip, _sharing, _garden, _ages, _percent, _change,
             _reading, _bags, _saving)


def _sample(rng: random.Random) -> dict:
    question, steps, answer = rng.choice(TEMPLATES)(rng)
    solution = "\n".join(steps + [f"#### {answer}"])
    return {"messages": common.chat(DESCRIPTION, question, solution), "answer": str(answer)}


def generate(split: str, n: int, seed: int) -> list[dict]:
    """`n` distinct problems of `split`; no question of one split occurs in another."""
    return common.generate_split(NAME, split, n, seed, _sample,
                                 key=lambda ex: ex["messages"][1]["content"])


# ----------------------------------------------------------------------------- scoring

_NUMBER_RE = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _to_decimal(text: str) -> decimal.Decimal | None:
    try:
        return decimal.Decimal(text.replace(",", "").replace("$", ""))
    except decimal.InvalidOperation:
        return None


def extract_answer(text: str) -> tuple[str | None, bool]:
    """(final number as written, whether it came after a `####` marker)."""
    text = str(text)
    if "####" in text:
        found = _NUMBER_RE.search(text.rsplit("####", 1)[1])
        if found:
            return found.group(0), True
    numbers = _NUMBER_RE.findall(text)
    return (numbers[-1], False) if numbers else (None, False)


def score(prediction: str, example: dict) -> dict:
    """Numeric equality of the final answer with the reference."""
    found, marked = extract_answer(prediction)
    if found is None:
        return {"correct": False, "has_marker": False, "predicted": None,
                "error": "no number in the output"}
    value, reference = _to_decimal(found), _to_decimal(str(example["answer"]))
    correct = value is not None and reference is not None and value == reference
    return {"correct": correct, "has_marker": marked, "predicted": found, "error": None}
