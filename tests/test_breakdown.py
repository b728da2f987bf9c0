"""The Fig. 3 breakdown (relevant / entity and target / one of them / neither), queries' optional entity,
and per-query greedy predictions."""

from __future__ import annotations

import json
import math

import pytest

from tests.test_train import world  # noqa: F401 (fixture)
from tests.tiny import oracle_cases
from trackstar.evaluation.breakdown import CATEGORIES, classify, mentions, method_breakdown, query_breakdown
from trackstar.data.records import Query, query_record, read_queries
from trackstar.data.world import FactWorldConfig, generate_fact_world
from trackstar.errors import InputError
from trackstar.evaluation.predict import predict
from trackstar.model.train import accuracy


def test_mentions_match_whole_words_case_insensitively():
    assert mentions("Zapoudro was born in Nape.", " Nape")
    assert mentions("zapoudro was born in NAPE", "Nape")
    assert not mentions("Zapoudro was born in Napes.", " Nape")  # no partial words
    assert not mentions("Kanape is far.", "Nape")
    assert mentions("He plays the bass guitar.", " bass guitar")
    assert not mentions("anything", None) and not mentions("anything", "  ")


def test_classify_and_query_breakdown_count_each_category():
    target, entity = " Nape", "Zapoudro"
    assert classify("Zapoudro was born in Nape.", target, entity, relevant=True) == "relevant"
    assert classify("Zapoudro was born in Nape.", target, entity) == "both"
    assert classify("Zapoudro likes tea.", target, entity) == "one"
    assert classify("Kafou lives in Nape.", target, entity) == "one"
    assert classify("Kafou likes tea.", target, entity) == "neither"
    # without an entity only the target counts: never "both"
    assert classify("Zapoudro was born in Nape.", target, None) == "one"
    assert classify("Zapoudro likes tea.", target, None) == "neither"
    texts = ["Zapoudro was born in Nape.", "The birthplace of Zapoudro is Nape.", "Zapoudro likes tea.",
             "Kafou likes tea.", "Kafou lives in Nape."] + ["x"] * 10
    ids = [f"p{i}" for i in range(len(texts))]
    assert query_breakdown(texts, ids, target, entity, ["p0"]) == {"relevant": 1, "both": 1, "one": 2, "neither": 6}
    assert query_breakdown(texts, ids, target, entity, ["p0"], top=3) == {"relevant": 1, "both": 1, "one": 1,
                                                                          "neither": 0}
    assert query_breakdown(texts, ids, target, None, None, top=5) == {"relevant": 0, "both": 0, "one": 3, "neither": 2}


def test_method_breakdown_is_the_mean_share_over_queries():
    got = method_breakdown([{"relevant": 1, "both": 1, "one": 0, "neither": 2},
                            {"relevant": 0, "both": 0, "one": 1, "neither": 0},
                            {"relevant": 0, "both": 0, "one": 0, "neither": 0}])  # no proponents: left out
    want = {"relevant": 0.125, "both": 0.125, "one": 0.5, "neither": 0.25}
    assert got == pytest.approx(want) and list(got) == list(CATEGORIES)
    assert math.isclose(sum(got.values()), 1.0)


def test_generated_queries_carry_their_entity_and_it_round_trips(tmp_path):
    passages, queries, _ = generate_fact_world(FactWorldConfig(entities=12, relations=2, contradicted=0.0, query_wording="held_out"))
    text = {p.id: p.text for p in passages}
    for q in queries:
        assert q.entity and q.entity in q.prompt
        assert all(q.entity in text[r] and q.target.strip() in text[r] for r in q.relevant_ids)
    path = tmp_path / "queries.jsonl"
    path.write_text("".join(json.dumps(query_record(q)) + "\n" for q in queries[:3]))
    assert read_queries(path) == queries[:3]
    path.write_text(json.dumps({"id": "a", "prompt": "p", "target": " t"}) + "\n")  # entity is optional
    assert read_queries(path)[0].entity is None
    path.write_text(json.dumps({"id": "a", "prompt": "p", "target": " t"}) + "\n"
                    + json.dumps({"id": "b", "prompt": "p", "target": " t", "entity": 7}) + "\n")
    with pytest.raises(InputError, match=r"queries.jsonl:2: field 'entity': must be a string, got int"):
        read_queries(path)


def test_predict_greedy_continuation_probability_and_accuracy(world):  # noqa: F811
    _, _, tok = world
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    tt = enc(" Bazzuqix")
    target, cases, model = oracle_cases(tok, wrong_at=len(tt) - 1)
    qs = [Query(str(i), p, target) for i, p in enumerate(cases)]
    got = predict(model, tok, qs, max_length=64, batch_size=2)
    assert [g["id"] for g in got] == ["0", "1", "2"]
    assert [g["prediction"] for g in got] == [tok.decode(b) for b in cases.values()]
    assert [g["correct"] for g in got] == [True, False, False]
    assert sum(g["correct"] for g in got) / 3 == accuracy(model, tok, qs, max_length=64)
    # the oracle's logits are 1 at its belief and 0 elsewhere: p(token) = e / (e + V - 1) if believed, else 1 / (e + V - 1)
    z = math.e + len(tok) - 1
    for g, prompt in zip(got, cases):
        seq, prob = [tok.bos_token_id] + enc(prompt), 1.0
        for t in tt:
            prob *= (math.e if model.beliefs.get(tuple(seq), 0) == t else 1.0) / z
            seq.append(t)
        assert g["target_prob"] == pytest.approx(prob, rel=1e-6)
