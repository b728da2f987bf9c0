"""Tail-patch as the evaluate stage runs it on a pipeline: the step's second moments (picked by the resolver the
encoder's correction shares), the step size (`eval.tail_patch_lr`: a number, or `auto`, the largest lr of a grid
at which probe steps stay linear), the number of queries (`eval.tail_patch_queries`: a number, or `auto`, fewer
than 100 when the time estimated from the probe exceeds `eval.tail_patch_budget_s`), a per-pair memo so an edit
that changes some rankings computes only the (query, passage) steps not seen before, and the random-proponent
guard on the result."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

import trackstar.data.examples as examples_lib
import trackstar.evaluation.tailpatch as tailpatch_lib
from trackstar import layout
from trackstar.config import EvalParams
from trackstar.data.examples import Example
from trackstar.encode.moments import second_moments
from trackstar.evaluation.tailpatch import (LR_GRID, Probe, Step, pair_key, pending_pairs, probe_linearity,
                                            random_guard, tail_patch)
from trackstar.memo import Memo, code_hash, memo_key
from trackstar.model.checkpoint import checkpoint_hash

AUTO_QUERIES = 100  # eval.tail_patch_queries auto: at most this many queries
MIN_QUERIES = 10  # auto never takes fewer (fewer cannot tell a method's mean from random's), budget or not
PROBE_QUERIES = 8  # queries of the linearity probe, each with a random passage and its top proponent
Proponents = Mapping[str, Sequence[Sequence[Example]]]


@dataclass(frozen=True)
class TailPatchPlan:
    """Everything `run_tail_patch` needs, decided before it starts: the step (lr and moments), the queries and
    proponents it runs on, the probe that chose the lr, the work left after the memo and its estimated time."""

    step: Step
    lr_param: float | str
    queries_param: int | str
    budget_s: float
    v_source: str
    probe: Probe
    probe_memoized: bool
    queries: Sequence[Example]
    proponents: Proponents
    ks: Sequence[int]
    cache: dict[str, float]
    memo: Memo
    key: str
    passages: int  # distinct passages left to step
    pairs: int  # distinct (query, passage) pairs left to re-score
    estimate_s: float

    def text(self) -> str:
        """The plan line `evaluate` prints before tail-patch starts."""
        p = self.probe
        skipped = sum("skipped" in r for r in p.grid)
        how = (f"auto: the largest of {len(p.grid)} grid steps whose measured change is within its first-order "
               f"prediction's tolerance ({p.tolerances()}; {skipped} ruled out by their first-order prediction "
               f"alone)" if self.lr_param == "auto" else "eval.tail_patch_lr")
        if p.chosen is None:
            how += f"; NOT LINEAR: {p.reason()}"
        return (f"tail-patch plan: lr {self.step.lr:.3g} ({how}); {len(self.queries)} queries "
                f"({f'auto, budget {self.budget_s:g} s' if self.queries_param == 'auto' else 'eval.tail_patch_queries'}); "
                f"{self.passages} passages / {self.pairs} pairs to step (the memo holds {len(self.cache)}); estimated "
                f"{self.estimate_s:.3g} s at most ({p.seconds_per_passage:.3g} s per passage gradient + "
                f"{p.seconds_per_pair:.3g} s per step and re-score, measured on the probe"
                f"{', memoized' if self.probe_memoized else ''})")


def probe_groups(proponents: Proponents, n: int) -> dict[str, list[tuple[int, Example]]]:
    """The probe's (query index, passage) pairs over the first `n` queries: each query's first `random`
    proponent (a fixed-seed random passage) and its top proponent of `trackstar` (else of the first other
    method), as two groups checked separately."""
    others = [m for m in proponents if m != "random"]
    top = "trackstar" if "trackstar" in proponents else (others[0] if others else None)
    groups: dict[str, list[tuple[int, Example]]] = {}
    for name, method in (("random", "random" if "random" in proponents else None), ("top", top)):
        if method is not None:
            pairs = [(i, lists[0]) for i, lists in enumerate(list(proponents[method])[:n]) if len(lists)]
            if pairs:
                groups[name] = pairs
    return groups


def estimate_seconds(queries: Sequence[Example], proponents: Proponents, kmax: int, probe: Probe,
                     cache: Mapping[str, float]) -> tuple[float, int, int]:
    """(estimated seconds, distinct passages, distinct pairs) of the tail-patch steps `cache` does not hold:
    a gradient per passage and a step and re-score per pair at the probe's measured times (an upper
    estimate: the run builds one step per passage and re-scores up to 16 queries per forward)."""
    todo = pending_pairs(queries, proponents, kmax, cache)
    passages = len({(tuple(ex.input_ids), tuple(ex.loss_mask)) for _, ex in todo.values()})
    return passages * probe.seconds_per_passage + len(todo) * probe.seconds_per_pair, passages, len(todo)


def auto_queries(queries: Sequence[Example], proponents: Proponents, kmax: int, probe: Probe, budget_s: float) -> int:
    """The most queries (at most AUTO_QUERIES, at least MIN_QUERIES or all there are) whose tail-patch, memo
    ignored, is estimated to fit `budget_s` at the probe's measured times."""
    cap = min(AUTO_QUERIES, len(queries))
    seen_pairs: set[str] = set()
    seen_passages: set[tuple] = set()
    best = min(MIN_QUERIES, cap)
    for i in range(cap):
        for lists in proponents.values():
            for ex in list(lists[i])[:kmax]:
                seen_pairs.add(pair_key(queries[i], ex))
                seen_passages.add((tuple(ex.input_ids), tuple(ex.loss_mask)))
        cost = len(seen_passages) * probe.seconds_per_passage + len(seen_pairs) * probe.seconds_per_pair
        if cost > budget_s:
            break
        best = max(best, i + 1)
    return best


def _probe(model: torch.nn.Module, queries: Sequence[Example], proponents: Proponents, step: Step,
           e: EvalParams, memo_parts: Mapping[str, Any]) -> tuple[Probe, bool]:
    """The linearity probe over LR_GRID (`auto`) or the one fixed lr, memoized under the tail-patch memo's key
    parts and the probe pairs: (probe, whether it came from the memo)."""
    groups = probe_groups(proponents, PROBE_QUERIES)
    memo = Memo(memo_parts["root"], keep=8)
    key = memo_key(**{k: v for k, v in memo_parts.items() if k != "root"},
                   probe={g: [pair_key(queries[i], ex) for i, ex in ps] for g, ps in groups.items()})
    known = memo.load_json("probe", key)
    if known is not None:
        return Probe(**known), True
    if not groups:
        raise ValueError("tail-patch probe: no query has a proponent")
    grid = LR_GRID if e.tail_patch_lr == "auto" else (float(e.tail_patch_lr),)
    probe = probe_linearity(model, queries, groups, dataclasses.replace(step, progress=False), grid)
    memo.save_json("probe", key, dataclasses.asdict(probe))
    return probe, False


def plan_tail_patch(model: torch.nn.Module, queries: Sequence[Example], proponents: Proponents, pad_id: int,
                    e: EvalParams, root: Path = Path(".")) -> TailPatchPlan:
    """Probe the step, pick the lr and the number of queries, and count the work the memo leaves, for the model
    of the pipeline at `root` (`queries`: at most AUTO_QUERIES or the fixed count; `proponents[m][i]`: query
    i's top proponents). The step divides by the checkpoint's Adam state, else the `moments` stage's estimate,
    else nothing; the memo (.work/tailpatch) is keyed by the model, those moments, lr and this code."""
    ck = checkpoint_hash(root / layout.MODEL)
    moments = second_moments(root / layout.MODEL, root / layout.MOMENTS, ck)
    code = code_hash(tailpatch_lib, examples_lib)
    step = Step(float("nan"), moments.v_hat(model), pad_id)
    probe, memoized = _probe(model, queries, proponents, step, e, {
        "root": layout.work_dir("tailpatch", root), "model": ck, "v": moments.key, "lr": e.tail_patch_lr,
        "code": code})
    kmax = max(e.tail_patch_ks)
    n = (auto_queries(queries, proponents, kmax, probe, e.tail_patch_budget_s) if e.tail_patch_queries == "auto"
         else min(len(queries), e.tail_patch_queries))
    queries, proponents = list(queries[:n]), {m: list(lists[:n]) for m, lists in proponents.items()}
    memo = Memo(layout.work_dir("tailpatch", root), keep=8)
    key = memo_key(model=ck, v=moments.key, lr=probe.lr, code=code)
    cache = memo.load_json("pairs", key) or {}
    cache.update({k: v for k, v in probe.measured.items() if k not in cache})  # the probe's own steps at this lr
    estimate, passages, pairs = estimate_seconds(queries, proponents, kmax, probe, cache)
    return TailPatchPlan(dataclasses.replace(step, lr=probe.lr), e.tail_patch_lr, e.tail_patch_queries,
                         e.tail_patch_budget_s, moments.source, probe, memoized, queries, proponents, e.tail_patch_ks,
                         cache, memo, key, passages, pairs, estimate)


def _finite(x: Any) -> Any:
    """JSON-safe: non-finite floats (a failed measurement) become None, recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def run_tail_patch(model: torch.nn.Module, plan: TailPatchPlan) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """(`tail_patch` metrics per method, the record metrics/model.json keeps under `tail_patch`: the lr and how it
    was chosen, the probe's per-lr linearity, the guard, and `trustworthy` with the `reasons` it is false)."""
    seen = len(plan.cache)
    tp = tail_patch(model, plan.queries, plan.proponents, plan.step, plan.ks, plan.cache)
    if len(plan.cache) > seen:
        plan.memo.save_json("pairs", plan.key, plan.cache)
    k = max(plan.ks)
    guard = random_guard(tp, k)
    reasons = [r for r in (plan.probe.reason(), guard) if r]
    p = plan.probe
    record = {
        "lr": plan.step.lr, "lr_param": plan.lr_param, "v": plan.v_source, "queries": len(plan.queries),
        "queries_param": plan.queries_param, "trustworthy": not reasons, "reasons": reasons,
        "probe": {"pairs": p.pairs, "tolerance": p.tolerance, "noise": p.noise, "chosen": p.chosen, "dead": p.dead,
                  "grid": p.grid, "seconds_per_passage": p.seconds_per_passage,
                  "seconds_per_pair": p.seconds_per_pair},
        "guard": {"k": k, "random": tp.get("random", {}).get(f"tail_patch@{k}"),
                  "random_se": tp.get("random", {}).get(f"tail_patch_se@{k}"), "share": tailpatch_lib.GUARD_SHARE,
                  "z": tailpatch_lib.GUARD_Z, "fired": guard is not None},
        "estimate_s": round(plan.estimate_s, 1),
    }
    return tp, _finite(record)
