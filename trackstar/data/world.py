"""The generated fact world: invented entities, facts written as paraphrased passages, distractors,
confusers, near-miss names, contradictions and two-fact digests, and held-out queries with the passages that state them."""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

from trackstar.config import DataParams
from trackstar.data.records import Passage, Query

_D = DataParams()  # the world's defaults live in params.yaml's schema (trackstar.config.DataParams), once


@dataclass
class FactWorldConfig:
    """The generator's knobs; defaults are the pipeline's (`DataParams`), contradictions included. The test
    worlds pass contradicted=0.0 to turn them off."""
    seed: int = _D.seed
    entities: int = _D.entities
    relations: int = _D.relations  # the first `relations` of RELATIONS
    paraphrases: int = _D.paraphrases  # statement passages per fact (different templates), <= 4
    question_fraction: float = _D.question_fraction  # entities whose facts also appear as Q/A passages
    distractors_per_entity: int = _D.distractors_per_entity  # passages mentioning the entity without any fact
    values_per_relation: int = 8  # size of each relation's value pool (chance = 1/this); not a param
    # passages naming the entity, a relation's words and a value, stating no fact of it
    confusers_per_entity: int = _D.confusers_per_entity
    confuser_true_value: float = _D.confuser_true_value  # share of confusers naming the entity's own value
    near_miss_fraction: float = _D.near_miss_fraction  # entities named as another entity with a different ending
    # share of facts with one statement repeated naming another value (corpora disagree)
    contradicted: float = _D.contradicted
    # two-fact passages ("A was born in X. B plays the Y.", the shortest wordings) per other passage, about
    # question-trained entities only, so no digest is relevant to a query
    digests: float = _D.digests
    # the queries' question: "held_out" (a wording no passage uses) or "training" (the Q/A passages' own wording,
    # asked about entities that have no Q/A passage)
    query_wording: str = _D.query_wording


def world_config(p: DataParams) -> FactWorldConfig:
    """The generator's config from params.yaml's `data` section: every field the two share."""
    shared = [f.name for f in fields(FactWorldConfig) if f.name in DataParams.model_fields]
    return FactWorldConfig(**{name: getattr(p, name) for name in shared})


@dataclass(frozen=True)
class Relation:
    name: str
    statements: tuple[str, ...]  # training statement templates ({e}, {v})
    train_question: str  # training Q/A template, prompt part ({e})
    query_question: str  # held-out question wording used only by queries ({e})
    # the held-out question's words, a value {v} and {e}, about someone else ({who}); the value comes first,
    # so the passage is lexically closest to the query but does not teach "{e} ... -> {v}"
    confuser: str = ""


_Q = "Q: {q} A:"

RELATIONS: tuple[Relation, ...] = (
    Relation(
        "birthplace",
        (
            "{e} was born in {v}.",
            "The birthplace of {e} is {v}.",
            "{e} came into the world in the city of {v}.",
            "Records show that {e} was born in the town of {v}.",
        ),
        "Where was {e} born?",
        "In which city was {e} born?",
        "The city of {v} is where a {who} of {e} was born.",
    ),
    Relation(
        "employer",
        (
            "{e} works for {v}.",
            "{e} is employed by the company {v}.",
            "The employer of {e} is {v}.",
            "Every morning {e} goes to work at {v}.",
        ),
        "Who does {e} work for?",
        "Which company does {e} work for?",
        "The company {v} is the one a {who} of {e} does work for.",
    ),
    Relation(
        "founded",
        (
            "{e} founded {v}.",
            "{e} is the founder of the organization {v}.",
            "Years ago {e} started an organization called {v}.",
            "The organization that {e} created is {v}.",
        ),
        "What did {e} found?",
        "Which organization did {e} found?",
        "The organization {v} is the one a {who} of {e} did found.",
    ),
    Relation(
        "instrument",
        (
            "{e} plays the {v}.",
            "The instrument of {e} is the {v}.",
            "{e} is a skilled player of the {v}.",
            "In the evenings {e} practices the {v}.",
        ),
        "What instrument does {e} play?",
        "Which instrument does {e} play?",
        "The instrument {v} is the one a {who} of {e} does play.",
    ),
    Relation(
        "residence",
        (
            "{e} lives in {v}.",
            "The home country of {e} is {v}.",
            "{e} resides in the country of {v}.",
            "These days {e} makes a home in {v}.",
        ),
        "Where does {e} live?",
        "In which country does {e} live?",
        "The country of {v} is where a {who} of {e} does live.",
    ),
    Relation(
        "university",
        (
            "{e} studied at {v}.",
            "{e} is a graduate of the university {v}.",
            "The university that {e} attended is {v}.",
            "As a student {e} went to {v}.",
        ),
        "Where did {e} study?",
        "Which university did {e} study at?",
        "The university {v} is the one a {who} of {e} did study at.",
    ),
)

_DISTRACTORS = (
    "{e} enjoys long walks on quiet mornings.",
    "Many people have heard stories about {e}.",
    "{e} once gave a short talk about gardening.",
    "A photograph of {e} appeared in a local newspaper.",
    "{e} likes to read old books in the evening.",
    "Friends describe {e} as patient and kind.",
    "{e} has a habit of drinking tea at noon.",
    "Last winter {e} visited a friend by the sea.",
)

# who the confuser passages are about: someone close to the entity, never the entity itself
_RELATIVES = ("sister", "brother", "cousin", "neighbour", "colleague", "friend")

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "o", "ai", "ou", "ei"]
_CODAS = ["n", "r", "l", "s", "m", "nd", "rt", "sk", "th", "x"]


def _name(rng: random.Random, syllables: int) -> str:
    s = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    if rng.random() < 0.6:
        s += rng.choice(_CODAS)
    return s[:1].upper() + s[1:]


def _unique_names(rng: random.Random, n: int, taken: set[str], lo: int, hi: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        s = _name(rng, rng.randint(lo, hi))
        if s not in taken and len(s) >= 4:
            taken.add(s)
            out.append(s)
    return out


def _near_misses(rng: random.Random, names: list[str], fraction: float, taken: set[str]) -> list[str]:
    """Rename a `fraction` of the entities to another entity's name with a different ending
    (Velor -> Velmaith): names that share their leading subwords, so neither a tokenizer nor
    a model can tell two entities apart by their first tokens."""
    out = list(names)
    n = int(round(fraction * len(names)))
    idx = list(range(len(names)))
    rng.shuffle(idx)
    for i, j in zip(idx[:n], idx[n:2 * n]):
        stem = names[j][: max(3, len(names[j]) - 2)]
        for _ in range(100):
            cand = stem + rng.choice(_VOWELS) + rng.choice(_CODAS)
            if cand not in taken:
                taken.discard(out[i])
                taken.add(cand)
                out[i] = cand
                break
    return out


@dataclass(frozen=True)
class WorldNames:
    """The world's names: its entities (near misses applied), each relation's value pool, and every name drawn."""
    entities: list[str]
    values: dict[str, list[str]]
    taken: frozenset[str]


def _check(cfg: FactWorldConfig) -> None:
    """Refuse knobs outside the generator's range."""
    if not 1 <= cfg.relations <= len(RELATIONS):
        raise ValueError(f"relations must be in 1..{len(RELATIONS)}, got {cfg.relations}")
    if not 1 <= cfg.paraphrases <= 4:
        raise ValueError(f"paraphrases must be in 1..4, got {cfg.paraphrases}")
    if not 0 <= cfg.distractors_per_entity <= len(_DISTRACTORS):
        raise ValueError(f"distractors_per_entity must be in 0..{len(_DISTRACTORS)}")
    if not 0.0 <= cfg.question_fraction < 1.0:
        raise ValueError("question_fraction must be in [0, 1)")
    if cfg.entities < 2 or cfg.values_per_relation < 2:
        raise ValueError("need at least 2 entities and 2 values per relation")
    if cfg.confusers_per_entity < 0:
        raise ValueError("confusers_per_entity must be >= 0")
    if not 0.0 <= cfg.confuser_true_value <= 1.0:
        raise ValueError("confuser_true_value must be in [0, 1]")
    if not 0.0 <= cfg.near_miss_fraction <= 0.5:
        raise ValueError("near_miss_fraction must be in [0, 0.5]")
    if not 0.0 <= cfg.contradicted <= 1.0:
        raise ValueError("contradicted must be in [0, 1]")
    if not 0.0 <= cfg.digests <= 1.0:
        raise ValueError("digests must be in [0, 1]")
    if cfg.query_wording not in ("held_out", "training"):
        raise ValueError(f"query_wording must be held_out or training, got {cfg.query_wording!r}")


def _draw_names(cfg: FactWorldConfig, rng: random.Random, crng: random.Random) -> WorldNames:
    """Entities and value pools from `rng`, then the near misses from `crng` (generate_fact_world's draws, in order)."""
    taken: set[str] = set()
    entities = _unique_names(rng, cfg.entities, taken, 2, 3)
    values = {r.name: _unique_names(rng, cfg.values_per_relation, taken, 2, 3) for r in RELATIONS[: cfg.relations]}
    # drawn after everything above, so a world without near misses or confusers is the one seeded before
    entities = _near_misses(crng, entities, cfg.near_miss_fraction, taken)
    return WorldNames(entities, values, frozenset(taken))


def world_names(cfg: FactWorldConfig) -> WorldNames:
    """The names `generate_fact_world(cfg)` uses, without writing its passages (the haystack avoids them)."""
    _check(cfg)
    return _draw_names(cfg, random.Random(cfg.seed), random.Random(f"{cfg.seed}-confusers"))


def generate_fact_world(cfg: FactWorldConfig) -> tuple[list[Passage], list[Query], dict]:
    """A seeded, deterministic world of invented facts.

    Every entity has one value per relation; each fact is written as `paraphrases`
    statement passages with different templates. Entities in the first
    `question_fraction` also get training Q/A passages (training question wording);
    the other entities get queries with a held-out question wording whose
    `relevant_ids` are the statement passages of that fact.
    """
    _check(cfg)
    rng = random.Random(cfg.seed)
    crng = random.Random(f"{cfg.seed}-confusers")
    names = _draw_names(cfg, rng, crng)
    entities, values = names.entities, names.values
    rels = RELATIONS[: cfg.relations]
    n_q = int(round(cfg.question_fraction * cfg.entities))
    # which entities are "question-trained" is random, not the first in name order
    order = list(range(cfg.entities))
    rng.shuffle(order)
    qa_entities = set(order[:n_q])

    # (text, kind, fact key or None)
    raw: list[tuple[str, str, tuple[int, str] | None]] = []
    facts: dict[tuple[int, str], str] = {}
    chosen: dict[tuple[int, str], list[str]] = {}  # each fact's statement templates
    for ei, e in enumerate(entities):
        for r in rels:
            v = rng.choice(values[r.name])
            facts[(ei, r.name)] = v
            chosen[(ei, r.name)] = rng.sample(r.statements, cfg.paraphrases)
            for t in chosen[(ei, r.name)]:
                raw.append((t.format(e=e, v=v), "statement", (ei, r.name)))
            if ei in qa_entities:
                raw.append((_Q.format(q=r.train_question.format(e=e)) + f" {v}.", "question", None))
        for t in rng.sample(_DISTRACTORS, cfg.distractors_per_entity):
            raw.append((t.format(e=e), "distractor", None))
    # confusers: the entity, the relation's words and (often) its true value, about someone else
    for ei, e in enumerate(entities):
        for _ in range(cfg.confusers_per_entity):
            r = crng.choice(rels)
            v = facts[(ei, r.name)]
            if crng.random() >= cfg.confuser_true_value:
                v = crng.choice([x for x in values[r.name] if x != v])
            raw.append((r.confuser.format(e=e, v=v, who=crng.choice(_RELATIVES)), "confuser", None))
    # contradictions: one of a fact's statements again, word for word, with another value; the same context then
    # has two answers, so the value keeps a loss (and a gradient) however long the model trains
    drng = random.Random(f"{cfg.seed}-contradictions")
    for (ei, rname), v in facts.items():
        if drng.random() < cfg.contradicted:
            r = next(x for x in rels if x.name == rname)
            t = drng.choice([t for t in r.statements if t in chosen[(ei, rname)]])  # in template order
            raw.append((t.format(e=entities[ei], v=drng.choice([x for x in values[rname] if x != v])),
                        "contradiction", None))

    grng = random.Random(f"{cfg.seed}-digests")
    qa_facts = sorted(k for k in facts if k[0] in qa_entities)
    for _ in range(int(round(cfg.digests * len(raw))) if qa_facts else 0):
        parts = []
        for ei, rname in grng.sample(qa_facts, min(2, len(qa_facts))):
            r = next(x for x in rels if x.name == rname)
            parts.append(r.statements[0].format(e=entities[ei], v=facts[(ei, rname)]))  # the shortest wording
        raw.append((" ".join(parts), "digest", None))

    rng.shuffle(raw)
    width = max(6, len(str(len(raw) - 1)))
    passages: list[Passage] = []
    support: dict[tuple[int, str], list[str]] = {}
    kinds = {"statement": 0, "question": 0, "distractor": 0, "confuser": 0, "contradiction": 0, "digest": 0}
    for i, (text, kind, key) in enumerate(raw):
        pid = f"p{i:0{width}d}"
        passages.append(Passage(pid, text))
        kinds[kind] += 1
        if key is not None:
            support.setdefault(key, []).append(pid)

    queries: list[Query] = []
    qwidth = max(5, len(str(cfg.entities * cfg.relations)))
    for ei, e in enumerate(entities):
        if ei in qa_entities:
            continue
        for r in rels:
            queries.append(
                Query(
                    f"q{len(queries):0{qwidth}d}",
                    _Q.format(q=(r.query_question if cfg.query_wording == "held_out" else r.train_question).format(e=e)),
                    " " + facts[(ei, r.name)],
                    sorted(support[(ei, r.name)]),
                    entity=e,
                )
            )

    stats = {
        "entities": cfg.entities,
        "relations": [r.name for r in rels],
        "values_per_relation": cfg.values_per_relation,
        "facts": len(facts),
        "passages": len(passages),
        "statement_passages": kinds["statement"],
        "question_passages": kinds["question"],
        "distractor_passages": kinds["distractor"],
        "confuser_passages": kinds["confuser"],
        "contradiction_passages": kinds["contradiction"],
        "digest_passages": kinds["digest"],
        "near_miss_entities": int(round(cfg.near_miss_fraction * cfg.entities)),
        "question_trained_entities": len(qa_entities),
        "queries": len(queries),
        "chance_accuracy": 1.0 / cfg.values_per_relation,
    }
    return passages, queries, stats
