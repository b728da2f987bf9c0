"""The haystack of benchmarks/scale.py: deterministic, unique ids, the world's words only, and no passage that
states (or names the entity of) a query's fact."""

import re

from trackstar.data.haystack import haystack_passages
from trackstar.data.world import _Q, RELATIONS, FactWorldConfig, generate_fact_world, world_names

WORLD = FactWorldConfig(entities=40)
WORD = re.compile(r"[A-Za-z]+")


def _form(template: str) -> re.Pattern:
    """A statement template as a regex capturing its entity and value."""
    return re.compile(re.escape(template).replace(r"\{e\}", r"(?P<e>\w+)").replace(r"\{v\}", r"(?P<v>\w+)"))


# every way the world states a fact: the statement templates and the Q/A passages (training and query wording)
FACT_FORMS = [_form(t) for r in RELATIONS for t in r.statements] + [
    _form(_Q.format(q=q) + " {v}.") for r in RELATIONS for q in (r.train_question, r.query_question)]


def test_deterministic_prefix_and_unique_ids():
    long = list(haystack_passages(WORLD, 30_000))
    assert list(haystack_passages(WORLD, 30_000)) == long
    assert list(haystack_passages(WORLD, 1_234)) == long[:1_234]  # a smaller corpus is a prefix of a larger one
    assert list(haystack_passages(WORLD, 0)) == []
    assert len({p.id for p in long}) == len(long)
    assert all(re.fullmatch(r"h\d{8}", p.id) for p in long)
    world_ids = {p.id for p in generate_fact_world(WORLD)[0]}
    assert not world_ids & {p.id for p in long}
    assert list(haystack_passages(WORLD, 500, seed=1)) != long[:500]


def test_no_query_fact_and_world_words_only():
    passages, queries, _ = generate_fact_world(WORLD)
    hay = list(haystack_passages(WORLD, 20_000))
    texts = [p.text for p in hay]
    words = [set(WORD.findall(t)) for t in texts]
    # no passage names an entity of the world, so none states a query's fact in any template
    entities = set(world_names(WORLD).entities)
    assert not set().union(*words) & entities
    facts = {(q.entity, q.target.strip()) for q in queries}
    stated = [m.group("e", "v") for t in texts for m in map(lambda f: f.fullmatch(t), FACT_FORMS) if m]
    assert len(stated) > 0.5 * len(texts)  # the haystack states facts of its own entities...
    assert not facts & set(stated)  # ...and none of a query
    # every word is the world's (templates, values) or a new name built from the world's syllables
    world_words = set().union(*(WORD.findall(p.text) for p in passages))
    new = set().union(*words) - world_words
    assert new and all(w[0].isupper() and w[1:].islower() for w in new)
    # the world's values recur (the haystack shares the value pools) and near misses of its entities occur
    values = set().union(*world_names(WORLD).values.values())
    assert sum(bool(w & values) for w in words) > 0.5 * len(hay)
    stems = {e[: max(3, len(e) - 2)] for e in entities}
    assert any(n.startswith(s) for n in new for s in stems)
