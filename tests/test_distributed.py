"""encode under torchrun with 2 CPU processes (gloo): each rank writes its own whole chunks,
and the store equals the single-process one."""

import shutil
import sys

import numpy as np

from tests.pipeline import make_repo, repro, run
from trackstar.store import StoreReader


def test_two_process_encode_equals_single_process(tmp_path):
    repo = make_repo(tmp_path / "repo", {"encode": {"chunk_mb": 0.01}})
    repro(repo, "encode@train")
    single = StoreReader(repo / "encodings/raw/train.zarr")
    assert single.n // single.chunk_rows >= 3
    want = {a: StoreReader(repo / "encodings/raw/train.zarr", array=a).read_all() for a in ("g", "g_plain")}
    shutil.move(repo / "encodings/raw/train.zarr", tmp_path / "single.zarr")
    out = run(repo, sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
              "stages/encode.py", "train")
    assert '"chunks"' in out.stdout
    for a in ("g", "g_plain"):
        got = StoreReader(repo / "encodings/raw/train.zarr", array=a).read_all()
        np.testing.assert_allclose(got, want[a], rtol=1e-5, atol=1e-6 * np.abs(want[a]).max())
    attrs = StoreReader(repo / "encodings/raw/train.zarr").attrs
    assert attrs["complete"] and attrs["d"] == single.d
