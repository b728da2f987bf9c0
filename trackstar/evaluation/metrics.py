"""Attribution metrics (docs/method.md), the seeded random-proponents control, and a metrics plot.

* MRR: mean over queries of 1 / (rank of the FIRST relevant id in the ranked
  proponents), rank 1-based; 0 for a query with no relevant id in its list.
* recall@k: share of queries with at least one relevant id among the top k.

Queries whose relevant set is empty or None have no ground truth and are skipped;
:func:`attribution_metrics` reports how many were evaluated and skipped.
Rankings are truncated lists (top-k proponents): a relevant passage beyond the list
counts as not found, so MRR computed from top-k lists is a lower bound of the
full-ranking MRR (differing by less than 1/(k+1) per query).
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from trackstar.atomic import atomic_open
from trackstar.methods import METHODS as ALL_METHODS

COUNT_KEYS = ("n_queries", "n_skipped")
METHODS = tuple(ALL_METHODS)  # every method the pipeline evaluates, in the order metrics are written


def _pairs(ranked: Sequence[Sequence[str]], relevant: Sequence[Iterable[str] | None]):
    if len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} rankings but {len(relevant)} relevant sets")
    for ids, rel in zip(ranked, relevant):
        if rel is None:
            continue
        rel = rel if isinstance(rel, (set, frozenset)) else set(rel)
        if rel:
            yield ids, rel


def _first_rank(ids: Sequence[str], rel: set) -> int | None:
    for r, pid in enumerate(ids, start=1):
        if pid in rel:
            return r
    return None


def mrr(ranked_ids: Sequence[Sequence[str]], relevant: Sequence[Iterable[str] | None]) -> float:
    """Mean reciprocal rank of the first relevant id; NaN when no query has a relevant set."""
    total, n = 0.0, 0
    for ids, rel in _pairs(ranked_ids, relevant):
        r = _first_rank(ids, rel)
        total += 0.0 if r is None else 1.0 / r
        n += 1
    return total / n if n else math.nan


def recall_at_k(ranked_ids: Sequence[Sequence[str]], relevant: Sequence[Iterable[str] | None], k: int) -> float:
    """Share of queries with >= 1 relevant id in the top k; NaN when no query has a relevant set."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    hits, n = 0, 0
    for ids, rel in _pairs(ranked_ids, relevant):
        hits += any(pid in rel for pid in list(ids)[:k])
        n += 1
    return hits / n if n else math.nan


def attribution_metrics(
    ranked_ids: Sequence[Sequence[str]],
    relevant: Sequence[Iterable[str] | None],
    ks: Sequence[int] = (10,),
) -> dict[str, float | int]:
    """``{"mrr", "recall@k" for k in ks, "n_queries" (evaluated), "n_skipped"}``.

    Raises ValueError when no query has a relevant set (nothing to evaluate), so a
    metrics file never silently holds NaN.
    """
    n_eval = sum(1 for _ in _pairs(ranked_ids, relevant))
    if n_eval == 0:
        raise ValueError("no query has relevant ids: attribution metrics are undefined")
    out: dict[str, float | int] = {"mrr": mrr(ranked_ids, relevant)}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranked_ids, relevant, k)
    out["n_queries"] = n_eval
    out["n_skipped"] = len(ranked_ids) - n_eval
    return out


def align_rankings(
    rankings: Mapping[str, Sequence[str]],
    relevant_by_id: Mapping[str, Iterable[str] | None],
    source: str = "results",
) -> tuple[list[list[str]], list[Iterable[str] | None]]:
    """Pair rankings (by example_id) with relevant sets (by query id), in query order.

    Every query must have a ranking and every ranking a query, else ValueError naming
    the first id that is missing (``source`` names the results in the message).
    """
    missing = [q for q in relevant_by_id if q not in rankings]
    if missing:
        raise ValueError(f"{source}: no ranking for {len(missing)} queries, e.g. {missing[0]!r}")
    unknown = [q for q in rankings if q not in relevant_by_id]
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} rankings for unknown queries, e.g. {unknown[0]!r}")
    qids = list(relevant_by_id)
    return [list(rankings[q]) for q in qids], [relevant_by_id[q] for q in qids]


def metrics_table(
    method_rankings: Mapping[str, Mapping[str, Sequence[str]]],
    relevant_by_id: Mapping[str, Iterable[str] | None],
    ks: Sequence[int] = (10,),
) -> dict[str, dict[str, float | int]]:
    """``{method: {"mrr": .., "recall@10": .., "n_queries": .., "n_skipped": ..}}``.

    method_rankings: method name -> {example_id: ranked proponent ids}, e.g.
    ``{r.example_id: r.proponent_ids for r in read_results(path)}``.
    """
    table = {}
    for method, rankings in method_rankings.items():
        ranked, rel = align_rankings(rankings, relevant_by_id, source=method)
        table[method] = attribution_metrics(ranked, rel, ks)
    return table


def dev_test_split(queries: Sequence[Any], dev_fraction: float) -> dict[str, str]:
    """Query id -> "dev" or "test", by a hash of the query's entity (its id when it has none): all queries
    about one entity fall on one side, and a query's side depends on nothing else (order, count, seed).
    Choose settings on dev, report test: the two sides share no entity, hence no relevant passage."""
    if not 0.0 <= dev_fraction <= 1.0:
        raise ValueError(f"dev_fraction must be in [0, 1], got {dev_fraction}")
    out = {}
    for q in queries:
        key = (getattr(q, "entity", None) or q.id).encode()
        u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
        out[q.id] = "dev" if u < dev_fraction else "test"
    return out


def split_metrics(method_rankings: Mapping[str, Mapping[str, Sequence[str]]],
                  relevant_by_id: Mapping[str, Iterable[str] | None], side: Mapping[str, str],
                  correct: Mapping[str, bool]) -> dict[str, dict[str, Any]]:
    """MRR and recall@10 per method and model accuracy on each side of `dev_test_split`."""
    out: dict[str, dict[str, Any]] = {}
    for name in ("dev", "test"):
        ids = [q for q in relevant_by_id if side[q] == name]
        if not ids:
            continue
        rel = {q: relevant_by_id[q] for q in ids}
        table = metrics_table({m: {q: r[q] for q in ids} for m, r in method_rankings.items()}, rel)
        out[name] = {"queries": len(ids), "accuracy": sum(bool(correct[q]) for q in ids) / len(ids),
                     **{m: {"mrr": v["mrr"], "recall@10": v["recall@10"]} for m, v in table.items()}}
    return out


def random_rows(n: int, n_queries: int, k: int, seed: int) -> list[np.ndarray]:
    """Seeded random proponent rows: for query i, min(k, n) distinct rows of 0..n-1 drawn uniformly.

    Query i uses the generator ``np.random.default_rng([seed, i])``, so its draw does not
    depend on n_queries or on the other queries.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n_queries < 0:
        raise ValueError(f"n_queries must be >= 0, got {n_queries}")
    if n == 0:
        raise ValueError("no passages to draw from")
    kk = min(k, n)
    return [np.random.default_rng([int(seed), i]).choice(n, size=kk, replace=False) for i in range(n_queries)]


def random_ranking(passage_ids: Sequence[str], n_queries: int, k: int, seed: int) -> list[list[str]]:
    """`random_rows` as passage ids (row j is passage_ids[j])."""
    return [[passage_ids[int(j)] for j in idx] for idx in random_rows(len(passage_ids), n_queries, k, seed)]


def plot_methods(metrics: Mapping[str, Mapping[str, Any]], out_png: str | os.PathLike, title: str | None = None) -> None:
    """Grouped bar chart (one group per metric, one bar per method) as a self-contained PNG.

    Count fields (n_queries, n_skipped) and non-numeric/NaN values are left out. Uses
    matplotlib's Agg canvas directly (no pyplot, no display, no network) and writes
    atomically (temp file in the same folder, then os.replace).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(metrics)
    names: list[str] = []
    for m in methods:
        for key, v in metrics[m].items():
            if key in COUNT_KEYS or key in names:
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                names.append(key)
    if not methods or not names:
        raise ValueError("nothing to plot: no method with a numeric metric")

    width = 0.8 / len(methods)
    fig = Figure(figsize=(max(6.0, 1.2 + 0.6 * len(names) * len(methods)), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    for j, m in enumerate(methods):
        vals = []
        for key in names:
            v = metrics[m].get(key)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            vals.append(float(v) if ok else np.nan)
        pos = x - 0.4 + width * (j + 0.5)
        bars = ax.bar(pos, vals, width, label=m)
        for bar, v in zip(bars, vals):
            if math.isfinite(v):
                ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v),
                            ha="center", va="bottom" if v >= 0 else "top", fontsize=7,
                            xytext=(0, 2 if v >= 0 else -2), textcoords="offset points")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.set_ylabel("value")
    ax.set_title(title or "Attribution / influence metrics by method")
    ax.margins(y=0.12)
    ax.legend(fontsize=8, ncols=min(len(methods), 5), loc="upper center",
              bbox_to_anchor=(0.5, -0.08), frameon=False)
    fig.tight_layout()

    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, format="png", metadata={"Software": None})
