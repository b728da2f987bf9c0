"""The static viewer site: ``index.html`` + ``viewer.js`` + ``viewer.css`` + paginated data beside them.

Layout of the output folder::

    index.html  viewer.js  viewer.css         the page (copied from trackstar/viewer/site/)
    data/index.js                            metrics and one summary row per query
    data/page-00000.js, page-00001.js, ...   ``page_size`` queries each: every method's top proponents
                                             and opponents, and the texts of just those passages

Each data file is one JSON document wrapped in a call, ``TRACKSTAR.index({...})`` or
``TRACKSTAR.page(n, {...})``, and loaded with a ``<script>`` tag: browsers refuse ``fetch()`` of
local files, script tags work from ``file://`` and over http alike. Only passages that appear in
some method's top ``top`` hits are written, so the site's size grows with queries x methods x top,
never with the corpus.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from trackstar import layout
from trackstar.atomic import atomic_dir, atomic_open
from trackstar.evaluation.breakdown import TOP, classify
from trackstar.data.records import Query
from trackstar.errors import InputError
from trackstar.methods import LADDER_VIEW, VIEW_ORDER
from trackstar.retrieval.results import QueryResult, iter_results

ASSETS = Path(__file__).parent / "site"
PAGE_SIZE = 25  # queries per data page
# summary row of one query in data/index.js (a list per query, in this order)
FIELDS = ("id", "prompt", "target", "entity", "prediction", "target_prob", "correct", "page", "first")
_CAT = {"relevant": "r", "both": "b", "one": "o", "neither": "n"}


@dataclass
class _Hits:
    """One method's kept hits for one query: (id, score, category code) lists and the first relevant rank."""

    proponents: list[list[Any]] = field(default_factory=list)
    opponents: list[list[Any]] = field(default_factory=list)
    first: int = 0  # 1-based rank of the first relevant proponent in the whole list, 0 if none


@dataclass(frozen=True)
class Pages:
    """How a site is cut: queries per data page, hits kept per method and query, and its title."""

    page_size: int = PAGE_SIZE
    top: int = TOP
    title: str = "TrackStar report"


@dataclass(frozen=True)
class Evaluated:
    """What `evaluate` measured, shown on the overview: predictions by query id, metrics per method
    (metrics/metrics.json) and the tail-patch record (metrics/model.json's `tail_patch`: its lr, whether it
    is `trustworthy` and the `reasons` it is not)."""

    predictions: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    tail_patch: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Collected:
    """What `collect` kept: per-query summaries, hits[query id][method] and the kept passages' texts."""

    summaries: list[dict[str, Any]]
    hits: Mapping[str, Mapping[str, _Hits]]
    texts: Mapping[str, str]


def method_files(retrievals: str | os.PathLike) -> dict[str, Path]:
    """The pipeline's result files in the retrievals folder by method name: trackstar, bm25, then the ladder
    rungs (any other ladder file last)."""
    root = Path(retrievals)
    found = {"trackstar": root / layout.TRACKSTAR.name, "bm25": root / layout.BM25.name}
    found.update({p.stem: p for p in sorted((root / layout.LADDER.name).glob("*.jsonl"))})
    found = {m: p for m, p in found.items() if p.exists()}
    return {m: found[m] for m in sorted(found, key=lambda m: (VIEW_ORDER + (m,)).index(m))}


def _keep(r: QueryResult, q: Query | None, top: int, texts: dict[str, str]) -> _Hits:
    """The first ``top`` proponents and opponents of one record, classified; their texts go into ``texts``."""
    rel = set(q.relevant_ids or ()) if q else set()
    entity = q.entity if q else r.extra.get("entity")
    h = _Hits()
    for rank, pid in enumerate(r.proponent_ids, 1):
        if pid in rel:
            h.first = rank
            break
    for ids, scores, bodies, out in ((r.proponent_ids, r.proponent_scores, r.proponents, h.proponents),
                                     (r.opponent_ids, r.opponent_scores, r.opponents, h.opponents)):
        for pid, score, text in list(zip(ids, scores, bodies))[:top]:
            texts[pid] = text
            out.append([pid, _round(score), _CAT[classify(text, r.targets_plaintext, entity, pid in rel)]])
    return h


def _round(x: float) -> float:
    """Scores to 6 significant digits: the page shows 4, and the data stays small."""
    return float(f"{x:.6g}") if math.isfinite(x) else 0.0


def collect(files: Mapping[str, str | os.PathLike], queries: Sequence[Query] | None, top: int = TOP) -> Collected:
    """Stream every method's results once and keep the top hits: summaries, hits[qid][method], texts.

    Query order is the queries file's when given (each must have a result in every file), else the
    first file's. Memory holds ``top`` hits per query and method, never whole result files.
    """
    by_id = {q.id: q for q in queries} if queries is not None else None
    hits: dict[str, dict[str, _Hits]] = {}
    texts: dict[str, str] = {}
    heads: dict[str, QueryResult] = {}
    for method, path in files.items():
        for r in iter_results(path):
            q = by_id.get(r.example_id) if by_id is not None else None
            if by_id is not None and q is None:
                raise InputError(str(path), f"{r.example_id!r} is not a query of the queries file", field="example_id")
            hits.setdefault(r.example_id, {})[method] = _keep(r, q, top, texts)
            if r.example_id not in heads:
                heads[r.example_id] = QueryResult(r.example_id, r.inputs_plaintext, r.targets_plaintext, [], [], [],
                                                  extra={"entity": r.extra.get("entity")})
    order = [q.id for q in queries] if queries is not None else list(heads)
    for qid in order:
        missing = [m for m in files if m not in hits.get(qid, {})]
        if missing:
            raise InputError(str(files[missing[0]]), f"no result for query {qid!r}")
    summaries = []
    for qid in order:
        q = by_id[qid] if by_id is not None else None
        h = heads[qid]
        summaries.append({"id": qid, "prompt": q.prompt if q else h.inputs_plaintext,
                          "target": q.target if q else h.targets_plaintext,
                          "entity": q.entity if q else h.extra.get("entity"),
                          "relevant": list(q.relevant_ids or []) if q else []})
    return Collected(summaries, hits, texts)


def _jsonp(call: str, obj: Any) -> str:
    """``call(<json>);`` with ``</`` escaped, so the same text is safe inline in an HTML script element."""
    return call.replace("%s", json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
                        .replace("</", "<\\/")) + "\n"


def _finite(x: Any) -> Any:
    """Non-finite floats (a failed measurement) as None, recursively: the data files are strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _tail_patch_note(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The part of the tail-patch record the overview shows next to the tail-patch figures (None: none ran)."""
    if not record:
        return None
    return _finite({k: record.get(k) for k in ("lr", "lr_param", "queries", "trustworthy", "reasons")})


def build_data(kept: Collected, methods: Sequence[str], evaluated: Evaluated = Evaluated(),
               cut: Pages = Pages()) -> Iterable[tuple[str, str]]:
    """Yield (relative path, text) of every data file: data/index.js, then one data/page-N.js per page."""
    summaries, hits, texts = kept.summaries, kept.hits, kept.texts
    page_size, top, title = cut.page_size, cut.top, cut.title
    predictions = evaluated.predictions
    rows = []
    pages: list[list[dict[str, Any]]] = [summaries[i: i + page_size] for i in range(0, len(summaries), page_size)]
    for n, page in enumerate(pages):
        for s in page:
            p = predictions.get(s["id"], {})
            rows.append([s["id"], s["prompt"], s["target"], s["entity"], p.get("prediction"),
                         _round(p["target_prob"]) if "target_prob" in p else None, p.get("correct"), n,
                         [hits[s["id"]][m].first for m in methods]])
    index = {"title": title, "methods": list(methods), "ladder": [m for m in LADDER_VIEW if m in methods],
             "metrics": _finite(dict(evaluated.metrics)), "tail_patch": _tail_patch_note(evaluated.tail_patch),
             "top": top, "page_size": page_size, "pages": len(pages),
             "fields": list(FIELDS), "queries": rows}
    yield "data/index.js", _jsonp("TRACKSTAR.index(%s);", index)
    for n, page in enumerate(pages):
        body: dict[str, Any] = {"queries": {}, "passages": {}}
        for s in page:
            per = hits[s["id"]]
            body["queries"][s["id"]] = {"relevant": s["relevant"], "methods": {
                m: {"p": per[m].proponents, "o": per[m].opponents} for m in methods}}
            for m in methods:
                for pid, _, _ in per[m].proponents + per[m].opponents:
                    body["passages"][pid] = texts[pid]
        yield f"data/page-{n:05d}.js", _jsonp(f"TRACKSTAR.page({n}, %s);", body)


def write_site(out_dir: str | os.PathLike, files: Iterable[tuple[str, str]]) -> Path:
    """Write the assets and data files into a fresh folder beside ``out_dir``, then swap it into place."""
    with atomic_dir(out_dir) as tmp:
        for name in ("index.html", "viewer.js", "viewer.css"):
            shutil.copyfile(ASSETS / name, tmp / name)
        (tmp / "data").mkdir()
        for rel, text in files:
            (tmp / rel).write_text(text, encoding="utf-8")
    return Path(out_dir)


def build_report(out_dir: str | os.PathLike, files: Mapping[str, str | os.PathLike], queries: Sequence[Query] | None,
                 evaluated: Evaluated = Evaluated(), cut: Pages = Pages()) -> dict[str, int]:
    """The whole site from result files (method -> path); returns counts for the log."""
    kept = collect(files, queries, cut.top)
    texts = kept.texts
    written = {"queries": len(kept.summaries), "passages": 0, "pages": 0, "bytes": 0}
    out = write_site(out_dir, build_data(kept, list(files), evaluated, cut))
    for p in out.rglob("*"):
        if p.is_file():
            written["bytes"] += p.stat().st_size
    written["pages"] = len(list((out / "data").glob("page-*.js")))
    written["passages"] = len(texts)
    return written


def single_page_html(record: QueryResult, method: str, entity: str | None = None, title: str = "TrackStar trace") -> str:
    """One self-contained HTML file (styles, script and data inline) with the panel of one ad-hoc query."""
    texts: dict[str, str] = {}
    h = _keep(record, Query(record.example_id, record.inputs_plaintext, record.targets_plaintext, None, entity),
              max(len(record.proponent_ids), len(record.opponent_ids)), texts)
    summaries = [{"id": record.example_id, "prompt": record.inputs_plaintext, "target": record.targets_plaintext,
                  "entity": entity, "relevant": []}]
    kept = Collected(summaries, {record.example_id: {method: h}}, texts)
    data = "".join(text for _, text in build_data(kept, [method], cut=Pages(1, len(h.proponents), title)))
    html = (ASSETS / "index.html").read_text(encoding="utf-8")
    css = (ASSETS / "viewer.css").read_text(encoding="utf-8")
    js = (ASSETS / "viewer.js").read_text(encoding="utf-8").replace("</", "<\\/")
    html = html.replace('<link rel="stylesheet" href="viewer.css">', f"<style>\n{css}</style>")
    html = html.replace('<script src="viewer.js"></script>', f"<script>\n{js}</script>")
    return html.replace('<script src="data/index.js"></script>', f"<script>\n{data}</script>")


def write_single_page(path: str | os.PathLike, record: QueryResult, method: str, entity: str | None = None) -> None:
    """Write :func:`single_page_html` atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(single_page_html(record, method, entity))


def read_predictions(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{query id: {"prediction", "target_prob", "correct"}}`` from the evaluate stage's predictions.jsonl."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                obj = json.loads(line)
                out[obj["id"]] = obj
    return out
