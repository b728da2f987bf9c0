"""The attribution methods the pipeline compares (docs/method.md), defined once: the ablation ladder's rungs
(exact search over the raw encodings, `ladder` stage), TrackStar itself (`retrieve`), and the baselines
BM25 (`bm25`) and seeded random proponents (computed by `evaluate`, no retrieval file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trackstar import layout


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # how a reader sees it named
    results: Path | None  # its retrieval file under the repository root (None: no file)
    array: str | None = None  # a ladder rung: the raw store array it searches
    whitened: bool = False  # a ladder rung: whitened by W_train (R_train's damped whitening)
    normalize: bool = False  # a ladder rung: rows unit-normalized before the inner product


def _rung(name: str, label: str, array: str, whitened: bool, normalize: bool) -> Method:
    return Method(name, label, layout.LADDER / f"{name}.jsonl", array, whitened, normalize)


# in the order of the ablation ladder, then the baselines: the order metrics are written in
METHODS: dict[str, Method] = {m.name: m for m in (
    _rung("dot", "dot (ladder)", "g_plain", whitened=False, normalize=False),
    _rung("cosine", "cosine (ladder)", "g_plain", whitened=False, normalize=True),
    _rung("optimizer", "optimizer (ladder)", "g", whitened=False, normalize=True),
    _rung("r_train", "R_train (ladder)", "g", whitened=True, normalize=True),
    Method("trackstar", "TrackStar", layout.TRACKSTAR),
    Method("bm25", "BM25", layout.BM25),
    Method("random", "random", None),
)}
RUNGS: dict[str, Method] = {n: m for n, m in METHODS.items() if m.array}  # what retrieve.methods may list
LADDER_VIEW = (*RUNGS, "trackstar")  # the ladder as the viewer charts it, rungs up to TrackStar
VIEW_ORDER = ("trackstar", "bm25", *RUNGS)  # the viewer's columns: where TrackStar and BM25 disagree first
