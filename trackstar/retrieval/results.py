"""Retrieval results: ``retrievals/*.jsonl``, one JSON object per query.

The format is the one of the public TrackStar result files released with the paper
(Chang et al. 2024, arXiv 2410.17413), so our files load unchanged in the paper's TDA
viewer (https://pair-code.github.io/pretraining-tda/demo, "load from file").

Where this was checked (GitHub repository ``PAIR-code/pretraining-tda``):

* ``README.md`` ("TDA method results"): every record has ``example_id``, ``query_set``,
  ``inputs_plaintext`` (the prompt string), ``targets_plaintext`` (the target string),
  ``proponents`` (``string[]``, the proponent passage *texts*), ``proponent_ids``
  (``string[]``, passage ids) and ``proponent_scores`` (``number[]``, the method's
  scores). "For TDA methods that support a notion of opponents (most gradient-based
  methods, but not the BM25 or Gecko baselines)" the files also hold ``opponents``
  (``string[]``), ``opponent_ids`` (``string[]``) and ``opponent_scores``
  (``number[]``). Optional extras in the published files: ``fact_id``, ``relation``,
  ``8b_generations``, ``8b_confidence``, ``c4_frequency``, ``c4_frequency_bucket``,
  ``has_trex_sentence``, ``proponent_correct`` (``boolean[]``, whether each proponent
  contains the fact), ``proponent_ais_scores`` (``number[]``), ``is_8b_correct``,
  ``groundtruth``.
* ``demo/data_loader.ts``: the viewer splits the file on newlines, drops empty lines
  and ``JSON.parse``-s each one (so values must be strict JSON: no NaN/Infinity);
  it shows ``example_id`` (falling back to the older ``trex_id``) and
  ``inputs_plaintext + ' ' + targets_plaintext``, and takes ``Math.max`` of
  ``proponent_scores`` (it warns on NaN).
* ``demo/example_view.ts``: ``TDAExample`` is a free-form ``{[key: string]: any}``;
  it renders ``proponents[i]`` with ``proponent_scores[i].toFixed(4)`` (scores must
  be JSON numbers), and the "Correct?" chips from ``proponent_correct[i]`` when
  present. ``example_id`` must be a string (it calls ``example_id.startsWith('trex')``
  to choose the T-REx layout). The viewer does not render opponents.

Here all nine core fields are always written (BM25 and the random control write
empty opponent lists); on reading, opponent fields may be absent (the published BM25
and Gecko files have none) and read as empty lists. Any other field (``query_set``,
``proponent_correct``, ...) is kept in :attr:`QueryResult.extra` and written back
after the core fields. Scores are written as finite JSON floats; ranks are implied by
list order (proponents best first, i.e. highest score first; opponents most negative
first).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from trackstar.atomic import atomic_open
from trackstar.data.records import Query, iter_corpus
from trackstar.errors import InputError

CORE_FIELDS = (
    "example_id",
    "inputs_plaintext",
    "targets_plaintext",
    "proponents",
    "proponent_ids",
    "proponent_scores",
    "opponents",
    "opponent_ids",
    "opponent_scores",
)
_STR_FIELDS = ("example_id", "inputs_plaintext", "targets_plaintext")
_LIST_GROUPS = {
    "proponent": ("proponents", "proponent_ids", "proponent_scores"),
    "opponent": ("opponents", "opponent_ids", "opponent_scores"),
}


@dataclass
class QueryResult:
    """Ranked proponents (and opponents) of one query, as in the published TrackStar files."""

    example_id: str
    inputs_plaintext: str  # the prompt
    targets_plaintext: str  # the target continuation
    proponent_ids: list[str]
    proponent_scores: list[float]
    proponents: list[str]  # passage texts, aligned with proponent_ids
    opponent_ids: list[str] = field(default_factory=list)
    opponent_scores: list[float] = field(default_factory=list)
    opponents: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # any other field, kept as is

    def to_json(self) -> dict[str, Any]:
        """The JSON object of one line: core fields in the published order, then extras."""
        obj: dict[str, Any] = {
            "example_id": self.example_id,
            "inputs_plaintext": self.inputs_plaintext,
            "targets_plaintext": self.targets_plaintext,
            "proponents": list(self.proponents),
            "proponent_ids": list(self.proponent_ids),
            "proponent_scores": [float(s) for s in self.proponent_scores],
            "opponents": list(self.opponents),
            "opponent_ids": list(self.opponent_ids),
            "opponent_scores": [float(s) for s in self.opponent_scores],
        }
        for key, value in self.extra.items():
            if key in obj:
                raise ValueError(f"example {self.example_id!r}: extra field {key!r} shadows a core field")
            obj[key] = value
        return obj


def _check_record(obj: Any) -> list[tuple[str | None, str]]:
    """Problems of one decoded record as (field, message); empty when it is valid."""
    if not isinstance(obj, dict):
        return [(None, f"expected a JSON object, got {type(obj).__name__}")]
    problems: list[tuple[str | None, str]] = []
    for name in _STR_FIELDS:
        if name not in obj:
            problems.append((name, "missing"))
        elif not isinstance(obj[name], str):
            problems.append((name, f"expected a string, got {type(obj[name]).__name__}"))
    if isinstance(obj.get("example_id"), str) and not obj["example_id"]:
        problems.append(("example_id", "empty string"))
    for group, (texts, ids, scores) in _LIST_GROUPS.items():
        present = [n for n in (texts, ids, scores) if n in obj]
        if group == "opponent" and not present:
            continue  # published BM25/Gecko files have no opponent fields
        for n in (texts, ids, scores):
            if n not in obj:
                problems.append((n, "missing" + (f" (other {group} fields are present)" if group == "opponent" else "")))
        lengths = {}
        for n in (texts, ids):
            if n in obj:
                v = obj[n]
                if not isinstance(v, list):
                    problems.append((n, f"expected a list of strings, got {type(v).__name__}"))
                    continue
                bad = [i for i, x in enumerate(v) if not isinstance(x, str)]
                if bad:
                    problems.append((n, f"item {bad[0]} is {type(v[bad[0]]).__name__}, expected a string"))
                lengths[n] = len(v)
        if scores in obj:
            v = obj[scores]
            if not isinstance(v, list):
                problems.append((scores, f"expected a list of numbers, got {type(v).__name__}"))
            else:
                for i, x in enumerate(v):
                    if isinstance(x, bool) or not isinstance(x, (int, float)):
                        problems.append((scores, f"item {i} is {type(x).__name__}, expected a number"))
                        break
                    if not math.isfinite(x):
                        problems.append((scores, f"item {i} is {x}, expected a finite number"))
                        break
                lengths[scores] = len(v)
        if len(set(lengths.values())) > 1:
            desc = ", ".join(f"{n}={m}" for n, m in lengths.items())
            problems.append((ids, f"lengths differ ({desc})"))
    return problems


def _from_record(obj: dict[str, Any]) -> QueryResult:
    extra = {k: v for k, v in obj.items() if k not in CORE_FIELDS}
    return QueryResult(
        example_id=obj["example_id"],
        inputs_plaintext=obj["inputs_plaintext"],
        targets_plaintext=obj["targets_plaintext"],
        proponent_ids=list(obj["proponent_ids"]),
        proponent_scores=[float(s) for s in obj["proponent_scores"]],
        proponents=list(obj["proponents"]),
        opponent_ids=list(obj.get("opponent_ids", [])),
        opponent_scores=[float(s) for s in obj.get("opponent_scores", [])],
        opponents=list(obj.get("opponents", [])),
        extra=extra,
    )


def write_results(path: str | os.PathLike, results: Iterable[QueryResult]) -> int:
    """Write one JSON line per result, atomically (temp file in the same folder, then os.replace).

    Raises ValueError (and leaves any existing file untouched) on an invalid result:
    mismatched list lengths, non-string ids or texts, non-finite scores, duplicate
    example_id. Returns the number of lines written.
    """
    n = 0
    seen: set[str] = set()
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as f:
        for n, r in enumerate(results, start=1):
            obj = r.to_json()
            problems = _check_record(obj)
            if problems:
                fld, msg = problems[0]
                raise ValueError(f"result #{n} (example_id={r.example_id!r}): field '{fld}': {msg}")
            if obj["example_id"] in seen:
                raise ValueError(f"result #{n}: duplicate example_id {obj['example_id']!r}")
            seen.add(obj["example_id"])
            try:
                line = json.dumps(obj, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as e:  # extras that are not strict JSON
                raise ValueError(f"result #{n} (example_id={r.example_id!r}): {e}") from e
            f.write(line + "\n")
    return n


def read_results(path: str | os.PathLike) -> list[QueryResult]:
    """Read and validate a results file; errors name the file, line (1-based) and field.

    Blank lines are skipped (as the viewer does). Opponent fields may be absent.
    """
    return list(iter_results(path))


def iter_results(path: str | os.PathLike) -> Iterator[QueryResult]:
    """Stream and validate a results file one record at a time (what :func:`read_results` collects)."""
    path = os.fspath(path)
    seen: dict[str, int] = {}
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise InputError(path, f"cannot open: {e.strerror or e}") from e
    with f:
        lineno = 0
        while True:
            try:
                raw = f.readline()
            except UnicodeDecodeError as e:
                raise InputError(path, f"not UTF-8 text: {e}", line=lineno + 1) from e
            if not raw:
                break
            lineno += 1
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw, parse_constant=_reject_constant)
            except ValueError as e:
                raise InputError(path, f"invalid JSON: {e}", line=lineno) from e
            problems = _check_record(obj)
            if problems:
                fld, msg = problems[0]
                raise InputError(path, msg, line=lineno, field=fld)
            eid = obj["example_id"]
            if eid in seen:
                raise InputError(path, f"duplicate example_id {eid!r} (first on line {seen[eid]})",
                                 line=lineno, field="example_id")
            seen[eid] = lineno
            yield _from_record(obj)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON (the viewer's JSON.parse rejects it)")


@dataclass(frozen=True)
class Hits:
    """Ranked passages of one query: ids and their scores, best first (opponents: most negative first)."""

    ids: Sequence[str] = ()
    scores: Sequence[float] = ()


def make_result(query: Query, proponents: Hits, text_of: Callable[[str], str] | Mapping[str, str],
                opponents: Hits = Hits(), **extra: Any) -> QueryResult:
    """Build a QueryResult of `query` (its id, prompt and target), looking passage texts up by id
    (``text_of`` is a mapping or a function)."""
    look = text_of.__getitem__ if isinstance(text_of, Mapping) else text_of
    return QueryResult(
        example_id=str(query.id),
        inputs_plaintext=query.prompt,
        targets_plaintext=query.target,
        proponent_ids=[str(i) for i in proponents.ids],
        proponent_scores=[float(s) for s in proponents.scores],
        proponents=[look(i) for i in proponents.ids],
        opponent_ids=[str(i) for i in opponents.ids],
        opponent_scores=[float(s) for s in opponents.scores],
        opponents=[look(i) for i in opponents.ids],
        extra=dict(extra),
    )


def valid_hits(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One query's hits without the -1 padding of an under-filled IVF search."""
    keep = rows >= 0
    return scores[keep], rows[keep]


def write_retrievals(path: str | os.PathLike, queries: Sequence[Query], found: tuple[np.ndarray, ...],
                     corpus: str | os.PathLike, query_set: str) -> None:
    """Write one method's (top scores, top rows, bottom scores, bottom rows) as TDA-viewer results,
    looking the hit passages' ids and texts up in one streaming pass over the corpus."""
    top_s, top_i, bot_s, bot_i = found
    need = set(top_i[top_i >= 0].tolist()) | set(bot_i[bot_i >= 0].tolist())
    lookup = {i: (p.id, p.text) for i, p in enumerate(iter_corpus(corpus)) if i in need}
    results = []
    for qi, q in enumerate(queries):
        (ts, ti), (bs, bi) = valid_hits(top_s[qi], top_i[qi]), valid_hits(bot_s[qi], bot_i[qi])
        text = {lookup[r][0]: lookup[r][1] for r in np.concatenate([ti, bi])}
        results.append(make_result(q, Hits([lookup[r][0] for r in ti], ts), text, Hits([lookup[r][0] for r in bi], bs),
                                   query_set=query_set))
    write_results(path, results)
