"""Sharing artifacts through DVC remotes: push, fresh `git clone`, `dvc pull`, nothing to recompute.

Two real remotes: a local directory, and S3 served by a moto server on 127.0.0.1 (no network).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.pipeline import dvc, free_port, git, repro

METRICS = ["metrics/metrics.json", "metrics/model.json", "metrics/hessian.json"]
PULLED = ["model/config.json", "encodings/raw/train.zarr/zarr.json", "encodings/final/query.zarr/zarr.json",
          "hessian/w_mix.safetensors", "index/meta.json", "retrievals/trackstar.jsonl", "data/corpus.jsonl"]


@pytest.fixture(scope="module")
def repo(copy_built):
    return copy_built("remote")


def round_trip(repo: Path, dest: Path, remote: str) -> Path:
    """push to `remote`, clone the git repo to dest, pull there; return the clone."""
    dvc(repo, "push", "-r", remote)
    assert json.loads(dvc(repo, "status", "--cloud", "-r", remote, "--json").stdout) == {}
    git(dest.parent, "clone", "-q", str(repo), dest.name)
    assert not (dest / "model").exists() and not (dest / ".dvc" / "cache").exists()  # git holds no artifacts
    dvc(dest, "pull", "-r", remote)
    for f in PULLED:
        assert (dest / f).is_file(), f
    assert json.loads(dvc(dest, "status", "--json").stdout) == {}
    for f in METRICS:
        assert (dest / f).read_bytes() == (repo / f).read_bytes(), f
    assert repro(dest) == [], "a pulled clone must not recompute anything"
    return dest


def test_local_directory_remote(repo, tmp_path):
    store = tmp_path / "trackstar-remote"
    dvc(repo, "remote", "add", "-d", "local", str(store))
    git(repo, "commit", "-qam", "local remote")
    clone = round_trip(repo, tmp_path / "clone", "local")
    assert any((store / "files" / "md5").rglob("*")), "nothing was pushed"
    # the clone pushes to the same remote without re-uploading anything
    assert "Everything is up to date" in dvc(clone, "push").stdout


def test_s3_remote_served_by_moto(repo, tmp_path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = free_port()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_SESSION_TOKEN": "testing"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="trackstar")
        dvc(repo, "remote", "add", "s3remote", "s3://trackstar/cache")
        dvc(repo, "remote", "modify", "s3remote", "endpointurl", endpoint)
        git(repo, "commit", "-qam", "s3 remote")
        round_trip(repo, tmp_path / "clone", "s3remote")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="trackstar", Prefix="cache/").get("Contents", [])]
        assert any(k.startswith("cache/files/md5/") for k in keys), keys
    finally:
        server.stop()
