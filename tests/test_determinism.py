"""Determinism on CPU: two independent tiny repos with the same params give bit-identical results.

The shared session build (tests/conftest.py) is one run; the second is a fresh `git clone` of it
(same sources and params even while tests/ and trackstar/ are being edited; no DVC cache, so no
run-cache) reproduced from scratch here, then every artifact is compared.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from tests.conftest import ALL_STAGES
from tests.pipeline import git, repro

STORES = ["encodings/raw/train.zarr", "encodings/raw/query.zarr", "encodings/final/train.zarr",
          "encodings/final/query.zarr"]
FILES = ["data/corpus.jsonl", "data/queries.jsonl", "retrievals/trackstar.jsonl", "retrievals/bm25.jsonl",
         "hessian/stats.safetensors", "hessian/eigen.safetensors", "hessian/w_mix.safetensors", "hessian/hessian.json",
         "metrics/metrics.json", "metrics/methods.csv"]
# metrics files that carry wall-clock timings (excluded from byte comparison; other fields compared)
TIMED = {"metrics/model.json": "eval_seconds", "metrics/hessian.json": "seconds"}


def store_digest(path: Path) -> tuple[str, dict]:
    """sha256 over every array's dtype, shape and bytes, and the store attrs (canonical JSON)."""
    group = zarr.open_group(str(path), mode="r")
    h = hashlib.sha256()
    arrays = {}
    for name in sorted(group.array_keys()):
        a = np.asarray(group[name][...])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
        arrays[name] = a.shape
    attrs = json.dumps(dict(group.attrs), sort_keys=True)
    h.update(attrs.encode())
    return h.hexdigest(), arrays


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def locked_outs(repo: Path) -> dict[str, str]:
    """{output path: md5} of every stage output recorded in dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o.get("md5") for st in lock["stages"].values() for o in st.get("outs", [])}


@pytest.fixture(scope="module")
def second(built_repo, tmp_path_factory):
    parent = tmp_path_factory.mktemp("determinism")
    git(parent, "clone", "-q", str(built_repo), "repo")
    repo = parent / "repo"
    assert not (repo / ".dvc" / "cache").exists() and not (repo / "model").exists()
    # the git-tracked (cache: false) metrics and plots came with the clone; without them evaluate
    # would be skipped when its deps come out identical
    for f in [*TIMED, "metrics/metrics.json", "metrics/methods.csv", "metrics/methods.png"]:
        (repo / f).unlink()
    assert sorted(repro(repo)) == sorted(ALL_STAGES)  # outputs missing, no cache: every stage runs
    return repo


def test_encodings_are_bit_identical(built_repo, second):
    for store in STORES:
        da, shapes = store_digest(built_repo / store)
        db, _ = store_digest(second / store)
        assert shapes and da == db, store


def test_retrievals_and_metrics_are_identical(built_repo, second):
    for f in FILES + sorted(str(p.relative_to(built_repo)) for p in (built_repo / "retrievals/ladder").glob("*")):
        assert sha(built_repo / f) == sha(second / f), f
    for f, timing in TIMED.items():
        a, b = (json.loads((r / f).read_text()) for r in (built_repo, second))
        for m in (a, b):
            m.pop(timing)
            tp = m.get("tail_patch", {})  # tail-patch's plan: seconds measured on the probe, and the estimate
            tp.pop("estimate_s", None)
            for k in ("seconds_per_passage", "seconds_per_pair"):
                tp.get("probe", {}).pop(k, None)
        assert a == b, f


def test_every_cached_output_has_the_same_hash(built_repo, second):
    a, b = locked_outs(built_repo), locked_outs(second)
    assert set(a) == set(b)
    differ = sorted(p for p in a if a[p] != b[p] and p not in TIMED)
    assert not differ, f"outputs differ between two runs with the same params: {differ}"
