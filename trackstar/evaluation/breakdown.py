"""What the top proponents are (the paper's Fig. 3): relevant, mentions entity and target, one of them, neither.

Chang et al. (2024, Fig. 3) sort each query's top-10 proponents into passages that entail the fact,
passages that mention both the fact's entity and its target without entailing it, passages that
mention only one of the two, and passages that mention neither. Here "entails" is the ground truth
(the passage id is among the query's ``relevant_ids``); a mention is a case-insensitive match of the
whole string on word boundaries. A query without an ``entity`` is sorted by its target alone, so
such passages land in ``one`` (target) or ``neither``, never in ``both``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, Mapping, Sequence

CATEGORIES = ("relevant", "both", "one", "neither")
TOP = 10  # the paper breaks down the top-10 proponents


@lru_cache(maxsize=4096)
def _pattern(phrase: str) -> re.Pattern | None:
    """Word-bounded, case-insensitive pattern of a phrase (None for a blank one)."""
    phrase = phrase.strip()
    if not phrase:
        return None
    return re.compile(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", re.IGNORECASE)


def mentions(text: str, phrase: str | None) -> bool:
    """Whether the text contains the phrase as a whole word sequence (case-insensitive)."""
    pat = _pattern(phrase) if phrase else None
    return bool(pat and pat.search(text))


def classify(text: str, target: str, entity: str | None = None, relevant: bool = False) -> str:
    """One passage's category: relevant, both (entity and target), one (of them), neither."""
    if relevant:
        return "relevant"
    hits = mentions(text, target) + mentions(text, entity)
    return ("neither", "one", "both")[hits]


def query_breakdown(texts: Sequence[str], ids: Sequence[str], target: str, entity: str | None,
                    relevant: Iterable[str] | None, top: int = TOP) -> dict[str, int]:
    """Counts per category among one query's first ``top`` proponents."""
    rel = set(relevant or ())
    out = dict.fromkeys(CATEGORIES, 0)
    for text, pid in list(zip(texts, ids))[:top]:
        out[classify(text, target, entity, pid in rel)] += 1
    return out


def method_breakdown(per_query: Iterable[Mapping[str, int]]) -> dict[str, float]:
    """Mean share per category over queries (each query's shares sum to 1; a query with no proponent is left out)."""
    sums = dict.fromkeys(CATEGORIES, 0.0)
    n = 0
    for counts in per_query:
        total = sum(counts[c] for c in CATEGORIES)
        if total == 0:
            continue
        for c in CATEGORIES:
            sums[c] += counts[c] / total
        n += 1
    return {c: (sums[c] / n if n else 0.0) for c in CATEGORIES}


def metric_names(top: int = TOP) -> dict[str, str]:
    """The metrics.json key of each category, e.g. ``top10_relevant``."""
    return {c: f"top{top}_{c}" for c in CATEGORIES}
