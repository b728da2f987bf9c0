"""Shared fixtures for the end-to-end DVC tests (invalidation, determinism, remotes).

A full tiny `dvc repro` costs a minute or more on a small CI machine, so it is built once per
session and each test module works on its own copy (the copy carries `.dvc/cache`, including
the run-cache, so it is a complete, independent DVC repo).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.pipeline import git, make_repo, repro

# Tiny-params overrides on top of tests.pipeline.TINY used by the shared build.
# index.nlist 4 / nprobe 2: the IVF index of the invalidation test must hold >= k rows in the
# probed lists at this size (72 passages); eval.tail_patch_queries 2 keeps `evaluate` cheap.
SHARED_OVERRIDES = {"index": {"nlist": 4, "nprobe": 2}, "eval": {"tail_patch_queries": 2}}

ALL_STAGES = ["data", "train", "moments", "encode@train", "encode@query", "autocorrelation", "eigen", "hessian", "precondition@train",
              "precondition@query", "index", "retrieve", "ladder", "bm25", "evaluate"]


def commit_all(repo: Path, message: str) -> None:
    """Commit what `dvc repro` leaves for git: dvc.lock, .gitignore files, git-tracked metrics/plots."""
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)


@pytest.fixture(scope="session")
def built_repo(tmp_path_factory) -> Path:
    """A pristine tiny repo after one full `dvc repro`, committed. Never modify it: use copy_built."""
    repo = make_repo(tmp_path_factory.mktemp("built") / "repo", SHARED_OVERRIDES)
    ran = repro(repo)
    assert sorted(ran) == sorted(ALL_STAGES)
    commit_all(repo, "repro")
    return repo


@pytest.fixture(scope="session")
def copy_built(built_repo, tmp_path_factory):
    """copy_built(name) -> an independent copy of built_repo (git history, workspace and DVC cache)."""

    def copy(name: str) -> Path:
        dest = tmp_path_factory.mktemp(name) / "repo"
        shutil.copytree(built_repo, dest, symlinks=True)
        shutil.rmtree(dest / ".dvc" / "tmp", ignore_errors=True)  # state db / locks keyed by the old path
        return dest

    return copy
