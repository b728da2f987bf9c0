"""Tail-patch as the evaluate stage runs it on a pipeline: the step's second moments (picked by the resolver the
encoder's correction shares) and a per-pair memo, so an edit that changes some rankings computes only the
(query, passage) steps not seen before."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

import trackstar.data.examples as examples_lib
import trackstar.evaluation.tailpatch as tailpatch_lib
from trackstar import layout
from trackstar.config import EvalParams
from trackstar.data.examples import Example
from trackstar.encode.moments import second_moments
from trackstar.evaluation.tailpatch import Step, tail_patch
from trackstar.memo import Memo, code_hash, memo_key
from trackstar.model.checkpoint import checkpoint_hash


def pipeline_tail_patch(model: torch.nn.Module, queries: Sequence[Example],
                        proponents: Mapping[str, Sequence[Sequence[Example]]], pad_id: int, e: EvalParams,
                        root: Path = Path(".")) -> tuple[dict[str, dict[str, float]], str]:
    """(`tail_patch` metrics per method, the step's v-hat source: optimizer_state, estimated or none) for the
    model of the pipeline at `root`. The step divides by the checkpoint's Adam state, else the `moments`
    stage's estimate (its rank-1 fit), else nothing; each (query, passage) step depends on the model, those
    moments, lr and this code only, and is memoized under .work/tailpatch."""
    ck = checkpoint_hash(root / layout.MODEL)
    moments = second_moments(root / layout.MODEL, root / layout.MOMENTS, ck)
    memo = Memo(layout.work_dir("tailpatch", root), keep=8)
    key = memo_key(model=ck, v=moments.key, lr=e.tail_patch_lr, code=code_hash(tailpatch_lib, examples_lib))
    cache = memo.load_json("pairs", key) or {}
    seen = len(cache)
    tp = tail_patch(model, queries, proponents, Step(e.tail_patch_lr, moments.v_hat(model), pad_id),
                    e.tail_patch_ks, cache)
    if len(cache) > seen:
        memo.save_json("pairs", key, cache)
    return tp, moments.source
