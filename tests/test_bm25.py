"""BM25 baseline against an independent, straightforward Lucene BM25 in plain Python."""

from __future__ import annotations

import math
import re

import pytest

from trackstar.retrieval.bm25 import bm25_search, bm25_stream

# Tokenization is bm25s' documented convention (lower-case, \w\w+ words, its English stopword
# list); the test checks scoring and ranking, so it reuses the stopword list.
from bm25s.stopwords import STOPWORDS_EN

CORPUS = [
    ("p0", "The capital of Veloria is Ostrand."),
    ("p1", "Ostrand is the largest city of Veloria, and Veloria borders Marnia."),
    ("p2", "Ilsa Brandt was born in Ostrand."),
    ("p3", "Marnia's capital is Kessel; Kessel is a port city on the coast."),
    ("p4", "The founder of Quillon Works was Ilsa Brandt."),
    ("p5", "Ilsa Brandt worked for Quillon Works in Kessel for ten years."),
    ("p6", "Veloria"),
    ("p7", "the of and is a"),  # only stopwords: length 0
    ("p8", "Ostrand is the largest city of Veloria, and Veloria borders Marnia."),  # duplicate of p1
]
QUERIES = [
    ("q0", "The capital of Veloria is Ostrand"),
    ("q1", "Who founded Quillon Works? Ilsa Brandt"),
    ("q2", "Kessel Kessel port"),  # repeated query term counts twice
    ("q3", "largest city Veloria"),  # p1 and p8 tie
    ("q4", "zzz unknown words"),  # nothing matches: all zero, corpus order
]


def tok(text: str) -> list[str]:
    stop = set(STOPWORDS_EN)
    return [w for w in re.findall(r"(?u)\b\w\w+\b", text.lower()) if w not in stop]


def lucene_bm25(corpus, query, k1, b):
    docs = [tok(t) for _, t in corpus]
    n = len(docs)
    avgdl = sum(len(d) for d in docs) / n
    scores = []
    for d in docs:
        s = 0.0
        for q in tok(query):
            df = sum(1 for dd in docs if q in dd)
            if df == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = d.count(q)
            if tf == 0:
                continue  # absent term contributes nothing (also avoids 0/0 for an empty doc with b=1)
            s += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
        scores.append(s)
    return scores


def reference_top_k(corpus, query, k, k1, b):
    s = lucene_bm25(corpus, query, k1, b)
    order = sorted(range(len(corpus)), key=lambda i: (-s[i], i))[:k]
    return [corpus[i][0] for i in order], [s[i] for i in order]


@pytest.mark.parametrize("k1,b", [(1.5, 0.75), (0.9, 0.4), (1.2, 1.0), (2.0, 0.0)])
def test_matches_reference_lucene_bm25(k1, b):
    got = bm25_search(CORPUS, QUERIES, k=5, k1=k1, b=b)
    assert len(got) == len(QUERIES)
    for (qid, q), (ids, scores) in zip(QUERIES, got):
        ref_ids, ref_scores = reference_top_k(CORPUS, q, 5, k1, b)
        assert ids == ref_ids, qid
        assert scores == pytest.approx(ref_scores, rel=1e-5, abs=1e-6), qid
        assert all(isinstance(s, float) for s in scores)


def test_hand_values_and_ties():
    (ids0, s0), _, (ids2, s2), (ids3, s3), (ids4, s4) = bm25_search(CORPUS, QUERIES, k=3)
    assert ids0[0] == "p0"
    # repeated query term: score doubles relative to the single-term query
    (ids_single, s_single), = bm25_search(CORPUS, [("x", "Kessel")], k=3)
    (ids_double, s_double), = bm25_search(CORPUS, [("x", "Kessel Kessel")], k=3)
    assert ids_single == ids_double
    assert s_double == pytest.approx([2 * s for s in s_single], rel=1e-6)
    # exact tie between duplicate passages p1 and p8: corpus order
    assert ids3[:2] == ["p1", "p8"] and s3[0] == s3[1]
    # no match at all: zeros, in corpus order
    assert ids4 == ["p0", "p1", "p2"] and s4 == [0.0, 0.0, 0.0]


def test_single_term_hand_computed():
    corpus = [("a", "apple banana"), ("b", "apple apple cherry date"), ("c", "cherry")]
    # N=3, df(apple)=2 -> idf = ln(1 + 1.5/2.5); avgdl = (2+4+1)/3
    idf = math.log(1 + 1.5 / 2.5)
    avgdl = 7 / 3
    k1, b = 1.2, 0.75
    sa = idf * 1 / (1 + k1 * (1 - b + b * 2 / avgdl))
    sb = idf * 2 / (2 + k1 * (1 - b + b * 4 / avgdl))
    (ids, scores), = bm25_search(corpus, [("q", "apple")], k=2, k1=k1, b=b)
    assert ids == (["b", "a"] if sb > sa else ["a", "b"])
    assert sorted(scores, reverse=True) == pytest.approx(sorted([sa, sb], reverse=True), rel=1e-6)


def test_k_larger_than_corpus_and_stopword_query():
    got = bm25_search(CORPUS, [("q", "the of and")], k=50)
    ids, scores = got[0]
    assert ids == [p for p, _ in CORPUS]
    assert scores == [0.0] * len(CORPUS)


def test_streams_passages_once():
    consumed = []

    def gen():
        for pid, text in CORPUS:
            consumed.append(pid)
            yield pid, text

    got = bm25_search(gen(), QUERIES[:1], k=2)
    assert consumed == [p for p, _ in CORPUS]
    assert got[0][0][0] == "p0"


def test_bad_arguments():
    with pytest.raises(ValueError, match="duplicate passage id"):
        bm25_search([("a", "x y"), ("a", "z w")], [("q", "x")], k=1)
    with pytest.raises(ValueError, match="empty corpus"):
        bm25_search([], [("q", "x")], k=1)
    with pytest.raises(ValueError, match="method"):
        bm25_search(CORPUS, [("q", "x")], k=1, method="bm26")
    with pytest.raises(ValueError, match="k must be"):
        bm25_search(CORPUS, [("q", "x")], k=0)


def test_deterministic():
    a = bm25_search(CORPUS, QUERIES, k=9)
    b = bm25_search(iter(CORPUS), iter(QUERIES), k=9)
    assert a == b


def test_top_k_selection_stable_under_ties():
    import numpy as np

    from trackstar.retrieval.bm25 import _top_k_stable

    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 60))
        s = rng.choice([0.0, 0.5, 1.0, 2.0, -1.0], size=n) * rng.choice([1, 0], size=n)
        k = int(rng.integers(1, 70))
        ref = sorted(range(n), key=lambda i: (-s[i], i))[:k]
        assert list(_top_k_stable(s, k)) == ref


@pytest.mark.parametrize("k1,b,k", [(1.5, 0.75, 5), (0.9, 0.4, 9), (1.2, 1.0, 3), (2.0, 0.0, 20)])
def test_streamed_bm25_gives_bm25s_ids_and_scores_exactly(k1, b, k):
    """bm25_stream (two passes, batches of 2 so that merging across batches is exercised) against bm25s."""
    want = bm25_search(CORPUS, QUERIES, k=k, k1=k1, b=b)
    got = bm25_stream(lambda: iter(CORPUS), QUERIES, k=k, k1=k1, b=b, batch=2)
    assert got == want


def test_streamed_bm25_on_a_generated_world_equals_bm25s():
    """Thousands of passages, hundreds of queries, many tied scores: the same ids and bit-equal scores."""
    from trackstar.data.world import FactWorldConfig, generate_fact_world

    passages, queries, _ = generate_fact_world(FactWorldConfig(seed=3, entities=60))
    corpus = [(p.id, p.text) for p in passages]
    qs = [(q.id, q.prompt + q.target) for q in queries]
    want = bm25_search(corpus, qs, k=50)
    got = bm25_stream(lambda: iter(corpus), qs, k=50, batch=333)
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[1] for g in got] == [w[1] for w in want]
