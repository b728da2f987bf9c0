import json
import os
import re

import pytest

from trackstar.data.records import IdSet, Passage, Query, count_lines, iter_corpus, query_record, read_queries, write_jsonl
from trackstar.data.world import RELATIONS, FactWorldConfig, generate_fact_world, world_names
from trackstar.errors import InputError

GOOD_P = '{"id": "p1", "text": "Alpha was born in Beta."}'
GOOD_Q = '{"id": "q1", "prompt": "Q: Where? A:", "target": " Beta", "relevant_ids": ["p1"]}'


def _write(tmp_path, name, data: bytes | str):
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def _expect(exc: InputError, path, line, field=None):
    msg = str(exc)
    assert os.path.basename(str(path)) in msg
    if line is not None:
        assert f":{line}:" in msg
        assert exc.line == line
    if field is not None:
        assert f"'{field}'" in msg
        assert exc.field == field


@pytest.mark.parametrize(
    "second_line, field, needle",
    [
        (b'{"id": "p2", "text": "ok \xff\xfe"}', None, "UTF-8"),
        ('{"id": "p2", "text": "unterminated}', None, "malformed JSON"),
        ('["p2", "text"]', None, "JSON object"),
        ('{"text": "no id"}', "id", "missing"),
        ('{"id": "", "text": "empty id"}', "id", "empty"),
        ('{"id": 7, "text": "int id"}', "id", "string"),
        ('{"id": "p2"}', "text", "missing"),
        ('{"id": "p2", "text": "   "}', "text", "empty"),
        ('{"id": "p2", "text": ["a"]}', "text", "string"),
        ('{"id": "p1", "text": "duplicate"}', "id", "duplicate"),
        ("", None, "blank line"),
        ("   ", None, "blank line"),
    ],
)
def test_corpus_errors_name_file_line_field(tmp_path, second_line, field, needle):
    sl = second_line if isinstance(second_line, bytes) else second_line.encode()
    path = _write(tmp_path, "corpus.jsonl", GOOD_P.encode() + b"\n" + sl + b"\n" + GOOD_P.replace("p1", "p3").encode() + b"\n")
    with pytest.raises(InputError) as ei:
        list(iter_corpus(path))
    _expect(ei.value, path, 2, field)
    assert needle in str(ei.value)


@pytest.mark.parametrize(
    "second_line, field, needle",
    [
        ('{"id": "q2", "target": " x"}', "prompt", "missing"),
        ('{"id": "q2", "prompt": "", "target": " x"}', "prompt", "empty"),
        ('{"id": "q2", "prompt": "p"}', "target", "missing"),
        ('{"id": "q2", "prompt": "p", "target": ""}', "target", "empty"),
        ('{"id": "q2", "prompt": "p", "target": 3}', "target", "string"),
        ('{"id": "q1", "prompt": "p", "target": " x"}', "id", "duplicate"),
        ('{"id": "q2", "prompt": "p", "target": " x", "relevant_ids": "p1"}', "relevant_ids", "list of strings"),
        ('{"id": "q2", "prompt": "p", "target": " x", "relevant_ids": [1]}', "relevant_ids", "list of strings"),
        ('{"id": "q2", "prompt": "p", "target": " x", "relevant_ids": ["p9"]}', "relevant_ids", "not in the corpus"),
        ("{bad json", None, "malformed JSON"),
        ("42", None, "JSON object"),
    ],
)
def test_query_errors_name_file_line_field(tmp_path, second_line, field, needle):
    path = _write(tmp_path, "queries.jsonl", GOOD_Q + "\n" + second_line + "\n")
    with pytest.raises(InputError) as ei:
        read_queries(path, corpus_ids={"p1"})
    _expect(ei.value, path, 2, field)
    assert needle in str(ei.value)


def test_empty_and_missing_files(tmp_path):
    empty = _write(tmp_path, "empty.jsonl", "")
    with pytest.raises(InputError, match="empty.jsonl.*empty"):
        list(iter_corpus(empty))
    with pytest.raises(InputError, match="empty.jsonl.*empty"):
        read_queries(empty)
    with pytest.raises(InputError, match="nope.jsonl"):
        list(iter_corpus(tmp_path / "nope.jsonl"))


def test_good_files_and_optional_relevant_ids(tmp_path):
    c = _write(tmp_path, "c.jsonl", GOOD_P + "\n" + '{"id": "p2", "text": "x", "extra": 1}\r\n')
    ps = list(iter_corpus(c))
    assert ps == [Passage("p1", "Alpha was born in Beta."), Passage("p2", "x")]
    q = _write(tmp_path, "q.jsonl", GOOD_Q + "\n" + '{"id": "q2", "prompt": "p", "target": " x"}')  # no final newline
    qs = read_queries(q, corpus_ids={"p1", "p2"})
    assert qs[0].relevant_ids == ["p1"] and qs[1].relevant_ids is None
    # unchecked when no corpus ids are given
    q2 = _write(tmp_path, "q2.jsonl", GOOD_Q.replace('"p1"', '"p77"') + "\n")
    assert read_queries(q2)[0].relevant_ids == ["p77"]
    assert count_lines(c) == 2 and count_lines(q) == 2


def test_iter_corpus_streams(tmp_path):
    # the error on line 3 is raised only after the first two passages were yielded
    path = _write(tmp_path, "c.jsonl", GOOD_P + "\n" + GOOD_P.replace("p1", "p2") + "\n" + "oops\n")
    it = iter_corpus(path)
    assert next(it).id == "p1" and next(it).id == "p2"
    with pytest.raises(InputError, match=r"c\.jsonl:3"):
        next(it)


def test_write_jsonl_atomic_roundtrip(tmp_path):
    out = tmp_path / "sub" / "out.jsonl"
    n = write_jsonl(out, [{"id": "a", "text": "é ü"}, Passage("b", "two")])
    assert n == 2
    assert [p.text for p in iter_corpus(out)] == ["é ü", "two"]

    def bad():
        yield {"id": "c", "text": "x"}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(out, bad())
    # the old file is intact and no temp file is left behind
    assert [p.id for p in iter_corpus(out)] == ["a", "b"]
    assert sorted(os.listdir(out.parent)) == ["out.jsonl"]


def _entity_of(prompt):
    import re

    for r in RELATIONS:
        pat = re.escape("Q: " + r.query_question + " A:").replace(re.escape("{e}"), "(\\w+)")
        m = re.fullmatch(pat, prompt)
        if m:
            return m.group(1)
    raise AssertionError(f"no held-out template matches {prompt!r}")


def test_fact_world_deterministic_and_consistent(tmp_path):
    cfg = FactWorldConfig(seed=3, entities=30, relations=4, paraphrases=3, distractors_per_entity=2, contradicted=0.0,
                          digests=0.0, query_wording="held_out")
    p1, q1, s1 = generate_fact_world(cfg)
    p2, q2, s2 = generate_fact_world(cfg)
    assert p1 == p2 and q1 == q2 and s1 == s2
    p3, _, _ = generate_fact_world(FactWorldConfig(seed=4, entities=30, contradicted=0.0, digests=0.0, query_wording="held_out"))
    assert [p.text for p in p3] != [p.text for p in p1]

    n_qa = round(0.5 * 30)
    assert s1["passages"] == len(p1) == 30 * 4 * 3 + n_qa * 4 + 30 * 2 + 30 * 2  # statements, Q/A, distractors, confusers
    assert s1["confuser_passages"] == 60 and s1["near_miss_entities"] == 9
    assert s1["queries"] == len(q1) == (30 - n_qa) * 4
    assert len({p.id for p in p1}) == len(p1) and all(p.id.startswith("p") and len(p.id) == 7 for p in p1)
    assert len({q.id for q in q1}) == len(q1) and all(q.id.startswith("q") and len(q.id) == 6 for q in q1)

    by_id = {p.id: p.text for p in p1}
    train_questions = [p.text for p in p1 if p.text.startswith("Q: ")]
    assert len(train_questions) == n_qa * 4
    held_out = [r.query_question.split("{e}")[0] for r in RELATIONS[:4]]
    train_q = [r.train_question.split("{e}")[0] for r in RELATIONS[:4]]
    assert not set(held_out) & set(train_q)
    for q in q1:
        assert q.target.startswith(" ") and not q.prompt.endswith(" ")
        assert q.target.strip() not in q.prompt
        # held-out wording: no training passage starts with the query's question
        assert not any(t.startswith(q.prompt[: q.prompt.index("?")]) for t in train_questions)
        assert len(q.relevant_ids) == 3
        entity = _entity_of(q.prompt)
        for rid in q.relevant_ids:
            assert q.target.strip() in by_id[rid] and entity in by_id[rid]
            assert not by_id[rid].startswith("Q: ")
        # the entity of a query never appears in a question-form training passage
        assert not any(f" {entity} " in t or f" {entity}?" in t for t in train_questions)

    # the files written through write_jsonl validate
    write_jsonl(tmp_path / "corpus.jsonl", ({"id": p.id, "text": p.text} for p in p1))
    write_jsonl(tmp_path / "queries.jsonl", (query_record(q) for q in q1))
    ids = {p.id for p in iter_corpus(tmp_path / "corpus.jsonl")}
    assert read_queries(tmp_path / "queries.jsonl", ids) == q1
    for line in (tmp_path / "queries.jsonl").read_text().splitlines():
        assert set(json.loads(line)) == {"id", "prompt", "target", "relevant_ids", "entity"}


def test_fact_world_training_wording_asks_the_qa_question_about_entities_without_one():
    """query_wording=training: each query is the training Q/A question of its relation, about an entity that has
    no Q/A passage; the corpus and everything but the prompts equal the held-out world's."""
    base = dict(seed=3, entities=30, contradicted=1.0)
    p_h, q_h, _ = generate_fact_world(FactWorldConfig(**base, query_wording="held_out"))
    p_t, q_t, _ = generate_fact_world(FactWorldConfig(**base, query_wording="training"))
    assert p_t == p_h
    assert [(q.id, q.target, q.relevant_ids, q.entity) for q in q_t] == [(q.id, q.target, q.relevant_ids, q.entity)
                                                                        for q in q_h]
    texts = [p.text for p in p_t]
    for q in q_t:
        asked = [r for r in RELATIONS[:4] if q.prompt == f"Q: {r.train_question.format(e=q.entity)} A:"]
        assert len(asked) == 1, q.prompt
        assert not any(t.startswith(q.prompt) for t in texts)  # no Q/A passage about this entity
    with pytest.raises(ValueError, match="query_wording"):
        generate_fact_world(FactWorldConfig(query_wording="formal"))


def test_fact_world_rejects_bad_sizes():
    with pytest.raises(ValueError):
        generate_fact_world(FactWorldConfig(relations=99, contradicted=0.0, query_wording="held_out"))
    with pytest.raises(ValueError):
        generate_fact_world(FactWorldConfig(paraphrases=0, contradicted=0.0, query_wording="held_out"))
    with pytest.raises(ValueError):
        generate_fact_world(FactWorldConfig(question_fraction=1.0, contradicted=0.0, query_wording="held_out"))


def test_query_dataclass_default():
    assert Query("q", "p", " t").relevant_ids is None


def test_fact_world_lexical_realism():
    """Relevant passages are not the only ones naming the entity and the value: confusers name the
    entity, the query's words and (half the time) the entity's own value without stating the fact,
    and near-miss entity names share their leading characters with another entity's."""
    import re

    passages, queries, stats = generate_fact_world(FactWorldConfig(seed=0, entities=60, contradicted=0.0, query_wording="held_out"))
    by_id = {p.id: p.text for p in passages}
    relevant = {r for q in queries for r in q.relevant_ids}
    confusers = [t for t in by_id.values() if t.startswith("The ") and " of " in t and
                 any(f" a {w} of " in t for w in ("sister", "brother", "cousin", "neighbour", "colleague", "friend"))]
    assert len(confusers) == stats["confuser_passages"] == 120
    n_true = 0
    for q in queries:
        entity, value = _entity_of(q.prompt), q.target.strip()
        words = set(re.findall(r"\w+", q.prompt.lower())) - {"q", "a", "in", "was", "is", "by", "did", "does", "which"}
        words.discard(entity.lower())
        for t in by_id.values():
            if re.search(rf"\b{entity}\b", t) and value in t and t not in {by_id[r] for r in q.relevant_ids}:
                # a non-relevant passage naming both: a confuser about someone else, with the query's words
                assert t in confusers and t.index(value) < t.index(entity)
                assert words <= set(re.findall(r"\w+", t.lower()))
                n_true += 1
    assert 0.15 * len(queries) < n_true < 0.5 * len(queries)
    # no confuser is ever a relevant passage, and every relevant passage states entity and value
    assert not relevant & {i for i, t in by_id.items() if t in confusers}

    def near_pairs(world):  # pairs of entity names (every entity is named by its distractors) sharing 3+ leading chars
        names = {t.split()[0] for t in (p.text for p in world[0]) if t.split()[0] not in ("The", "Q:", "A", "Many",
                 "Friends", "Last", "Records", "Every", "Years", "In", "These", "As")}
        names = sorted(n for n in names if n[0].isupper())
        return sum(1 for i, a in enumerate(names) for b in names[i + 1:] if a[:3] == b[:3] and len(a) >= 4)

    plain = generate_fact_world(FactWorldConfig(seed=0, entities=60, near_miss_fraction=0.0, contradicted=0.0, query_wording="held_out"))
    assert near_pairs((passages, queries)) >= near_pairs(plain) + 0.2 * 60


def test_fact_world_contradictions_repeat_a_statement_with_another_value():
    """`contradicted` adds, for that share of facts, one of the fact's own statements word for word with another
    value of the same relation; queries and their relevant ids are those of the world without it."""
    plain_p, plain_q, _ = generate_fact_world(FactWorldConfig(seed=1, entities=20, contradicted=0.0, digests=0.0, query_wording="held_out"))
    passages, queries, stats = generate_fact_world(FactWorldConfig(seed=1, entities=20, contradicted=1.0, digests=0.0, query_wording="held_out"))
    assert stats["contradiction_passages"] == stats["facts"] == 80
    assert len(passages) == len(plain_p) + 80
    extra = sorted(p.text for p in passages)
    for t in (p.text for p in plain_p):
        extra.remove(t)
    by_id = {p.id: p.text for p in passages}
    for q in queries:
        value = q.target.strip()
        statements = [by_id[r] for r in q.relevant_ids]
        # the fact's one contradiction: a relevant statement with its value swapped for another
        rival = [t for t in extra for s in statements if t != s and t == s[: s.rindex(value)] + t[s.rindex(value):]
                 and t.endswith(".") and value not in t]
        assert len(rival) == 1, (q, rival)
    assert [(q.prompt, q.target) for q in queries] == [(q.prompt, q.target) for q in plain_q]
    half = generate_fact_world(FactWorldConfig(seed=1, entities=20, contradicted=0.5))[2]
    assert 20 < half["contradiction_passages"] < 60
    with pytest.raises(ValueError, match="contradicted"):
        generate_fact_world(FactWorldConfig(contradicted=1.5))


def test_fact_world_digests_join_two_true_facts_of_question_trained_entities():
    """`digests` adds that share of two-statement passages, each a true fact of an entity that has Q/A passages (so
    of no queried entity); the queries, their relevant passages and every other passage are those without it."""
    cfg = dict(seed=3, entities=30, query_wording="held_out")
    plain_p, plain_q, plain_s = generate_fact_world(FactWorldConfig(**cfg, digests=0.0))
    passages, queries, stats = generate_fact_world(FactWorldConfig(**cfg, digests=0.1))
    assert stats["digest_passages"] == round(0.1 * len(plain_p)) and plain_s["digest_passages"] == 0
    extra = sorted(p.text for p in passages)
    for t in (p.text for p in plain_p):
        extra.remove(t)
    assert len(extra) == stats["digest_passages"]
    qa = {p.text for p in plain_p if p.text.startswith("Q:")}
    queried, entities = {q.entity for q in plain_q}, world_names(FactWorldConfig(**cfg)).entities
    for t in extra:
        halves = [h.strip() + "." for h in t.split(".")[:-1]]
        assert len(halves) == 2 and " ".join(halves) == t, t
        for h in halves:  # a statement template filled with an entity's true value, known from its Q/A passage
            fills = [(m["e"], r, m["v"]) for r in RELATIONS for tpl in r.statements
                     if (m := re.fullmatch(re.escape(tpl.format(e="ENTITY", v="VALUE"))
                                           .replace("ENTITY", r"(?P<e>\w+)").replace("VALUE", r"(?P<v>\w+)"), h))
                     and m["e"] in entities]
            assert len(fills) == 1, (h, fills)
            e, r, v = fills[0]
            assert e not in queried and f"Q: {r.train_question.format(e=e)} A: {v}." in qa, h
    by_id = {p.id: p.text for p in passages}
    plain_by_id = {p.id: p.text for p in plain_p}
    assert [(q.prompt, q.target, sorted(by_id[r] for r in q.relevant_ids)) for q in queries] == \
        [(q.prompt, q.target, sorted(plain_by_id[r] for r in q.relevant_ids)) for q in plain_q]
    with pytest.raises(ValueError, match="digests"):
        generate_fact_world(FactWorldConfig(digests=1.5))


def test_id_set_against_a_python_set_across_flushes():
    """IdSet (hashes, flushed into a sorted array every `buffer` ids) answers as a set of the strings does."""
    ids = IdSet(buffer=7)
    ref: set[str] = set()
    for i in range(100):
        pid = f"p{i % 60}"  # ids 60..99 repeat 0..39
        assert ids.add(pid) == (pid not in ref)
        ref.add(pid)
    assert len(ids) == len(ref) == 60
    assert all(f"p{i}" in ids for i in range(60)) and "p60" not in ids and 3 not in ids


def test_hash_collision_is_not_a_duplicate_but_a_repeat_is(tmp_path, monkeypatch):
    """Every id hashing alike: distinct ids still pass (confirmed on the ids), a real repeat names its first line."""
    monkeypatch.setattr(IdSet, "_hash", staticmethod(lambda pid: 1))
    lines = [json.dumps({"id": f"p{i}", "text": "t"}) for i in range(5)]
    a = _write(tmp_path, "a.jsonl", "\n".join(lines) + "\n")
    assert [x.id for x in iter_corpus(a)] == [f"p{i}" for i in range(5)]
    b = _write(tmp_path, "b.jsonl", json.dumps({"id": "p9", "text": "t"}) + "\n" + lines[3] + "\n")
    with pytest.raises(InputError) as ei:
        list(iter_corpus([a, b]))
    _expect(ei.value, b, 2, "id")
    assert f"first on {a}:4" in str(ei.value)
