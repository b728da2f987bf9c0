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

Two ways to run it, one scoring: :class:`BM25Index` (bm25s) holds the whole corpus's sparse
matrix and answers any query later (the trace CLI, the server); :func:`bm25_stream` (the
`bm25` stage, whose queries are known up front) streams the corpus twice and keeps only
the queries' terms, so its memory does not grow with N. It repeats bm25s' tokenization
and float32 arithmetic step for step, so both give the same ids and the same scores.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Iterable, Sequence

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


_WORDS = re.compile(r"(?u)\b\w\w+\b").findall  # bm25s' default splitter


def _tokenizer() -> Callable[[str], list[str]]:
    """bm25s' Tokenizer(lower=True, stopwords="en", stemmer=None) as words: lower-case, \\w\\w+, no stopwords."""
    from bm25s.stopwords import STOPWORDS_EN

    stop = frozenset(STOPWORDS_EN)
    return lambda text: [w for w in _WORDS(text.lower()) if w not in stop]


def bm25_stream(passages: Callable[[], Iterable[tuple[str, str]]], queries: Sequence[tuple[str, str]], k: int,
                k1: float = 1.5, b: float = 0.75, batch: int = 8192) -> list[tuple[list[str], list[float]]]:
    """Lucene BM25 top-k of every query, as :func:`bm25_search` gives them (same ids, same scores), in two
    streaming passes over ``passages()`` (called twice): document frequencies of the queries' terms and
    the mean length, then scores `batch` passages at a time merged into a running top-k per query.
    Memory: the queries' terms, one batch and Q × k hits; nothing per passage of the corpus."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k1 < 0:
        raise ValueError(f"k1 must be >= 0, got {k1}")
    if not 0.0 <= b <= 1.0:
        raise ValueError(f"b must be in [0, 1], got {b}")
    tokens = _tokenizer()
    q_terms = [tokens(text) for _, text in queries]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(t for ts in q_terms for t in ts))}
    df = np.zeros(len(vocab), dtype=np.int64)
    n_docs = total_len = 0
    for _, text in passages():
        words = tokens(text)
        n_docs += 1
        total_len += len(words)
        for t in set(words).intersection(vocab):
            df[vocab[t]] += 1
    if n_docs == 0:
        raise ValueError("empty corpus")
    avgdl = np.float64(total_len) / n_docs  # as np.mean of the lengths: one float64 division of an exact sum
    idf = np.zeros(len(vocab), dtype=np.float32)
    for i in np.flatnonzero(df):
        idf[i] = math.log(1 + (n_docs - int(df[i]) + 0.5) / (int(df[i]) + 0.5))
    q_ids = [np.array([vocab[t] for t in ts], dtype=np.int64) for ts in q_terms]
    k = min(k, n_docs)
    top = [_Top() for _ in queries]
    start = 0
    for ids, texts in _batches(passages(), batch):
        weights = _batch_weights([tokens(t) for t in texts], vocab, idf, avgdl, k1, b)
        for qi, terms in enumerate(q_ids):
            scores = np.zeros(len(ids), dtype=np.float32)
            for t in terms:  # bm25s adds one query term's column after another, in float32
                rows, w = weights.get(int(t), _NONE)
                scores[rows] += w
            top[qi].merge(scores, start, ids, k)
        start += len(ids)
    out = []
    for t in top:
        rows, ids, scores = t.result()
        if len(rows) < k:  # fewer than k passages share a word: the rest score 0, in corpus order
            ids, scores = _fill_zeros(passages(), rows, ids, scores, k)
        out.append((ids, [float(s) for s in scores]))
    return out


_NONE = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32))


def _batches(items: Iterable[tuple[str, str]], size: int):
    ids: list[str] = []
    texts: list[str] = []
    for pid, text in items:
        ids.append(str(pid))
        texts.append(text)
        if len(ids) == size:
            yield ids, texts
            ids, texts = [], []
    if ids:
        yield ids, texts


def _batch_weights(docs: list[list[str]], vocab: dict[str, int], idf: np.ndarray, avgdl: np.float64, k1: float,
                   b: float) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """term -> (rows in the batch, float32 BM25 weights) for the queries' terms, each weight computed as bm25s
    computes its index: float32(idf * tf / (k1 * ((1 - b) + b * |D| / avgdl) + tf)) with tf float32, the
    rest float64."""
    rows: dict[int, list[int]] = {}
    tfs: dict[int, list[int]] = {}
    lengths = np.array([len(d) for d in docs], dtype=np.float64)
    for r, words in enumerate(docs):
        for t, n in Counter(w for w in words if w in vocab).items():
            rows.setdefault(vocab[t], []).append(r)
            tfs.setdefault(vocab[t], []).append(n)
    out = {}
    for t, rs in rows.items():
        r = np.array(rs, dtype=np.int64)
        tf = np.array(tfs[t], dtype=np.float32)
        denom = k1 * ((1 - b) + b * lengths[r] / avgdl)
        out[t] = (r, (idf[t].astype(np.float64) * (tf / (denom + tf))).astype(np.float32))
    return out


class _Top:
    """A query's k best (score, row) so far, ties to the earlier row; only positive scores enter."""

    def __init__(self) -> None:
        self.scores = np.empty(0, dtype=np.float32)
        self.rows = np.empty(0, dtype=np.int64)
        self.ids: list[str] = []

    def merge(self, scores: np.ndarray, start: int, ids: list[str], k: int) -> None:
        cand = np.flatnonzero(scores > 0)
        if len(self.rows) == k and len(cand):
            cand = cand[scores[cand] > self.scores[-1]]  # a tie with the k-th loses to the earlier row
        if not len(cand):
            return
        s = np.concatenate([self.scores, scores[cand]])
        r = np.concatenate([self.rows, cand + start])
        order = np.lexsort((r, -s.astype(np.float64)))[:k]
        by_row = dict(zip(self.rows.tolist(), self.ids))
        self.scores, self.rows = s[order], r[order]
        self.ids = [by_row[int(x)] if int(x) in by_row else ids[int(x) - start] for x in self.rows]

    def result(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        return self.rows, self.ids, self.scores.astype(np.float64)


def _fill_zeros(passages: Iterable[tuple[str, str]], rows: np.ndarray, ids: list[str], scores: np.ndarray,
                k: int) -> tuple[list[str], np.ndarray]:
    """The hits, then the first passages in corpus order that are not hits (score 0) up to k."""
    taken = set(rows.tolist())
    extra = []
    for r, (pid, _) in enumerate(passages):
        if len(ids) + len(extra) == k:
            break
        if r not in taken:
            extra.append(str(pid))
    return ids + extra, np.concatenate([scores, np.zeros(len(extra))])
