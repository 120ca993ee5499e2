"""ViGGO-style structured extraction: a sentence about a video game -> a meaning representation.

Owns the `viggo` task: the vocabulary (fictional games and studios, ViGGO's genre / platform /
perspective / ESRB / rating values), the sentence templates of five dialogue acts, the MR
grammar (format + parser) and the scorer.

An MR is `act(slot[value], slot[v1, v2], ...)`, e.g.
`inform(name[Neon Drift], release_year[2004], genres[driving/racing], platforms[PC, Xbox])`.
Generated examples are short (one or two sentences, an MR of a few slots) so that a 135M model
learns the mapping in a few hundred LoRA steps; the sentences shuffle clause order and vary
wording so the model has to read them. Scoring parses both MRs: exact match is equality of the
normalised (act, slot, value) sets (slot order, list order, case and spacing are ignored), slot
F1 is over the (slot, value) pairs plus the act. A prediction that does not parse (unknown act,
unbalanced brackets) scores 0 with the parse error recorded.
"""

from __future__ import annotations

import random
import re

from jaxtune.tasks import common

NAME = "viggo"
DESCRIPTION = (
    "Convert the sentence about a video game into a meaning representation "
    "act(slot[value], ...). Acts: inform, give_opinion, recommend, request, verify_attribute."
)

# Every ViGGO dialogue act (the parser accepts all of them, so GEM/viggo rows score too);
# the generator produces the first five.
GENERATED_ACTS = ("inform", "give_opinion", "recommend", "request", "verify_attribute")
ACTS = GENERATED_ACTS + ("confirm", "suggest", "request_attribute", "request_explanation")

# Canonical slot order of generated MRs (scoring ignores order).
SLOT_ORDER = ("name", "release_year", "exp_release_date", "developer", "esrb", "rating", "genres",
              "player_perspective", "has_multiplayer", "platforms", "available_on_steam",
              "has_linux_release", "has_mac_release", "specifier")

GAMES = (
    "Neon Drift", "Crypt of Embers", "Starfall Rangers", "Harbor Tales", "Iron Tide",
    "Moonlit Garden", "Pixel Panic", "Skyforge", "Lost Lanterns", "Frostbound", "Velvet Circuit",
    "Dune Runners", "Clockwork Kingdom", "Thunder Alley", "Salt and Sorcery", "Gravity Well",
    "Ember Knights", "Paper Pilots", "Rogue Orchard", "Silent Reef", "Copper Crown",
    "Mirror Maze", "Glacier Run", "Hollow Star", "Lantern Bay", "Rust Valley", "Sky Tavern",
    "Tiny Titans", "Wild Hollow", "Obsidian Gate", "Comet Cafe", "Bramble Quest", "Echo Park",
    "Cinder Road", "Marble Storm", "Shadow Loom", "Pocket Planets", "Storm Harbor",
    "Quiet Meadow", "Brass Legion", "Night Kitchen", "Turbo Goats", "Arcane Atlas",
    "Sunken Spire", "Tidewalker", "Crystal Derby", "Fable Forge", "Moss Giants",
)
DEVELOPERS = (
    "Ironleaf", "Bluecap Games", "Northwind Studios", "Red Lantern", "Pinecone Interactive",
    "Quartz Works", "Tidal Byte", "Copper Fox", "Mosslight", "Hollow Oak Games", "Brightforge",
    "Saltmarsh Studio",
)
# MR value -> words used for it in a sentence.
GENRES = {
    "action": "action", "adventure": "adventure", "arcade": "arcade", "fighting": "fighting",
    "platformer": "platformer", "puzzle": "puzzle", "driving/racing": "racing",
    "real-time strategy": "real-time strategy", "role-playing": "role-playing",
    "shooter": "shooter", "simulation": "simulation", "sport": "sports",
    "strategy": "strategy", "turn-based strategy": "turn-based strategy",
    "hack-and-slash": "hack-and-slash", "point-and-click": "point-and-click",
}
PLATFORMS = ("PC", "PlayStation", "Xbox", "Nintendo Switch", "Game Boy", "Wii", "Nintendo DS")
PERSPECTIVES = {
    "first person": ("first-person",),
    "third person": ("third-person",),
    "side view": ("side-view", "side-scrolling"),
    "bird view": ("top-down", "bird's-eye"),
}
ESRB = {
    "E (for Everyone)": "E for Everyone",
    "E 10+ (for Everyone 10 and Older)": "E 10+ for Everyone 10 and Older",
    "T (for Teen)": "T for Teen",
    "M (for Mature)": "M for Mature",
}
RATINGS = ("excellent", "good", "average", "poor")
YEARS = tuple(range(1988, 2023))
SPECIFIERS = ("interesting", "fun", "relaxing", "underrated", "challenging", "addictive")

_OPINIONS = {
    "excellent": ("one of the best games I've ever played", "an absolute gem",
                  "a truly excellent game"),
    "good": ("a pretty good game", "a solid and enjoyable game", "really fun"),
    "average": ("just an okay game", "fairly mediocre", "nothing special"),
    "poor": ("a pretty bad game", "a real disappointment", "one of the worst games I've played"),
}
_FEELINGS = {
    "excellent": ("you really loved {n}", "{n} was one of your favorites"),
    "good": ("you liked {n}", "you enjoyed {n}"),
    "average": ("you thought {n} was just average", "{n} was only so-so for you"),
    "poor": ("you didn't like {n} at all", "you weren't a fan of {n}"),
}


# ----------------------------------------------------------------------------- MR grammar

class MRError(ValueError):
    """A meaning representation that does not parse."""


def format_mr(act: str, slots: dict[str, list[str]]) -> str:
    """`act(slot[v1, v2], ...)` with slots in canonical order (unknown slots last)."""
    order = sorted(slots, key=lambda s: (SLOT_ORDER.index(s) if s in SLOT_ORDER else 99, s))
    return f"{act}(" + ", ".join(f"{s}[{', '.join(slots[s])}]" for s in order) + ")"


_ACT_RE = re.compile(r"^\s*([A-Za-z_]+)\s*\((.*)\)\s*$", re.S)
_SLOT_RE = re.compile(r"\s*([A-Za-z_]+)\s*\[([^\[\]]*)\]\s*")


def _norm_value(value: str) -> str:
    return " ".join(value.lower().split())


def parse_mr(text: str) -> tuple[str, dict[str, frozenset[str]]]:
    """(act, {slot: normalised values}); raises MRError. Only the first non-empty line counts."""
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    if not lines:
        raise MRError("empty meaning representation")
    match = _ACT_RE.match(lines[0])
    if match is None:
        raise MRError("not of the form act(...)")
    act, body = match.group(1).lower(), match.group(2)
    if act not in ACTS:
        raise MRError(f"unknown act {act!r}")
    slots: dict[str, set[str]] = {}
    pos = 0
    while pos < len(body) and body[pos:].strip():
        slot = _SLOT_RE.match(body, pos)
        if slot is None:
            raise MRError(f"malformed slot at {body[pos:pos + 20]!r} (unbalanced brackets?)")
        values = {_norm_value(v) for v in slot.group(2).split(",")}
        slots.setdefault(slot.group(1).lower(), set()).update(values)
        pos = slot.end()
        if pos < len(body):
            if body[pos] != ",":
                raise MRError(f"expected ',' between slots at {body[pos:pos + 20]!r}")
            pos += 1
    return act, {s: frozenset(v) for s, v in slots.items()}


def mr_pairs(act: str, slots: dict[str, frozenset[str]]) -> set[tuple[str, str]]:
    """The act plus every (slot, value) pair: the units of slot precision / recall."""
    return {("__act__", act)} | {(s, v) for s, values in slots.items() for v in values}


# ----------------------------------------------------------------------------- phrases

def _genre_words(values: list[str]) -> str:
    return common.join_and([GENRES[g] for g in values])


def _platform_words(values: list[str], rng: random.Random) -> str:
    the = "the " if rng.random() < 0.3 and all(p != "PC" for p in values) else ""
    return the + common.join_and(values)


def _clause(slot: str, values: list[str], rng: random.Random) -> str:
    """A predicate whose subject is the game: 'was released in 2004'."""
    v = values[0]
    if slot == "release_year":
        return rng.choice(("was released in {v}", "came out in {v}", "first came out in {v}",
                           "hit the shelves in {v}")).format(v=v)
    if slot == "developer":
        return rng.choice(("was developed by {v}", "was made by {v}", "comes from {v}",
                           "is a game by {v}")).format(v=v)
    if slot == "esrb":
        words = ESRB[v]
        return rng.choice(("is rated {v}", "has an ESRB rating of {v}",
                           "carries {a} {v} rating")).format(v=words, a=common.article(words))
    if slot == "rating":
        return rng.choice(("got {v} reviews", "earned {a} {v} rating from players",
                           "was rated {v} by critics")).format(v=v, a=common.article(v))
    if slot == "genres":
        words = _genre_words(values)
        return f"is {common.article(words)} {words} game"
    if slot == "player_perspective":
        adj = rng.choice(PERSPECTIVES[v])
        return rng.choice(("is played from {a} {p} perspective", "uses {a} {p} camera",
                           "offers {a} {p} view")).format(a=common.article(adj), p=adj)
    if slot == "has_multiplayer":
        yes = ("supports multiplayer", "has a multiplayer mode", "can be played with friends")
        no = ("is single-player only", "has no multiplayer mode", "doesn't support multiplayer")
        return rng.choice(yes if v == "yes" else no)
    if slot == "platforms":
        return rng.choice(("is available on {p}", "can be played on {p}",
                           "was released for {p}")).format(p=_platform_words(values, rng))
    if slot == "available_on_steam":
        yes = ("is on Steam", "can be bought on Steam", "is sold on Steam")
        no = ("is not available on Steam", "isn't sold on Steam", "can't be found on Steam")
        return rng.choice(yes if v == "yes" else no)
    raise KeyError(slot)


def _clauses(slots: dict[str, list[str]], names: list[str], rng: random.Random) -> str:
    parts = [_clause(s, slots[s], rng) for s in names]
    return common.join_and(parts, rng)


def _draw_value(slot: str, rng: random.Random) -> list[str]:
    if slot == "name":
        return [rng.choice(GAMES)]
    if slot == "release_year":
        return [str(rng.choice(YEARS))]
    if slot == "developer":
        return [rng.choice(DEVELOPERS)]
    if slot == "esrb":
        return [rng.choice(list(ESRB))]
    if slot == "rating":
        return [rng.choice(RATINGS)]
    if slot == "genres":
        k = 2 if rng.random() < 0.25 else 1
        return sorted(rng.sample(list(GENRES), k))
    if slot == "player_perspective":
        return [rng.choice(list(PERSPECTIVES))]
    if slot in ("has_multiplayer", "available_on_steam"):
        return [rng.choice(("yes", "no"))]
    if slot == "platforms":
        k = 2 if rng.random() < 0.3 else 1
        chosen = rng.sample(PLATFORMS, k)
        return [p for p in PLATFORMS if p in chosen]
    if slot == "specifier":
        return [rng.choice(SPECIFIERS)]
    raise KeyError(slot)


def _draw_slots(required: tuple[str, ...], optional: tuple[str, ...], k: int,
                rng: random.Random) -> dict[str, list[str]]:
    chosen = list(required) + rng.sample(optional, k)
    return {s: _draw_value(s, rng) for s in chosen}


def _extras(slots: dict[str, list[str]], exclude: tuple[str, ...], rng: random.Random) -> list[str]:
    names = [s for s in slots if s not in exclude]
    rng.shuffle(names)
    return names


# ----------------------------------------------------------------------------- acts

_FACT_SLOTS = ("release_year", "developer", "esrb", "rating", "genres", "player_perspective",
               "has_multiplayer", "platforms", "available_on_steam")


def _inform(rng: random.Random) -> tuple[dict, str]:
    slots = _draw_slots(("name",), _FACT_SLOTS, rng.choice((2, 3, 3, 4)), rng)
    name = slots["name"][0]
    rest = _extras(slots, ("name", "genres"), rng)
    if "genres" in slots and rng.random() < 0.8:
        words = _genre_words(slots["genres"])
        lead = f"{name} is {common.article(words)} {words} game"
        if not rest:
            return slots, lead + "."
        if rng.random() < 0.5:
            return slots, f"{lead} that {_clauses(slots, rest, rng)}."
        return slots, f"{lead}. It {_clauses(slots, rest, rng)}."
    rest = _extras(slots, ("name",), rng)
    if "release_year" in rest and rng.random() < 0.3:
        rest.remove("release_year")
        year = slots["release_year"][0]
        return slots, f"Released in {year}, {name} {_clauses(slots, rest, rng)}."
    if len(rest) >= 3 and rng.random() < 0.5:
        cut = len(rest) // 2
        return slots, (f"{name} {_clauses(slots, rest[:cut], rng)}. "
                       f"It also {_clauses(slots, rest[cut:], rng)}.")
    return slots, f"{name} {_clauses(slots, rest, rng)}."


def _give_opinion(rng: random.Random) -> tuple[dict, str]:
    optional = ("release_year", "developer", "genres", "player_perspective", "has_multiplayer",
                "platforms", "available_on_steam")
    slots = _draw_slots(("name", "rating"), optional, rng.choice((1, 1, 2)), rng)
    name, rating = slots["name"][0], slots["rating"][0]
    opener = rng.choice(("I think", "Honestly, I think", "In my opinion,", "I'd say",
                         "I have to say"))
    opinion = rng.choice(_OPINIONS[rating])
    if rating in ("excellent", "good"):
        link = rng.choice(("especially since it", "mostly because it", "and I love that it"))
    else:
        link = rng.choice(("mostly because it", "partly because it",
                           "and it doesn't help that it"))
    rest = _extras(slots, ("name", "rating"), rng)
    return slots, f"{opener} {name} is {opinion}, {link} {_clauses(slots, rest, rng)}."


def _recommend(rng: random.Random) -> tuple[dict, str]:
    optional = ("release_year", "developer", "genres", "player_perspective", "has_multiplayer",
                "platforms", "available_on_steam")
    slots = _draw_slots(("name",), optional, rng.choice((1, 2, 2)), rng)
    name = slots["name"][0]
    if "genres" in slots and rng.random() < 0.6:
        words = _genre_words(slots["genres"])
        lead = rng.choice(("If you like {g} games, you should try {n}",
                           "Since you enjoy {g} games, I'd recommend {n}")).format(g=words, n=name)
        rest = _extras(slots, ("name", "genres"), rng)
    else:
        lead = rng.choice(("You should really try {n}", "I'd recommend {n}",
                           "Have you tried {n}?", "If you want something new, check out {n}"))
        lead = lead.format(n=name)
        rest = _extras(slots, ("name",), rng)
    if not rest:
        return slots, lead + ("" if lead.endswith("?") else ".")
    if lead.endswith("?") or rng.random() < 0.5:
        return slots, f"{lead}{'' if lead.endswith('?') else '.'} It {_clauses(slots, rest, rng)}."
    return slots, f"{lead}, since it {_clauses(slots, rest, rng)}."


def _request(rng: random.Random) -> tuple[dict, str]:
    optional = ("specifier", "genres", "player_perspective", "platforms", "has_multiplayer",
                "release_year")
    slots = _draw_slots((), optional, rng.choice((1, 2, 2, 3)), rng)
    pre = []
    if "player_perspective" in slots:
        pre.append(PERSPECTIVES[slots["player_perspective"][0]][0])
    noun = f"{_genre_words(slots['genres'])} games" if "genres" in slots else "games"
    post = []
    if "platforms" in slots:
        post.append(rng.choice(("on {p}", "for {p}")).format(p=_platform_words(slots["platforms"],
                                                                                rng)))
    if "has_multiplayer" in slots:
        yes = slots["has_multiplayer"][0] == "yes"
        post.append(rng.choice(("with multiplayer", "you can play with friends") if yes
                               else ("without multiplayer", "you can only play alone")))
    if "release_year" in slots:
        post.append(rng.choice(("from {y}", "released in {y}")).format(y=slots["release_year"][0]))
    np_ = " ".join(pre + [noun] + post)
    if "specifier" in slots:
        spec = slots["specifier"][0]
        frame = rng.choice(("What is the most {s} of the {np} you've played?",
                            "Do you know of any {s} {np}?",
                            "Have you played any {s} {np} lately?"))
        return slots, frame.format(s=spec, np=np_)
    frame = rng.choice(("Do you know of any {np} you'd recommend?",
                        "Have you played any {np} lately?",
                        "What are some {np} you've enjoyed?",
                        "Are there any {np} that you really like?"))
    return slots, frame.format(np=np_)


def _attribute_np(slot: str, values: list[str], rng: random.Random) -> str:
    v = values[0]
    if slot == "genres":
        return f"{_genre_words(values)} games"
    if slot == "player_perspective":
        adj = rng.choice(PERSPECTIVES[v])
        return f"games with {common.article(adj)} {adj} perspective"
    if slot == "has_multiplayer":
        return "multiplayer games" if v == "yes" else "single-player games"
    if slot == "platforms":
        return f"playing games on {_platform_words(values, rng)}"
    if slot == "developer":
        return f"games made by {v}"
    if slot == "esrb":
        return f"games rated {ESRB[v]}"
    if slot == "release_year":
        return f"games from {v}"
    raise KeyError(slot)


def _verify_attribute(rng: random.Random) -> tuple[dict, str]:
    optional = ("genres", "player_perspective", "has_multiplayer", "platforms", "developer",
                "esrb", "release_year")
    slots = _draw_slots(("name", "rating"), optional, 1, rng)
    name, rating = slots["name"][0], slots["rating"][0]
    (extra,) = _extras(slots, ("name", "rating"), rng)
    opener = rng.choice(("You mentioned that", "You said", "I remember that", "Earlier you said"))
    feeling = rng.choice(_FEELINGS[rating]).format(n=name)
    question = rng.choice(("Do you generally enjoy {x}?", "Are you usually into {x}?",
                           "Do you tend to like {x}?"))
    attribute = _attribute_np(extra, slots[extra], rng)
    return slots, f"{opener} {feeling}. {question.format(x=attribute)}"


_MAKERS = {"inform": _inform, "give_opinion": _give_opinion, "recommend": _recommend,
           "request": _request, "verify_attribute": _verify_attribute}
# Share of each act in generated data (inform dominates, as in ViGGO).
_ACT_WEIGHTS = {"inform": 4, "give_opinion": 2, "recommend": 2, "request": 1,
                "verify_attribute": 1}


def _sample(rng: random.Random) -> dict:
    act = rng.choices(list(_ACT_WEIGHTS), weights=list(_ACT_WEIGHTS.values()))[0]
    slots, sentence = _MAKERS[act](rng)
    mr = format_mr(act, slots)
    return {"messages": common.chat(DESCRIPTION, sentence, mr), "answer": mr, "act": act}


def generate(split: str, n: int, seed: int) -> list[dict]:
    """`n` distinct examples of `split`; no MR of one split occurs in another."""
    return common.generate_split(NAME, split, n, seed, _sample, key=lambda ex: ex["answer"])


# ----------------------------------------------------------------------------- scoring

def _failed(error: str) -> dict:
    return {"correct": False, "exact_match": False, "valid": False, "act_correct": False,
            "slot_precision": 0.0, "slot_recall": 0.0, "slot_f1": 0.0, "error": error}


def score(prediction: str, example: dict) -> dict:
    """Exact match of the normalised MR, plus act accuracy and slot precision / recall / F1."""
    ref_act, ref_slots = parse_mr(example["answer"])
    try:
        act, slots = parse_mr(prediction)
    except MRError as err:
        return _failed(str(err))
    pred, gold = mr_pairs(act, slots), mr_pairs(ref_act, ref_slots)
    hits = len(pred & gold)
    precision = hits / len(pred)
    recall = hits / len(gold)
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    exact = pred == gold
    return {"correct": exact, "exact_match": exact, "valid": True, "act_correct": act == ref_act,
            "slot_precision": precision, "slot_recall": recall, "slot_f1": f1, "error": None}
