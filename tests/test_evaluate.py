"""Attribution metrics against hand-computed values; random control; offline PNG plot."""

from __future__ import annotations

import math
import os

import pytest

from trackstar.evaluation.metrics import (
    align_rankings,
    attribution_metrics,
    metrics_table,
    mrr,
    plot_methods,
    random_ranking,
    recall_at_k,
)

RANKED = [
    ["a", "b", "c"],  # first relevant "b" at rank 2 -> 1/2
    ["x", "y", "z"],  # relevant absent -> 0
    ["r", "s", "t"],  # relevant at rank 1 and 3: only the FIRST counts -> 1
    ["m", "n", "o"],  # no ground truth (None) -> skipped
    ["u", "v", "w"],  # empty set -> skipped
    ["d", "e", "f", "g", "h", "i", "j", "k", "l", "p", "q"],  # relevant at rank 11 -> 1/11
]
RELEVANT = [{"b"}, {"nope"}, {"t", "r"}, None, set(), ["q"]]


def test_mrr_hand_computed():
    assert mrr(RANKED, RELEVANT) == pytest.approx((0.5 + 0 + 1 + 1 / 11) / 4)
    assert mrr([["a", "b", "c", "d"]], [{"d"}]) == pytest.approx(0.25)
    assert math.isnan(mrr([["a"]], [None]))


def test_recall_hand_computed():
    assert recall_at_k(RANKED, RELEVANT, 1) == pytest.approx(1 / 4)  # only query 3
    assert recall_at_k(RANKED, RELEVANT, 2) == pytest.approx(2 / 4)
    assert recall_at_k(RANKED, RELEVANT, 10) == pytest.approx(2 / 4)  # rank 11 is outside
    assert recall_at_k(RANKED, RELEVANT, 11) == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        recall_at_k(RANKED, RELEVANT, 0)
    with pytest.raises(ValueError, match="rankings"):
        recall_at_k(RANKED[:2], RELEVANT, 1)


def test_attribution_metrics_counts():
    m = attribution_metrics(RANKED, RELEVANT, ks=(1, 10))
    assert m == {"mrr": pytest.approx((0.5 + 1 + 1 / 11) / 4), "recall@1": 0.25, "recall@10": 0.5,
                 "n_queries": 4, "n_skipped": 2}
    with pytest.raises(ValueError, match="no query has relevant"):
        attribution_metrics([["a"]], [set()])


def test_metrics_table_aligns_by_id():
    rel = {"q0": {"a"}, "q1": {"z"}, "q2": None}
    rankings = {"q2": ["a"], "q1": ["y", "z"], "q0": ["a", "b"]}  # any order
    t = metrics_table({"bm25": rankings, "random": {"q0": ["b"], "q1": ["y"], "q2": []}}, rel)
    assert t["bm25"] == {"mrr": pytest.approx(0.75), "recall@10": 1.0, "n_queries": 2, "n_skipped": 1}
    assert t["random"]["mrr"] == 0.0 and t["random"]["recall@10"] == 0.0
    with pytest.raises(ValueError, match="bm25: no ranking for 1 queries"):
        metrics_table({"bm25": {"q0": ["a"], "q1": ["z"]}}, rel)
    with pytest.raises(ValueError, match="unknown queries"):
        align_rankings({**rankings, "q9": []}, rel)


def test_random_ranking_seeded_and_distinct():
    ids = [f"p{i}" for i in range(50)]
    a = random_ranking(ids, n_queries=20, k=10, seed=7)
    assert a == random_ranking(ids, n_queries=20, k=10, seed=7)
    assert a != random_ranking(ids, n_queries=20, k=10, seed=8)
    assert len(a) == 20 and all(len(r) == 10 and len(set(r)) == 10 for r in a)
    assert all(p in ids for r in a for p in r)
    assert random_ranking(ids, n_queries=5, k=10, seed=7) == a[:5]  # per-query streams
    assert len(set(map(tuple, a))) == 20
    small = random_ranking(["x", "y", "z"], n_queries=2, k=10, seed=0)
    assert all(sorted(r) == ["x", "y", "z"] for r in small)
    # chance level: MRR of random top-10 lists for one relevant passage out of 50 is small
    many = random_ranking(ids, n_queries=400, k=10, seed=1)
    assert recall_at_k(many, [{"p0"}] * 400, 10) == pytest.approx(10 / 50, abs=0.06)


def test_plot_methods_png(tmp_path):
    metrics = {"trackstar": {"mrr": 0.49, "recall@10": 0.58, "tail_patch": 0.04, "n_queries": 200},
               "bm25": {"mrr": 0.78, "recall@10": 0.88, "tail_patch": -0.01, "n_queries": 200},
               "random": {"mrr": 0.008, "recall@10": float("nan")}}
    out = tmp_path / "plots" / "methods.png"
    plot_methods(metrics, out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert os.listdir(out.parent) == ["methods.png"]
    plot_methods(metrics, out)
    assert out.read_bytes() == data  # deterministic bytes
    with pytest.raises(ValueError):
        plot_methods({"m": {"n_queries": 3}}, tmp_path / "x.png")


def test_dev_test_split_groups_entities_and_scores_each_side():
    from trackstar.data.records import Query
    from trackstar.evaluation.metrics import dev_test_split, split_metrics

    queries = [Query(f"q{i}", "p", " t", [f"r{i}"], entity=f"E{i // 4}") for i in range(400)]
    side = dev_test_split(queries, 0.5)
    assert set(side.values()) == {"dev", "test"}
    for e in range(100):  # an entity's four queries share a side
        assert len({side[f"q{4 * e + j}"] for j in range(4)}) == 1
    assert 120 <= sum(v == "dev" for v in side.values()) <= 280
    assert dev_test_split(queries[::-1], 0.5) == side  # order-free
    assert set(dev_test_split(queries, 0.0).values()) == {"test"}
    assert set(dev_test_split(queries, 1.0).values()) == {"dev"}
    with pytest.raises(ValueError, match="dev_fraction"):
        dev_test_split(queries, 1.5)

    relevant = {q.id: set(q.relevant_ids) for q in queries}
    # "hit": relevant passage at rank 1 on dev, rank 2 on test; "miss": never
    ranked = {"hit": {q.id: ([f"r{q.id[1:]}", "x"] if side[q.id] == "dev" else ["x", f"r{q.id[1:]}"]) for q in queries},
              "miss": {q.id: ["x"] for q in queries}}
    correct = {q.id: side[q.id] == "test" for q in queries}
    out = split_metrics(ranked, relevant, side, correct)
    n_dev = sum(v == "dev" for v in side.values())
    assert out["dev"]["queries"] == n_dev and out["test"]["queries"] == 400 - n_dev
    assert out["dev"]["hit"] == {"mrr": 1.0, "recall@10": 1.0} and out["test"]["hit"] == {"mrr": 0.5, "recall@10": 1.0}
    assert out["dev"]["miss"]["mrr"] == out["test"]["miss"]["mrr"] == 0.0
    assert out["dev"]["accuracy"] == 0.0 and out["test"]["accuracy"] == 1.0
