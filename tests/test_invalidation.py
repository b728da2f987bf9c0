"""Exact invalidation: every params.yaml key invalidates exactly the stages written below.

(a) For every key (list-valued keys count as one), edit it to a valid different value and check
    that `dvc status` lists exactly the expected stages (the stages that read the key), then revert.
(b) For at least one key of each params group, run `dvc repro` and check the stages it actually ran equal
    the expected downstream set; revert and check `dvc repro` reruns nothing (the run-cache
    restores the old outputs) and `dvc status` is clean.

The expectations are literal on purpose (not derived from dvc.yaml): they are the specification
that dvc.yaml must meet. Invalidation is checked with `dvc status` / the stages `dvc repro` ran,
never with `dvc repro --dry` (`--dry` predicts from the lock and does not see DVC stop
early where outputs come out unchanged).

DVC stops the propagation at a stage whose outputs come out byte-identical to the cached ones
(its dependents see unchanged deps). The (b) expectations say what must happen for the chosen
edit; a comment explains each one that stops early.

docs/invalidation.md is generated from the two tables the tests assert (EXPECTED: what `dvc status` lists,
RERUN: what `dvc repro` runs), so it says what the tests measure; `python -m tests.test_invalidation`
rewrites it and test_docs_are_generated_from_the_tables (fast, no pipeline) fails when it differs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.pipeline import ROOT, repro, set_param

E = {"encode@train", "encode@query"}
EM = E | {"moments"}  # keys the estimated-moments stage reads too (it writes an empty file unless kind: estimated)
P = {"precondition@train", "precondition@query"}

# key -> (a valid value different from the tiny test params, stages `dvc status` must list)
EXPECTED: dict[str, tuple[object, set[str]]] = {
    "data.source": ("files", {"data"}),
    "data.corpus": ("inputs/data/other.jsonl", {"data"}),
    "data.queries": ("inputs/data/other_queries.jsonl", {"data"}),
    "data.seed": (1, {"data"}),
    "data.entities": (13, {"data"}),
    "data.relations": (3, {"data"}),
    "data.paraphrases": (3, {"data"}),
    "data.question_fraction": (0.25, {"data"}),
    "data.distractors_per_entity": (2, {"data"}),
    "data.confusers_per_entity": (1, {"data"}),
    "data.confuser_true_value": (0.25, {"data"}),
    "data.near_miss_fraction": (0.1, {"data"}),
    "data.contradicted": (0.5, {"data"}),
    "data.digests": (0.1, {"data"}),
    "data.query_wording": ("training", {"data"}),  # the test pipeline asks in the held_out wording
    "data.text_column": ("body", {"data"}),
    "data.id_column": ("doc_id", {"data"}),
    "model.source": ("checkpoint", {"train"}),
    "model.checkpoint": ("inputs/other_checkpoint", {"train"}),
    "model.vocab_size": (320, {"train"}),
    "model.hidden_size": (48, {"train"}),
    "model.layers": (3, {"train"}),
    "model.heads": (4, {"train"}),
    "model.intermediate_size": (48, {"train"}),
    "model.max_length": (48, {"train"}),
    "model.tie_embeddings": (True, {"train"}),
    "train.seed": (1, {"train"}),
    "train.epochs": (1, {"train"}),
    "train.batch_size": (16, {"train"}),
    "train.lr": (0.001, {"train"}),
    "train.weight_decay": (0.0, {"train"}),
    "train.betas": ([0.9, 0.99], {"train"}),
    "train.eps": (1.0e-06, {"train"}),
    "train.grad_clip": (0.5, {"train"}),
    "gradients.include": ("mlp", E),
    "gradients.exclude": ("lm_head", E),
    "gradients.include_lm_head": (False, E),
    "gradients.max_length": (48, EM | {"evaluate"}),  # evaluate tokenizes with it (accuracy, tail-patch)
    "gradients.truncation": ("refuse", E),
    "correction.kind": ("none", EM),
    "correction.eps": (1.0e-06, E),
    "correction.estimate_samples": (64, EM),
    "correction.seed": (1, EM),
    "projection.k": (5, E),
    "projection.seed": (1, E),
    "projection.d": (100, E),
    "encode.batch_size": (5, EM),
    "encode.dtype": ("fp16", E),
    "encode.chunk_mb": (1.0, E),
    "encode.compressor": ("zstd", E),
    "encode.device": ("cpu", EM),
    "encode.autocast": ("bf16", E),
    "encode.save_plain": (False, E),
    "hessian.mix_k": (6, {"hessian"}),
    "hessian.lambda": (0.5, {"hessian"}),
    "hessian.damping": (0.01, {"hessian", "ladder"}),  # the ladder's r_train rung is damped too
    "hessian.structure": ("module", {"autocorrelation"}),  # the plan picks the blocks R is accumulated in
    "hessian.memory_gb": (4.0, {"autocorrelation"}),
    "hessian.train_sample": (32, {"autocorrelation"}),
    "index.kind": ("ivf_flat", {"index"}),
    "index.nlist": (3, {"index"}),
    "index.nprobe": (1, {"retrieve"}),  # a search-time knob: the index itself is not rebuilt
    "index.pq_m": (8, {"index"}),
    "index.pq_bits": (4, {"index"}),
    "index.opq": (True, {"index"}),
    "index.pca": (4, {"index"}),
    "index.rerank": (20, {"retrieve"}),  # a search-time knob
    "index.train_sample": (50, {"index"}),
    "index.seed": (1, {"index"}),
    "index.on_disk": (True, {"index"}),
    "retrieve.k": (8, {"retrieve", "ladder"}),
    "retrieve.methods": (["dot", "cosine"], {"ladder"}),
    "retrieve.query_batch": (3, {"retrieve", "ladder"}),
    "bm25.k": (8, {"bm25"}),
    "bm25.k1": (1.2, {"bm25"}),
    "bm25.b": (0.5, {"bm25"}),
    "eval.tail_patch_lr": (1.0e-04, {"evaluate"}),
    "eval.tail_patch_ks": ([1, 5], {"evaluate"}),
    "eval.tail_patch_queries": (1, {"evaluate"}),
    "eval.tail_patch_budget_s": (60.0, {"evaluate"}),
    "eval.seed": (1, {"evaluate"}),
    "eval.dev_fraction": (0.25, {"evaluate"}),
}

# `report` reads only the retrievals, predictions and metrics (metrics.json, model.json): it reruns exactly when one of them changed
ALL = {"data", "train", "moments", *E, "autocorrelation", "eigen", "hessian", *P, "index", "retrieve", "ladder", "bm25",
       "evaluate", "report"}
FROM_TRAIN = ALL - {"data", "bm25"}
FROM_ENCODE = E | {"autocorrelation", "eigen", "hessian", *P, "index", "retrieve", "ladder", "evaluate", "report"}
# damping also changes W_train, so the ladder (its r_train rung) reruns; a mix_k edit does not (test_pipeline).
# Neither reruns `eigen` (R_train's eigenbasis): only the O(d m^2) update and what reads it
FROM_HESSIAN = {"hessian", *P, "index", "retrieve", "ladder", "evaluate", "report"}

# (b) one key per params group -> the stages `dvc repro` must run after the edit. Groups whose keys
# invalidate the same stages (model+train: `train`; gradients+correction+projection+encode: `encode@*`)
# are edited together in one repro: (a) already shows each key invalidates exactly those stages, and
# what DVC runs depends only on which stages are invalidated and whether their outputs change, so a
# separate ~1.5 min repro per group would test the same thing again.
RERUN: dict[tuple[str, ...], set[str]] = {
    ("data.seed",): ALL,
    ("model.intermediate_size", "train.seed"): FROM_TRAIN,
    # encode.batch_size is not part of the result in exact arithmetic, but the batch shape
    # (padding, BLAS blocking) changes float32 rounding: the encodings differ in their last bits
    # (measured max |diff| ~2e-6 on values ~30), so on its own it also reruns all of FROM_ENCODE.
    # correction.kind and encode.batch_size also rerun `moments` (its empty file comes out identical)
    ("gradients.include_lm_head", "correction.kind", "projection.k", "encode.batch_size"): FROM_ENCODE | {"moments"},
    ("hessian.damping",): FROM_HESSIAN,
    # mix_k leaves W_train byte-identical: the ladder is skipped
    ("hessian.mix_k",): FROM_HESSIAN - {"ladder"},
    ("hessian.train_sample",): {"autocorrelation", "eigen"} | FROM_HESSIAN,
    # a budget edit that leaves the chosen structure as it was: the statistics come out byte-identical
    ("hessian.memory_gb",): {"autocorrelation"},
    # ivf_flat with nlist 4, nprobe 2 is approximate: retrievals change, so evaluate reruns
    ("index.kind",): {"index", "retrieve", "evaluate", "report"},
    # with the (default) flat index nprobe is ignored: retrieve reruns, its outputs are
    # byte-identical, so DVC reruns neither evaluate nor report
    ("index.nprobe",): {"retrieve"},
    ("retrieve.k",): {"retrieve", "ladder", "evaluate", "report"},
    ("retrieve.methods",): {"ladder", "evaluate", "report"},
    ("bm25.k1",): {"bm25", "evaluate", "report"},
    # the random control's draw changes: metrics change, retrievals do not; the report shows the metrics
    ("eval.seed",): {"evaluate", "report"},
}
GROUPS = ["data", "model", "train", "gradients", "correction", "projection", "encode", "hessian", "index", "retrieve",
          "bm25", "eval"]


def leaf_keys(node: dict, prefix: str = "") -> dict[str, object]:
    """Dotted leaf keys of the params mapping; a list is one key."""
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(leaf_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def status(repo: Path) -> set[str]:
    """Stage names `dvc status --json` reports as changed (in-process: same code as the CLI, ~5x faster)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as r:  # names are addressed relative to the cwd: 'path/dvc.yaml:stage'
        return {name.rsplit("dvc.yaml:", 1)[-1] for name in r.status()}


@pytest.fixture(scope="module")
def repo(copy_built):
    return copy_built("invalidation")


def test_every_params_key_has_an_expectation(repo):
    keys = leaf_keys(yaml.safe_load((repo / "params.yaml").read_text()))
    assert set(keys) == set(EXPECTED), "params.yaml and the invalidation table disagree"
    edited = [k for ks in RERUN for k in ks]
    assert set(edited) <= set(EXPECTED)
    for g in GROUPS:
        assert any(k.startswith(g + ".") for k in edited), g
    assert {"index.kind", "index.nprobe"} <= set(edited)  # index build key and search-time key


def test_status_lists_exactly_the_stages_that_read_each_key(repo):
    from trackstar.config import parse_params

    params = yaml.safe_load((repo / "params.yaml").read_text())
    keys = leaf_keys(params)
    assert status(repo) == set()
    wrong = {}
    got_all = {}
    for key, (value, expected) in EXPECTED.items():
        old = keys[key]
        assert value != old, f"{key}: the edit must change the value"
        set_param(repo, key, value)
        try:
            parse_params(yaml.safe_load((repo / "params.yaml").read_text()))  # a valid edit
            got = status(repo)
        finally:
            set_param(repo, key, old)
        got_all[key] = got
        if got != expected:
            wrong[key] = (sorted(got), sorted(expected))
    assert status(repo) == set()
    assert not wrong, f"dvc status (got, expected): {wrong}"


def test_repro_reruns_exactly_the_downstream_stages_then_nothing_after_revert(repo):
    keys = leaf_keys(yaml.safe_load((repo / "params.yaml").read_text()))
    wrong = {}
    seconds = {}
    for group, expected in RERUN.items():
        for key in group:
            set_param(repo, key, EXPECTED[key][0])
        t0 = time.time()
        try:
            ran = repro(repo)
        finally:
            for key in group:
                set_param(repo, key, keys[key])
        seconds[group] = round(time.time() - t0, 1)
        if set(ran) != expected or len(ran) != len(set(ran)):
            wrong[group] = (sorted(ran), sorted(expected))
        back = repro(repo)  # run-cache: every stage is restored, none runs
        assert back == [], f"{group}: reverting the edit reran {back}"
        assert status(repo) == set(), f"{group}: dvc status not clean after revert"
        print(f"{'+'.join(group)}: ran {len(ran)} stages in {seconds[group]} s, revert {time.time() - t0:.1f} s total")
    assert not wrong, f"dvc repro ran (got, expected): {wrong}"


DOC = ROOT / "docs" / "invalidation.md"


def test_docs_are_generated_from_the_tables():
    assert DOC.read_text() == invalidation_doc(), "docs/invalidation.md is stale: run `python -m tests.test_invalidation`"

ORDER = ["data", "train", "moments", "encode@train", "encode@query", "autocorrelation", "eigen", "hessian", "precondition@train",
         "precondition@query", "index", "retrieve", "ladder", "bm25", "evaluate", "report"]


def _fmt(stages) -> str:
    return ", ".join(f"`{s}`" for s in sorted(stages, key=ORDER.index)) or "—"


def invalidation_doc() -> str:
    """docs/invalidation.md from the tables the tests assert: EXPECTED (what `dvc status` lists per key) and RERUN
    (what `dvc repro` runs per edited group)."""
    st = {key: stages for key, (_, stages) in EXPECTED.items()}
    # a key edited with others: the group's reruns less the stages only the others invalidate
    rr = {key: ran - (set().union(*(st[o] for o in group if o != key)) - st[key])
          for group, ran in RERUN.items() for key in group}
    # what reruns when an edit changes the stage's outputs: the measured repro set of a key with the
    # same directly-invalidated stages whose edit propagated furthest
    widest: dict[frozenset, set[str]] = {}
    for key, ran in rr.items():
        d = frozenset(st[key])
        if len(ran) > len(widest.get(d, ())):
            widest[d] = set(ran)
    lines = [
        "# What an edit of params.yaml reruns",
        "",
        "Generated by `python -m tests.test_invalidation` from the tables `tests/test_invalidation.py`",
        "asserts on the tiny test params (a test fails when this file differs); do not edit by hand.",
        "*Invalidated*: the stages `dvc status` lists after editing only that key (the stages that read",
        "it). *Reruns*: the stages `dvc repro` then runs when the edit changes",
        "their outputs — measured directly for the keys in **bold** (one per params group); for the others",
        "it is the measured set of a key with the same invalidated stages (keys of one row of the test's",
        "`RERUN` table were edited together). DVC stops early when a stage's",
        "new outputs are byte-identical to the cached ones: e.g. `index.nprobe` with a flat index",
        "reruns `retrieve` only (same retrievals, so `evaluate` is skipped). Reverting any edit reruns",
        "nothing: DVC's run-cache restores the previous outputs.",
        "",
        "| key | invalidated (`dvc status`) | reruns (`dvc repro`, when outputs change) |",
        "|---|---|---|",
    ]
    for key in EXPECTED:
        inval = st[key]
        if key in rr:
            rerun = f"**{_fmt(rr[key])}**"
            name = f"**`{key}`**"
        else:
            base = widest.get(frozenset(inval))
            if base is None:  # e.g. gradients.max_length: the encode set plus its own evaluate
                base = set().union(*(v for d, v in widest.items() if d <= frozenset(inval) and d)) | inval
            rerun, name = _fmt(base), f"`{key}`"
        lines.append(f"| {name} | {_fmt(inval)} | {rerun} |")
    lines += ["", "Notes:", "",
              "- `encode.batch_size` does not enter the result in exact arithmetic, but the batch shape changes",
              "  float32 rounding (last bits), so the encodings and everything after them are recomputed.",
              "  `encode.device: cpu` instead of `auto` on a CPU-only machine gives identical encodings (only",
              "  `moments` and `encode@*` rerun); on a GPU machine it changes them.",
              "- `moments` reads `correction.kind`, `correction.estimate_samples`, `correction.seed`,",
              "  `gradients.max_length`, `encode.batch_size` and `encode.device`; unless `correction.kind` is",
              "  `estimated` it writes the same empty file, so nothing after it reruns on its account.",
              "- `data.corpus`, `data.queries` are read only with `data.source: files`; `model.checkpoint` only",
              "  with `model.source: checkpoint` or `finetune`. Editing them otherwise reruns `data` / `train`, whose outputs",
              "  come out identical, so nothing after them reruns.",
              "- `hessian.structure` and `hessian.memory_gb` pick the Hessian's blocks in `autocorrelation`; a",
              "  budget edit that leaves the chosen structure as it was gives identical statistics, so nothing",
              "  after it reruns. `encode@*` checks the same memory plan before encoding but does not read them",
              "  as params: editing them never re-encodes.",
              "- `report` (the viewer site) reads no params: it reruns exactly when the retrievals, the",
              "  predictions or `metrics/metrics.json` changed (e.g. `eval.seed` changes the random control's",
              "  metrics only, and the report shows them).",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    from trackstar.atomic import atomic_write_text

    atomic_write_text(DOC, invalidation_doc())
    print(f"wrote {DOC.relative_to(ROOT)}", file=sys.stderr)
