"""BM25 baseline for attribution (the paper's strongest model-agnostic baseline), with ``bm25s``.

Tokenization: bm25s' built-in tokenizer (lower-case, words of >= 2 word characters,
regex ``(?u)\\b\\w\\w+\\b``), bm25s' built-in English stopword list, no stemmer (nothing
is downloaded). A passage made only of stopwords has length 0; a query with no
word that occurs in the corpus scores every passage 0.

Scoring (``method="lucene"``, the default; Kamphuis et al. 2020), for query terms q
(repeated query terms count once per occurrence, as in a Lucene boolean query)::

    score(D, Q) = sum_q idf(q) * tf(q, D) / (tf(q, D) + k1 * (1 - b + b * |D| / avgdl))
    idf(q)      = ln(1 + (N - df(q) + 0.5) / (df(q) + 0.5))

(Lucene >= 8 drops the constant factor (k1 + 1), which does not change the ranking.)
Other bm25s variants ("robertson", "atire", "bm25l", "bm25+") are accepted via ``method``.

Ranking: the top k passages by score, ties broken by corpus order (earlier first) —
bm25s' own top-k selection is not stable under ties, so selection is done here from
the full score vector. Exactly min(k, N) ids are returned even when fewer passages
share a word with the query (the rest score 0 and follow in corpus order).

BM25 has no notion of opponents: results built from it carry empty opponent lists, as
in the paper's published BM25 result files.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")


def _top_k_stable(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, highest first, ties in index order."""
    n = scores.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    # Most passages score exactly 0 (no shared word); selecting among the positive ones
    # first avoids np.partition on a mostly-constant array, which is very slow.
    cand = np.flatnonzero(scores > 0)
    if cand.shape[0] < k:
        cand = np.arange(n)  # too few matches: rank everything (zeros follow in corpus order)
    sub = scores[cand]
    if k < cand.shape[0]:
        kth = np.partition(sub, sub.shape[0] - k)[sub.shape[0] - k]  # the k-th largest value
        keep = sub >= kth
        cand, sub = cand[keep], sub[keep]  # still in ascending index order
    order = np.argsort(-sub, kind="stable")
    return cand[order[:k]]


class BM25Index:
    """A BM25 index over passages, built once and searched per query (the stage, the trace CLI, the server)."""

    def __init__(self, passages: Iterable[tuple[str, str]], k1: float = 1.5, b: float = 0.75, method: str = "lucene"):
        """passages: iterable of (passage_id, text); it is consumed once, streaming: only the ids and the
        token-id lists are kept (plus bm25s' sparse score matrix), never a second copy of the texts."""
        import bm25s
        from bm25s.tokenization import Tokenizer

        if k1 < 0:
            raise ValueError(f"k1 must be >= 0, got {k1}")
        if not 0.0 <= b <= 1.0:
            raise ValueError(f"b must be in [0, 1], got {b}")
        if method not in METHODS:
            raise ValueError(f"unknown BM25 method {method!r}; choose from {', '.join(METHODS)}")

        self.ids: list[str] = []
        seen: set[str] = set()

        def texts():
            for pid, text in passages:
                pid = str(pid)
                if pid in seen:
                    raise ValueError(f"duplicate passage id {pid!r}")
                seen.add(pid)
                self.ids.append(pid)
                yield text

        self.tokenizer = Tokenizer(lower=True, stopwords="en", stemmer=None)
        # allow_empty=False: an all-stopword passage gets length 0 instead of bm25s' artificial
        # one-token "" document (which would distort avgdl and match empty queries).
        corpus_tokens = list(self.tokenizer.streaming_tokenize(texts(), update_vocab=True, allow_empty=False))
        seen.clear()
        if not corpus_tokens:
            raise ValueError("empty corpus")
        self.vocab = self.tokenizer.get_vocab_dict()
        self.retriever = bm25s.BM25(k1=k1, b=b, method=method)
        if self.vocab:
            tokenized = bm25s.tokenization.Tokenized(ids=corpus_tokens, vocab=self.vocab)
            self.retriever.index(tokenized, create_empty_token=False, show_progress=False)

    def search(self, text: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores as float64) of the top min(k, N) passages for one query text, ties in corpus order."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q_ids = next(iter(self.tokenizer.streaming_tokenize([text], update_vocab=False, allow_empty=False)))
        if q_ids and self.vocab:
            scores = np.asarray(self.retriever.get_scores_from_ids(q_ids), dtype=np.float64)
        else:
            scores = np.zeros(len(self.ids), dtype=np.float64)
        top = _top_k_stable(scores, k)
        return top, scores[top]


def bm25_search(passages: Iterable[tuple[str, str]], queries: Iterable[tuple[str, str]], k: int, k1: float = 1.5,
                b: float = 0.75, method: str = "lucene") -> list[tuple[list[str], list[float]]]:
    """Top-k passages for each query by BM25 (one :class:`BM25Index`, searched per query).

    queries: iterable of (query_id, query_text).
    Returns, per query in input order, (passage_ids, scores): best first, ties in
    corpus order, min(k, N) entries, scores as Python floats.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    index = BM25Index(passages, k1, b, method)
    out: list[tuple[list[str], list[float]]] = []
    for _qid, qtext in queries:
        rows, scores = index.search(qtext, k)
        out.append(([index.ids[i] for i in rows], [float(s) for s in scores]))
    return out
