"""encode and autocorrelation under torchrun with 2 CPU processes (gloo): each rank writes its own whole
chunks and the store equals the single-process one; the Hessian statistics are an all-reduce of
per-rank sums, so R, lambda and the whitening equal the single-process run. The same on two nodes
(`torchrun --nnodes 2 --nproc_per_node 1`, two launchers on 127.0.0.1 meeting by static rendezvous): the
store byte for byte, R to float32 accuracy."""

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.pipeline import free_port, make_repo, repro, run
from trackstar.hessian.whitening import load_basis, load_whitening, train_whitening
from trackstar.store import StoreReader


def factors(repo) -> dict[str, np.ndarray]:
    """The dense W of the mixed whitening the `hessian` stage wrote and of the train-only one the ladder
    builds, dense (float64)."""
    mix, meta = load_whitening(repo / "hessian/w_mix.safetensors", repo / "hessian/eigen.safetensors")
    train = train_whitening(load_basis(repo / "hessian/eigen.safetensors")[0], meta["damping"])
    return {"w_mix": mix.matrix(), "w_train": train.matrix()}


def two_nodes(repo, *script: str) -> list[str]:
    """`torchrun --nnodes 2 --nproc_per_node 1 script` as two launchers (node ranks 0 and 1) on 127.0.0.1, static
    rendezvous at one free port, as two machines would start it; both launchers' stdout."""
    port = str(free_port())

    def node(rank: int) -> str:
        return run(repo, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(rank), "--rdzv-backend", "static", "--master_addr", "127.0.0.1",
                   "--master_port", port, *script).stdout

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(node, (0, 1)))


def test_two_process_encode_equals_single_process(tmp_path):
    # train_sample 25 ends inside a chunk of ~10 rows: the row limit must hold across ranks
    # damping 0.1: with N = 25 rows in d = 240 the damped R stays well conditioned, so float32 eigensolver
    # rounding (torchrun runs LAPACK on 1 thread, the plain run on 2) is not amplified into W
    repo = make_repo(tmp_path / "repo", {"encode": {"chunk_mb": 0.01},
                                         "hessian": {"mix_k": 5, "train_sample": 25, "damping": 0.1}})
    repro(repo, "encode@train")
    single = StoreReader(repo / "encodings/raw/train.zarr")
    assert single.n // single.chunk_rows >= 3
    want = {a: StoreReader(repo / "encodings/raw/train.zarr", array=a).read_all() for a in ("g", "g_plain")}
    shutil.move(repo / "encodings/raw/train.zarr", tmp_path / "single.zarr")
    out = run(repo, sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
              "stages/encode.py", "train")
    assert '"chunks"' in out.stdout
    for a in ("g", "g_plain"):
        got = StoreReader(repo / "encodings/raw/train.zarr", array=a).read_all()
        np.testing.assert_allclose(got, want[a], rtol=1e-5, atol=1e-6 * np.abs(want[a]).max())
    attrs = StoreReader(repo / "encodings/raw/train.zarr").attrs
    assert attrs["complete"] and attrs["d"] == single.d

    # two nodes of one process each: one store, its rows byte for byte the single process's (each process runs
    # as many threads as the single one: torchrun limits OMP threads only with several processes per node)
    shutil.rmtree(repo / "encodings/raw/train.zarr")
    outs = two_nodes(repo, "stages/encode.py", "train")
    assert '"chunks"' in outs[0] and '"chunks"' not in outs[1]  # rank 0 (node 0) finalizes and reports
    for a in ("g", "g_plain"):
        np.testing.assert_array_equal(StoreReader(repo / "encodings/raw/train.zarr", array=a).read_all(), want[a])

    # autocorrelation: single process, then torchrun with 2 ranks over the same stores; then the
    # Hessian factors from each
    run(repo, sys.executable, "stages/encode.py", "query")
    run(repo, sys.executable, "stages/autocorrelation.py")
    run(repo, sys.executable, "stages/eigen.py")
    run(repo, sys.executable, "stages/hessian.py")
    want_r = load_file(repo / "hessian/stats.safetensors")
    want_w = factors(repo)
    want_meta = json.loads((repo / "hessian/hessian.json").read_text())
    shutil.rmtree(repo / "hessian")
    run(repo, sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "stages/autocorrelation.py")
    run(repo, sys.executable, "stages/eigen.py")
    run(repo, sys.executable, "stages/hessian.py")
    got_r = load_file(repo / "hessian/stats.safetensors")
    got_meta = json.loads((repo / "hessian/hessian.json").read_text())
    assert got_meta["n_train"] == want_meta["n_train"] == 25 and got_meta["n_eval"] == want_meta["n_eval"]
    assert got_meta["lambda"] == pytest.approx(want_meta["lambda"], rel=1e-5)
    # float32 chunk products (BLAS blocks them differently at 1 thread per rank than at 2), summed in
    # float64 in another order: equal to float32 accuracy
    assert set(got_r) == set(want_r) and "r_train.0" in want_r  # per-block statistics, same blocks
    for key in want_r:
        np.testing.assert_allclose(got_r[key], want_r[key], rtol=1e-5, atol=1e-6 * np.abs(want_r[key]).max())
    got_w = factors(repo)
    for key in ("w_mix", "w_train"):  # float32 eigensolves: W^T W (what the scores use) equal to float32 accuracy
        got, want = got_w[key], want_w[key]
        err = np.linalg.norm(got.T @ got - want.T @ want) / np.linalg.norm(want.T @ want)
        assert err < 1e-3, (key, err)

    # two nodes: R within the same tolerance
    two_nodes(repo, "stages/autocorrelation.py")
    got_r = load_file(repo / "hessian/stats.safetensors")
    assert set(got_r) == set(want_r)
    for key in want_r:
        np.testing.assert_allclose(got_r[key], want_r[key], rtol=1e-5, atol=1e-6 * np.abs(want_r[key]).max())
