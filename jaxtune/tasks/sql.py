"""Text-to-SQL in the style of b-mc2/sql-create-context, scored by execution in SQLite.

Owns the `sql` task: eight fixed table domains (typed columns with value pools and question
phrases), the question/query templates (lookup, filters with one or two conditions, COUNT,
COUNT DISTINCT, AVG/MAX/MIN/SUM, GROUP BY, ORDER BY with or without LIMIT), the deterministic
row generator that turns a `CREATE TABLE` context into populated in-memory databases, the
guarded query runner and the scorer.

Scoring executes the reference and the prediction on three small databases built from the
example's context (rows are a pure function of the example: its `db_seed`, or a hash of context
and reference). Literals the reference compares columns against are planted in the rows, so
filters select something and a wrong filter shows. Results are compared as multisets, as
ordered lists when the reference has ORDER BY. Predictions run on a connection that can only
read: an authorizer admits SELECT / READ / FUNCTION / RECURSIVE and denies everything else
(DROP, INSERT, PRAGMA, ATTACH ...), `PRAGMA query_only` is on, a progress handler stops runaway
queries and result rows and string lengths are capped. A prediction that fails to parse or run
scores 0 with its error recorded; exact match of the normalised query text is reported too.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import re
import sqlite3

from jaxtune.tasks import common

NAME = "sql"
DESCRIPTION = ("Write the SQLite query that answers the question about the table defined by the "
               "CREATE TABLE statement. Reply with the SQL query only.")


# ----------------------------------------------------------------------------- domains

@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    type: str                      # TEXT | INTEGER | REAL
    phrase: str                    # how questions name it: "salary"
    values: tuple = ()             # TEXT: value pool
    low: float = 0                 # numeric: row value range
    high: float = 0
    step: float = 1                # numeric: threshold granularity in questions
    match: str = ""                # TEXT filter phrase: "in the {v} department"
    above: str = ""                # numeric filter phrases
    below: str = ""
    plural: str = ""               # TEXT category plural: "departments"
    summable: bool = False         # SUM makes sense ("total salary", not "total age")

    @property
    def numeric(self) -> bool:
        return self.type in ("INTEGER", "REAL")


@dataclasses.dataclass(frozen=True)
class Domain:
    table: str
    entity: str                    # "employee"
    entities: str                  # "employees"
    key: Column                    # unique naming column
    key_phrase: str                # "named" / "titled"
    key_plural: str                # "names" / "titles"
    columns: tuple                 # non-key columns


PEOPLE = (
    "Alice Moreau", "Bilal Haddad", "Chen Wei", "Dana Kowalski", "Elif Sahin", "Farid Nasser",
    "Grace Okafor", "Hugo Lindqvist", "Ines Duarte", "Jonas Berg", "Keiko Tanaka", "Liam Byrne",
    "Maya Patel", "Nils Petersen", "Olga Ivanova", "Pablo Ortega", "Quinn Harper", "Rosa Vidal",
    "Samir Khan", "Tara Quinlan", "Umar Farouk", "Vera Novak", "Wendy Zhou", "Xavier Dumont",
    "Yara Haddad", "Zoltan Kiss", "Amira Selim", "Bruno Costa", "Carla Mendes", "Dmitri Orlov",
    "Emma Larsen", "Felix Braun", "Gita Rao", "Hana Sato", "Ivan Petrov", "Julia Romano",
)
CITIES = ("Lisbon", "Oslo", "Nairobi", "Osaka", "Denver", "Lyon", "Porto", "Seoul", "Quito",
          "Perth", "Dublin", "Krakow")
BOOK_TITLES = (
    "The Silent River", "Glass Orchard", "A Winter in Salt", "The Paper Compass", "Iron Lullaby",
    "Northern Lights Fade", "The Last Cartographer", "Ash and Amber", "Quiet Engines",
    "The Hollow Crown", "Seven Lanterns", "Beneath the Tide", "Clockmaker's Daughter",
    "The Velvet Road", "Copper Sky", "The Fifth Season Rains", "Letters from Nowhere",
    "The Marble Garden", "Wild Harbor", "A Map of Embers", "The Orchard Keeper's Son",
    "Falling Upward", "The Night Ferry", "Stone and Feather", "The Long Division", "Salt Roads",
    "The Borrowed Star", "Moth Season", "The Tin Kingdom", "Far From Ithaca",
)
AUTHORS = ("Mara Ellison", "Tomas Reyes", "Ingrid Solberg", "Kwame Asante", "Lena Fischer",
           "Owen Prichard", "Priya Menon", "Sofia Marquez")
PRODUCTS = (
    "Steel Kettle", "Garden Hose", "Puzzle Cube", "Desk Lamp", "Yoga Mat", "Blender Pro",
    "Tennis Racket", "Stapler Max", "Wireless Mouse", "Rain Boots", "Chef Knife", "Kite Flyer",
    "Coffee Grinder", "Camping Stove", "Notebook Set", "Water Bottle", "Toy Robot", "Hedge Shears",
    "USB Hub", "Soccer Ball", "Rice Cooker", "Paint Set", "Office Chair", "Bike Helmet",
    "Flower Pots", "Headphones", "Cutting Board", "Jump Rope", "Label Maker", "Picnic Basket",
)
SONG_TITLES = (
    "Golden Hour", "Paper Planes", "Midnight Train", "Blue Horizon", "Falling Leaves", "Neon Sky",
    "River Song", "Electric Heart", "Slow Dance", "Wildfire", "Ocean Eyes", "Night Drive",
    "Summer Rain", "Lost Signal", "Gravity", "Velvet Morning", "City Lights", "Northern Star",
    "Echoes", "Sugar Moon", "Silver Lining", "Open Road", "Daydream", "Thunderbird",
    "Paper Hearts", "Satellite", "Firefly", "Low Tide", "Red Balloon", "Morning Glory",
)
ARTISTS = ("The Lanterns", "Mira Vale", "Copper Owls", "DJ Solis", "Ana Torres", "Static Bloom",
           "June Harlow", "The Foxgloves")
MOVIE_TITLES = (
    "Dust and Thunder", "The Glass House", "Night Shift", "Harbor Lights", "Second Chance",
    "The Quiet Hour", "Iron Valley", "Paper Moon Rising", "The Long Summer", "Cold Harbor",
    "Silver Screen", "The Lost Key", "Run River Run", "Broken Compass", "Starlight Motel",
    "The Last Train", "Deep Water", "Crimson Fields", "Echo Canyon", "The Orchard",
    "Blue Valentine Road", "Midnight Garden", "Wolf Creek Trail", "The Archivist",
    "Small Miracles", "Fire Season", "The Northern Line", "Glass Birds", "Open Skies",
    "Heavy Weather",
)
DIRECTORS = ("Nora Quill", "Arjun Das", "Lucia Ferri", "Sam Okoye", "Hedda Storm", "Ken Mori",
             "Rita Alves", "Paul Becker")
FLIGHTS = tuple(f"JT{n}" for n in range(101, 131))
TEAMS = ("Harbor FC", "Red Hawks", "Northside United", "Valley Rovers", "Iron City",
         "Blue Falcons", "Lakeside Athletic")

DOMAINS = (
    Domain("employees", "employee", "employees",
           Column("name", "TEXT", "name", PEOPLE), "named", "names", (
               Column("department", "TEXT", "department",
                      ("Sales", "Engineering", "Marketing", "Finance", "Support", "Legal"),
                      match="in the {v} department", plural="departments"),
               Column("city", "TEXT", "city", CITIES, match="based in {v}", plural="cities"),
               Column("salary", "INTEGER", "salary", low=30000, high=150000, step=5000,
                      above="earning more than {v}", below="earning less than {v}",
                      summable=True),
               Column("age", "INTEGER", "age", low=21, high=65, step=1,
                      above="older than {v}", below="younger than {v}"),
           )),
    Domain("books", "book", "books",
           Column("title", "TEXT", "title", BOOK_TITLES), "titled", "titles", (
               Column("author", "TEXT", "author", AUTHORS, match="written by {v}",
                      plural="authors"),
               Column("genre", "TEXT", "genre",
                      ("Fantasy", "Mystery", "Romance", "Science Fiction", "History", "Poetry"),
                      match="in the {v} genre", plural="genres"),
               Column("year", "INTEGER", "publication year", low=1950, high=2023, step=1,
                      above="published after {v}", below="published before {v}"),
               Column("pages", "INTEGER", "number of pages", low=80, high=900, step=50,
                      above="with more than {v} pages", below="with fewer than {v} pages",
                      summable=True),
               Column("price", "REAL", "price", low=4.0, high=40.0, step=1,
                      above="priced above {v}", below="priced below {v}"),
           )),
    Domain("products", "product", "products",
           Column("name", "TEXT", "name", PRODUCTS), "named", "names", (
               Column("category", "TEXT", "category",
                      ("Kitchen", "Garden", "Toys", "Electronics", "Sports", "Office"),
                      match="in the {v} category", plural="categories"),
               Column("brand", "TEXT", "brand", ("Acme", "Nordika", "Zento", "Brightline",
                                                 "Vireo", "Kasa"),
                      match="made by {v}", plural="brands"),
               Column("price", "REAL", "price", low=2.0, high=500.0, step=10,
                      above="costing more than {v}", below="costing less than {v}"),
               Column("stock", "INTEGER", "stock", low=0, high=1000, step=50,
                      above="with more than {v} units in stock",
                      below="with fewer than {v} units in stock", summable=True),
           )),
    Domain("students", "student", "students",
           Column("name", "TEXT", "name", PEOPLE), "named", "names", (
               Column("major", "TEXT", "major",
                      ("Biology", "Physics", "History", "Economics", "Mathematics", "Art"),
                      match="majoring in {v}", plural="majors"),
               Column("hometown", "TEXT", "hometown", CITIES, match="from {v}",
                      plural="hometowns"),
               Column("gpa", "REAL", "GPA", low=2.0, high=4.0, step=0.1,
                      above="with a GPA above {v}", below="with a GPA below {v}"),
               Column("credits", "INTEGER", "number of credits", low=0, high=160, step=10,
                      above="with more than {v} credits", below="with fewer than {v} credits",
                      summable=True),
               Column("age", "INTEGER", "age", low=17, high=30, step=1,
                      above="older than {v}", below="younger than {v}"),
           )),
    Domain("songs", "song", "songs",
           Column("title", "TEXT", "title", SONG_TITLES), "titled", "titles", (
               Column("artist", "TEXT", "artist", ARTISTS, match="by {v}", plural="artists"),
               Column("genre", "TEXT", "genre",
                      ("Rock", "Pop", "Jazz", "Hip Hop", "Folk", "Electronic"),
                      match="in the {v} genre", plural="genres"),
               Column("year", "INTEGER", "release year", low=1960, high=2023, step=1,
                      above="released after {v}", below="released before {v}"),
               Column("duration", "INTEGER", "duration in seconds", low=90, high=480, step=10,
                      above="longer than {v} seconds", below="shorter than {v} seconds",
                      summable=True),
               Column("plays", "INTEGER", "number of plays", low=1000, high=900000, step=10000,
                      above="with more than {v} plays", below="with fewer than {v} plays",
                      summable=True),
           )),
    Domain("movies", "movie", "movies",
           Column("title", "TEXT", "title", MOVIE_TITLES), "titled", "titles", (
               Column("director", "TEXT", "director", DIRECTORS, match="directed by {v}",
                      plural="directors"),
               Column("genre", "TEXT", "genre",
                      ("Drama", "Comedy", "Horror", "Action", "Animation", "Thriller"),
                      match="in the {v} genre", plural="genres"),
               Column("year", "INTEGER", "release year", low=1970, high=2023, step=1,
                      above="released after {v}", below="released before {v}"),
               Column("runtime", "INTEGER", "runtime in minutes", low=70, high=200, step=5,
                      above="longer than {v} minutes", below="shorter than {v} minutes",
                      summable=True),
               Column("rating", "REAL", "rating", low=1.0, high=10.0, step=0.5,
                      above="rated above {v}", below="rated below {v}"),
           )),
    Domain("flights", "flight", "flights",
           Column("flight_number", "TEXT", "flight number", FLIGHTS), "with flight number",
           "flight numbers", (
               Column("origin", "TEXT", "origin", CITIES, match="departing from {v}",
                      plural="origin cities"),
               Column("destination", "TEXT", "destination", CITIES, match="flying to {v}",
                      plural="destinations"),
               Column("distance", "INTEGER", "distance in km", low=100, high=9000, step=100,
                      above="covering more than {v} km", below="covering less than {v} km",
                      summable=True),
               Column("price", "INTEGER", "ticket price", low=40, high=1500, step=20,
                      above="costing more than {v}", below="costing less than {v}"),
           )),
    Domain("players", "player", "players",
           Column("name", "TEXT", "name", PEOPLE), "named", "names", (
               Column("team", "TEXT", "team", TEAMS, match="playing for {v}", plural="teams"),
               Column("position", "TEXT", "position",
                      ("Goalkeeper", "Defender", "Midfielder", "Forward"),
                      match="in the {v} position", plural="positions"),
               Column("goals", "INTEGER", "number of goals", low=0, high=60, step=1,
                      above="with more than {v} goals", below="with fewer than {v} goals",
                      summable=True),
               Column("age", "INTEGER", "age", low=17, high=40, step=1,
                      above="older than {v}", below="younger than {v}"),
               Column("height", "INTEGER", "height in cm", low=160, high=205, step=1,
                      above="taller than {v} cm", below="shorter than {v} cm"),
           )),
)
_DOMAINS_BY_TABLE = {d.table: d for d in DOMAINS}


# ----------------------------------------------------------------------------- generation

def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _fmt_number(x: float, column: Column) -> str:
    if column.type == "INTEGER" or float(x).is_integer():
        return str(int(round(x)))
    return f"{x:.1f}"


def _threshold(column: Column, rng: random.Random) -> str:
    """A threshold in the middle 70 % of the column's range, on the column's step grid."""
    width = column.high - column.low
    lo = int(round((column.low + 0.15 * width) / column.step))
    hi = int(round((column.low + 0.85 * width) / column.step))
    return _fmt_number(rng.randint(lo, hi) * column.step, column)


@dataclasses.dataclass
class _Cond:
    phrase: str
    sql: str
    column: str


def _condition(domain: Domain, rng: random.Random, exclude: tuple = ()) -> _Cond:
    column = rng.choice([c for c in domain.columns if c.name not in exclude])
    if not column.numeric:
        v = rng.choice(column.values)
        return _Cond(column.match.format(v=v), f"{column.name} = {_quote(v)}", column.name)
    v = _threshold(column, rng)
    if rng.random() < 0.5:
        return _Cond(column.above.format(v=v), f"{column.name} > {v}", column.name)
    return _Cond(column.below.format(v=v), f"{column.name} < {v}", column.name)


def _q_lookup(d: Domain, rng: random.Random):
    column = rng.choice(d.columns)
    v = rng.choice(d.key.values)
    frame = rng.choice(("What is the {p} of the {e} {kp} {v}?", "Find the {p} of the {e} {kp} {v}.",
                        "What {p} does the {e} {kp} {v} have?"))
    question = frame.format(p=column.phrase, e=d.entity, kp=d.key_phrase, v=v)
    sql = f"SELECT {column.name} FROM {d.table} WHERE {d.key.name} = {_quote(v)}"
    return question, sql, {column.name}


def _q_filter(d: Domain, rng: random.Random):
    cond = _condition(d, rng)
    frame = rng.choice(("What are the {kp} of the {es} {c}?", "List the {kp} of all {es} {c}.",
                        "Show the {kp} of {es} {c}."))
    question = frame.format(kp=d.key_plural, es=d.entities, c=cond.phrase)
    return question, f"SELECT {d.key.name} FROM {d.table} WHERE {cond.sql}", {cond.column}


def _q_filter2(d: Domain, rng: random.Random):
    first = _condition(d, rng)
    second = _condition(d, rng, exclude=(first.column,))
    frame = rng.choice(("Which {es} are {a} and {b}? Give their {kp}.",
                        "List the {kp} of {es} {a} and {b}."))
    question = frame.format(kp=d.key_plural, es=d.entities, a=first.phrase, b=second.phrase)
    sql = f"SELECT {d.key.name} FROM {d.table} WHERE {first.sql} AND {second.sql}"
    return question, sql, {first.column, second.column}


def _q_count(d: Domain, rng: random.Random):
    cond = _condition(d, rng)
    frame = rng.choice(("How many {es} {c} are there?", "Count the {es} {c}.",
                        "What is the number of {es} {c}?"))
    question = frame.format(es=d.entities, c=cond.phrase)
    return question, f"SELECT COUNT(*) FROM {d.table} WHERE {cond.sql}", {cond.column}


_AGGREGATES = {"AVG": ("average",), "MAX": ("highest", "maximum"), "MIN": ("lowest", "minimum"),
               "SUM": ("total",)}


def _q_aggregate(d: Domain, rng: random.Random):
    column = rng.choice([c for c in d.columns if c.numeric])
    funcs = [f for f in _AGGREGATES if f != "SUM" or column.summable]
    func = rng.choice(funcs)
    word = rng.choice(_AGGREGATES[func])
    if rng.random() < 0.5:
        cond = _condition(d, rng, exclude=(column.name,))
        question = f"What is the {word} {column.phrase} of {d.entities} {cond.phrase}?"
        sql = f"SELECT {func}({column.name}) FROM {d.table} WHERE {cond.sql}"
        return question, sql, {column.name, cond.column}
    question = f"What is the {word} {column.phrase} across all {d.entities}?"
    return question, f"SELECT {func}({column.name}) FROM {d.table}", {column.name}


def _q_top(d: Domain, rng: random.Random):
    column = rng.choice([c for c in d.columns if c.numeric])
    high = rng.random() < 0.5
    word, order = ("highest", "DESC") if high else ("lowest", "ASC")
    k = rng.choice((1, 1, 2, 3, 5))
    if k == 1 and rng.random() < 0.5:
        cond = _condition(d, rng, exclude=(column.name,))
        question = (f"Among the {d.entities} {cond.phrase}, which one has the {word} "
                    f"{column.phrase}? Give its {d.key.phrase}.")
        sql = (f"SELECT {d.key.name} FROM {d.table} WHERE {cond.sql} "
               f"ORDER BY {column.name} {order} LIMIT 1")
        return question, sql, {column.name, cond.column}
    if k == 1:
        question = f"Which {d.entity} has the {word} {column.phrase}? Give its {d.key.phrase}."
    else:
        question = (f"List the {d.key_plural} of the {k} {d.entities} with the {word} "
                    f"{column.phrase}.")
    sql = f"SELECT {d.key.name} FROM {d.table} ORDER BY {column.name} {order} LIMIT {k}"
    return question, sql, {column.name}


def _q_sorted(d: Domain, rng: random.Random):
    column = rng.choice([c for c in d.columns if c.numeric])
    cond = _condition(d, rng, exclude=(column.name,))
    high = rng.random() < 0.5
    words, order = ("from highest to lowest", "DESC") if high else ("from lowest to highest", "ASC")
    question = (f"List the {d.key_plural} of {d.entities} {cond.phrase}, sorted by "
                f"{column.phrase} {words}.")
    sql = f"SELECT {d.key.name} FROM {d.table} WHERE {cond.sql} ORDER BY {column.name} {order}"
    return question, sql, {column.name, cond.column}


def _q_distinct(d: Domain, rng: random.Random):
    column = rng.choice([c for c in d.columns if not c.numeric])
    question = rng.choice(("How many different {pl} are there among the {es}?",
                           "Count the distinct {pl} of all {es}.")).format(pl=column.plural,
                                                                           es=d.entities)
    return question, f"SELECT COUNT(DISTINCT {column.name}) FROM {d.table}", {column.name}


def _q_group(d: Domain, rng: random.Random):
    column = rng.choice([c for c in d.columns if not c.numeric])
    question = rng.choice(("How many {es} are there for each {p}?",
                           "For each {p}, count the {es}.")).format(p=column.phrase, es=d.entities)
    sql = f"SELECT {column.name}, COUNT(*) FROM {d.table} GROUP BY {column.name}"
    return question, sql, {column.name}


_TEMPLATES = {_q_lookup: 2, _q_filter: 2, _q_filter2: 1, _q_count: 2, _q_aggregate: 2, _q_top: 2,
              _q_sorted: 1, _q_distinct: 1, _q_group: 1}


def create_table(domain: Domain, names: set[str]) -> str:
    """`CREATE TABLE t (key TEXT, ...)` with the given columns in the domain's order."""
    cols = [c for c in (domain.key,) + domain.columns if c.name in names]
    return f"CREATE TABLE {domain.table} (" + ", ".join(f"{c.name} {c.type}" for c in cols) + ")"


def user_prompt(context: str, question: str) -> str:
    """The user turn of an example: schema, blank line, question."""
    return f"{context}\n\nQuestion: {question}"


def _sample(rng: random.Random) -> dict:
    domain = rng.choice(DOMAINS)
    template = rng.choices(list(_TEMPLATES), weights=list(_TEMPLATES.values()))[0]
    question, query, used = template(domain, rng)
    spare = [c.name for c in domain.columns if c.name not in used]
    names = {domain.key.name} | used | set(rng.sample(spare, min(len(spare), rng.randint(0, 2))))
    context = create_table(domain, names)
    return {"messages": common.chat(DESCRIPTION, user_prompt(context, question), query),
            "answer": query, "context": context, "question": question,
            "db_seed": rng.randrange(2 ** 31)}


def generate(split: str, n: int, seed: int) -> list[dict]:
    """`n` distinct examples of `split`; no reference query of one split occurs in another."""
    return common.generate_split(NAME, split, n, seed, _sample, key=lambda ex: ex["answer"])


# ----------------------------------------------------------------------------- databases

_LITERAL_RE = re.compile(
    r"(?:\w+\.)?(\w+)\s*(?:=|==|!=|<>|>=|<=|>|<|\bLIKE\b)\s*"
    r"('(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|-?\d+(?:\.\d+)?)", re.I)

ROWS_PER_TABLE = 24
N_DATABASES = 3


def compared_literals(query: str) -> dict[str, list]:
    """{column (lower case): literals it is compared with} in `query`, e.g. age > 30 -> 30."""
    out: dict[str, list] = collections.defaultdict(list)
    for column, literal in _LITERAL_RE.findall(query):
        if literal[0] in "'\"":
            value = literal[1:-1].replace(literal[0] * 2, literal[0])
        else:
            value = float(literal) if "." in literal else int(literal)
        out[column.lower()].append(value)
    return dict(out)


def _kind(declared: str) -> str:
    declared = declared.upper()
    if "INT" in declared:
        return "int"
    if any(t in declared for t in ("REAL", "FLOA", "DOUB", "NUM", "DEC")):
        return "real"
    return "text"


def _numeric_values(kind: str, low: float, high: float, forced: list, n: int,
                    rng: random.Random) -> list:
    """n values in [low, high], distinct where the range allows (so ORDER BY has no ties).
    The numbers the query compares with are planted too: equality filters then match a row and
    boundary rows tell `>` from `>=`."""
    if kind == "int":
        span = range(int(low), int(high) + 1)
        values = rng.sample(span, n) if len(span) >= n else [rng.choice(span) for _ in range(n)]
    else:
        values = [round(rng.uniform(low, high), 2) for _ in range(n)]
    for literal in forced[:4]:
        for slot in rng.sample(range(n), 3):
            values[slot] = literal
    return values


def _text_values(pool: tuple, unique: bool, forced: list, n: int, rng: random.Random) -> list:
    forced = [str(v) for v in forced]
    if unique:
        rest = [v for v in pool if v not in forced]
        chosen = forced[:n] + rng.sample(rest, min(len(rest), n - len(forced[:n])))
        rng.shuffle(chosen)
        return (chosen * (n // max(len(chosen), 1) + 1))[:n]
    values = [rng.choice(pool) for _ in range(n)]
    for literal in forced:
        for _ in range(3):
            values[rng.randrange(n)] = literal
    return values


def _column_data(table: str, column: str, declared: str, literals: dict, n: int,
                 rng: random.Random) -> list:
    forced = literals.get(column.lower(), [])
    domain = _DOMAINS_BY_TABLE.get(table.lower())
    known = None
    if domain is not None:
        known = next((c for c in (domain.key,) + domain.columns if c.name == column.lower()), None)
    kind = _kind(declared)
    if known is not None and known.numeric:
        forced_eq = [v for v in forced if not isinstance(v, str)]
        return _numeric_values(kind, known.low, known.high, forced_eq, n, rng)
    if known is not None:
        return _text_values(known.values, known is domain.key, forced, n, rng)
    numbers = [v for v in forced if not isinstance(v, str)]
    top = max([abs(v) for v in numbers] + [50]) * 2
    if kind in ("int", "real"):
        return _numeric_values(kind, 0, top, numbers, n, rng)
    if numbers and len(numbers) == len(forced):
        # A text column (VARCHAR in sql-create-context) compared with numbers: numeric strings.
        return [str(v) for v in _numeric_values("int", 0, top, numbers, n, rng)]
    pool = tuple(f"{column}_{i}" for i in range(n)) + tuple(str(v) for v in forced)
    return _text_values(pool, False, forced, n, rng)


def build_database(context: str, reference: str, seed: int,
                   rows: int = ROWS_PER_TABLE) -> sqlite3.Connection:
    """An in-memory database with the context's tables, filled with rows that are a pure
    function of (context, reference literals, seed). Bundled tables use their domain's pools."""
    conn = sqlite3.connect(":memory:")
    conn.executescript(context)
    literals = compared_literals(reference)
    rng = random.Random(f"sql-db/{seed}")
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY rowid")]
    for table in tables:
        info = conn.execute(f'PRAGMA table_info("{table}")').fetchall()
        columns = [_column_data(table, name, declared, literals, rows, rng)
                   for _, name, declared, *_ in info]
        placeholders = ", ".join("?" for _ in info)
        conn.executemany(f'INSERT INTO "{table}" VALUES ({placeholders})', zip(*columns))
    conn.commit()
    return conn


# ----------------------------------------------------------------------------- guarded runs

class QueryError(Exception):
    """A query that could not run (syntax error, not authorized, too slow, too many rows)."""


_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                    getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
MAX_STEPS = 2_000_000          # virtual-machine instructions per query (progress handler)
MAX_ROWS = 10_000
MAX_LENGTH = 100_000           # longest string or blob a query may build


def _authorizer(action, arg1, arg2, db_name, trigger):
    return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY


def make_read_only(conn: sqlite3.Connection) -> sqlite3.Connection:
    """Lock a populated connection down so that only plain reads can run on it."""
    conn.execute("PRAGMA query_only = ON")
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_LENGTH)
    conn.set_authorizer(_authorizer)
    return conn


def clean_query(text: str) -> str:
    """Strip whitespace, a Markdown code fence and trailing semicolons from a model's reply."""
    text = str(text).strip()
    fence = re.match(r"^```[a-zA-Z]*\s*(.*?)\s*```", text, re.S)
    if fence:
        text = fence.group(1)
    return text.strip().rstrip(";").strip()


def execute_readonly(conn: sqlite3.Connection, query: str, max_steps: int = MAX_STEPS,
                     max_rows: int = MAX_ROWS) -> list[tuple]:
    """Rows of one read-only statement on a connection prepared by `make_read_only`."""
    ticks = [0]
    period = 1000

    def progress():
        ticks[0] += 1
        return 1 if ticks[0] * period > max_steps else 0

    conn.set_progress_handler(progress, period)
    try:
        cursor = conn.execute(query)
        rows = cursor.fetchmany(max_rows + 1)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as err:
        if ticks[0] * period > max_steps:
            raise QueryError(f"query exceeded {max_steps} steps") from err
        raise QueryError(f"{type(err).__name__}: {err}") from err
    finally:
        conn.set_progress_handler(None, 0)
    if len(rows) > max_rows:
        raise QueryError(f"query returned more than {max_rows} rows")
    return rows


def _normalise_cell(value):
    return round(value, 6) if isinstance(value, float) else value


def results_match(reference_rows: list, predicted_rows: list, ordered: bool) -> bool:
    ref = [tuple(_normalise_cell(v) for v in r) for r in reference_rows]
    pred = [tuple(_normalise_cell(v) for v in r) for r in predicted_rows]
    if ordered:
        return ref == pred
    return collections.Counter(ref) == collections.Counter(pred)


_ORDER_BY_RE = re.compile(r"\border\s+by\b", re.I)
_TOKEN_RE = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\d+(?:\.\d+)?|\w+|<=|>=|<>|!=|==|\S")


def normalise_query(query: str) -> str:
    """Token-normalised SQL text: keywords and identifiers lower-cased, string literals kept,
    spacing canonical, trailing semicolon dropped. Used for exact match."""
    tokens = _TOKEN_RE.findall(clean_query(query))
    return " ".join(t if t[0] in "'\"" else t.lower() for t in tokens)


def _db_seed(example: dict) -> int:
    if "db_seed" in example:
        return int(example["db_seed"])
    return common.stable_int(f"{example['context']}\x00{example['answer']}", 8)


def score(prediction: str, example: dict) -> dict:
    """Execution match on N_DATABASES generated databases, plus exact match of the query text."""
    reference = clean_query(example["answer"])
    predicted = clean_query(prediction)
    if not predicted:
        return {"correct": False, "execution_match": False, "exact_match": False, "valid": False,
                "error": "empty query"}
    exact = normalise_query(predicted) == normalise_query(reference)
    ordered = bool(_ORDER_BY_RE.search(reference))
    base = _db_seed(example)
    match = True
    for i in range(N_DATABASES):
        try:
            conn = make_read_only(build_database(example["context"], reference, base + i))
            reference_rows = execute_readonly(conn, reference)
        except (sqlite3.Error, QueryError) as err:
            # The reference itself does not run here (e.g. a public row in another dialect):
            # fall back to exact match.
            return {"correct": exact, "execution_match": None, "exact_match": exact,
                    "valid": None, "error": f"reference query failed: {err}"}
        try:
            predicted_rows = execute_readonly(conn, predicted)
        except QueryError as err:
            conn.close()
            return {"correct": False, "execution_match": False, "exact_match": exact,
                    "valid": False, "error": str(err)}
        match = match and results_match(reference_rows, predicted_rows, ordered)
        conn.close()
    return {"correct": match, "execution_match": match, "exact_match": exact, "valid": True,
            "error": None}
