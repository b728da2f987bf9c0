"""Crash-resume of the encode stage: SIGKILL at chunk boundaries and mid-chunk, then resume.

One tiny repo whose training corpus spans 5 chunks. The uninterrupted `dvc repro encode@train`
is the reference; every killed run must leave no store at the output path (or one StoreReader
refuses), keep the chunks finished before it untouched, and the run that completes must produce a
store bit-identical to the reference, writing only the chunks that were not finished yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.pipeline import make_repo, repro, run
from trackstar.errors import TrackStarError
from trackstar.store import StoreReader

OUT = "encodings/raw/train.zarr"
WORK = ".work/encode-train"
N_CHUNKS = 6  # 96 passages (the tiny world with its confusers) of d = 240 fp32 rows, 16 rows a chunk (chunk_mb below)


def store_content(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """Hash of the arrays' bytes and the attrs (not file mtimes), and the arrays themselves."""
    g = zarr.open_group(str(path), mode="r")
    attrs = dict(g.attrs)
    h = hashlib.sha256(json.dumps(attrs, sort_keys=True).encode())
    arrays = {}
    for name in attrs["arrays"]:
        a = g[name][:]
        h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
        arrays[name] = a
    return h.hexdigest(), arrays


def done_state(repo: Path) -> dict[int, tuple]:
    """Finished chunks of the work store: marker + data-file identities (inode, mtime_ns, size)."""
    done = repo / WORK / "done"
    state = {}
    for p in done.glob("c*") if done.exists() else []:
        c = int(p.name[1:])
        files = [p] + [repo / WORK / "store.zarr" / a / "c" / str(c) / "0" for a in ("g", "g_plain")]
        state[c] = tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in map(os.stat, files))
    return state


def assert_no_usable_output(repo: Path) -> None:
    out = repo / OUT
    if out.exists():
        with pytest.raises(TrackStarError, match="incomplete"):
            StoreReader(out)


def expected_done(point: str) -> set[int]:
    where, c = point.split(":")
    c = int(c)
    return set(range(c + 1 if where == "after_write" else c))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    r = make_repo(tmp_path_factory.mktemp("resume") / "repo",
                  {"encode": {"chunk_mb": 0.015}, "train": {"epochs": 1}})
    assert repro(r, "encode@train") == ["data", "train", "moments", "encode@train"]
    return r


@pytest.fixture(scope="module")
def reference(repo):
    reader = StoreReader(repo / OUT)
    assert reader.attrs["chunk_rows"] * (N_CHUNKS - 1) < reader.n <= reader.attrs["chunk_rows"] * N_CHUNKS
    digest, arrays = store_content(repo / OUT)
    for a in arrays.values():  # rows are distinct and non-empty, so a lost/duplicated row cannot hide
        assert len({row.tobytes() for row in a}) == len(a) and np.abs(a).sum(axis=1).min() > 0
    return digest, arrays


def check_identical(repo: Path, reference) -> int:
    """Final store equals the reference bit for bit; returns the number of rows that differ (lost)."""
    digest, ref = reference
    StoreReader(repo / OUT)  # complete and readable
    got_digest, got = store_content(repo / OUT)
    lost = 0
    for name, a in ref.items():
        assert got[name].shape == a.shape
        lost += int(np.sum(np.any(got[name] != a, axis=1)))
    assert lost == 0, f"{lost} rows differ from the uninterrupted run"
    assert got_digest == digest
    assert not (repo / WORK).exists(), "work dir not cleaned up after finalize"
    return lost


# A chain of killed runs, each resuming the one before, then a clean run. The kill points cover
# before/mid_write of chunk 0 and of a middle chunk, and a kill under `dvc repro` (DVC deletes the
# output before running the stage, but .work/ is not an output, so the next run resumes). The second
# test kills after_write of the last chunk (every chunk written, store not finalized) and resumes
# through `dvc repro`. Chains keep the file under 2 min: each process pays ~8 s of torch/transformers
# imports on a shared CPU.
CHAIN = [("script", "before_write:0"), ("script", "mid_write:0"), ("script", "before_write:2"),
         ("script", "mid_write:2"), ("dvc", "mid_write:3")]


def run_stage(repo: Path, how: str, kill_at: str | None) -> tuple[int, str]:
    """Run encode@train (the script, or `dvc repro -f`); returns (returncode, stdout + stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "TRACKSTAR_KILL_AT"}
    if kill_at:
        env["TRACKSTAR_KILL_AT"] = kill_at
    cmd = ([sys.executable, "stages/encode.py", "train"] if how == "script"
           else [sys.executable, "-m", "dvc", "repro", "-f", "-s", "encode@train"])
    proc = run(repo, *cmd, check=False, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def killed_run(repo: Path, how: str, point: str) -> None:
    """One run killed at `point`: no usable output, finished chunks kept untouched, the expected ones added."""
    before = done_state(repo)
    rc, log = run_stage(repo, how, point)
    if how == "script":
        assert rc == -signal.SIGKILL, (point, rc, log[-3000:])
    else:  # DVC ran the stage and reports the killed command as failed
        assert rc != 0 and "Running stage 'encode@train'" in log, (point, rc, log[-3000:])
    assert_no_usable_output(repo)
    after = done_state(repo)
    assert set(after) == expected_done(point), (point, sorted(after))
    for c, ident in before.items():  # finished chunks were skipped, not rewritten
        assert after[c] == ident, f"{point}: finished chunk {c} was rewritten"
    if before:
        assert f"resuming: {len(before)}/{N_CHUNKS} chunks already written" in log, (point, log[-3000:])


def clean_run(repo: Path, how: str) -> dict:
    """The run without a kill: resumes, writes only the unfinished chunks; returns its JSON summary."""
    before = done_state(repo)
    rc, log = run_stage(repo, how, None)
    assert rc == 0, log[-3000:]
    if how == "dvc":
        assert "Running stage 'encode@train'" in log  # really ran (not restored from the cache)
    assert f"resuming: {len(before)}/{N_CHUNKS} chunks already written" in log
    summary = json.loads(next(line for line in log.splitlines() if line.startswith("{") and '"rows"' in line))
    assert summary["chunks"] == N_CHUNKS and summary["written"] == N_CHUNKS - len(before), summary
    return summary


def fresh_start(repo: Path) -> None:
    shutil.rmtree(repo / OUT, ignore_errors=True)  # what DVC does before running the stage
    shutil.rmtree(repo / WORK, ignore_errors=True)


def test_encode_survives_sigkills_and_resumes_bit_identically(repo, reference):
    fresh_start(repo)
    for how, point in CHAIN:
        killed_run(repo, how, point)
    assert clean_run(repo, "script")["written"] == N_CHUNKS - 3
    assert check_identical(repo, reference) == 0  # rows lost


def test_kill_after_last_chunk_resumes_through_dvc_repro(repo, reference):
    lock = (repo / "dvc.lock").read_text()
    fresh_start(repo)
    killed_run(repo, "script", f"after_write:{N_CHUNKS - 1}")
    assert clean_run(repo, "dvc")["written"] == 0
    assert check_identical(repo, reference) == 0
    assert (repo / "dvc.lock").read_text() == lock  # DVC records the same output hash as the uninterrupted run
