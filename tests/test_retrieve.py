"""Streaming exact search equals brute force; FAISS flat and IVF with rerank agree with it."""

import numpy as np
import pytest

from trackstar.retrieval.index import _rerank, build_index, factory_string, load_index, save_index, search
from trackstar.retrieval.results import valid_hits
from trackstar.retrieval.exact import exact_search
from trackstar.store import StoreReader, StoreWriter, StoreSpec


def _store(tmp_path, x, chunk_mb=0.002):
    w = StoreWriter(tmp_path / "s.zarr", tmp_path / "work", StoreSpec(len(x), x.shape[1], ["g"], chunk_mb=chunk_mb))
    w.prepare()
    for c in w.pending():
        a, b = w.chunk_range(c)
        w.write_chunk(c, {"g": x[a:b]})
    w.finalize()
    return StoreReader(tmp_path / "s.zarr")


def test_exact_search_matches_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(257, 16)).astype(np.float32)
    q = rng.normal(size=(9, 16)).astype(np.float32)
    store = _store(tmp_path, x)
    assert store.chunk_rows < 257  # several chunks
    ts, ti, bs, bi = exact_search(q, store.iter_chunks(), 7, query_batch=4)
    s = q @ x.T
    np.testing.assert_array_equal(ti, np.argsort(-s, axis=1, kind="stable")[:, :7])
    np.testing.assert_array_equal(bi, np.argsort(s, axis=1, kind="stable")[:, :7])
    np.testing.assert_allclose(ts, np.take_along_axis(s, ti, 1), rtol=1e-5)


def test_exact_search_breaks_ties_toward_the_lower_row(tmp_path):
    """Scores with many exact ties (small integers): the partial selection per chunk must return the same
    rows as a stable sort of all scores, within chunks and across chunk boundaries."""
    rng = np.random.default_rng(5)
    x = rng.integers(-1, 2, size=(300, 3)).astype(np.float32)
    q = rng.integers(-1, 2, size=(8, 3)).astype(np.float32)
    store = _store(tmp_path, x, chunk_mb=0.0005)
    assert store.n // store.chunk_rows >= 5
    s = q @ x.T
    for k in (1, 7, 40):
        ts, ti, bs, bi = exact_search(q, store.iter_chunks(), k, query_batch=3)
        np.testing.assert_array_equal(ti, np.argsort(-s, axis=1, kind="stable")[:, :k])
        np.testing.assert_array_equal(bi, np.argsort(s, axis=1, kind="stable")[:, :k])
        np.testing.assert_array_equal(ts, np.take_along_axis(s, ti, 1))


def test_faiss_flat_and_ivf_rerank_match_exact(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:20] + 0.05 * rng.normal(size=(20, 32)).astype(np.float32)
    store = _store(tmp_path, x)
    _, want, _, want_bot = exact_search(q, store.iter_chunks(), 5)
    flat = build_index(store, "flat", progress=False)
    _, got, _, got_bot = search(flat, q, 5)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_bot, want_bot)
    ivf = build_index(store, "ivf_pq", nlist=8, pq_m=8, pq_bits=6, progress=False)
    ts, ti, _, _ = search(ivf, q, 5, nprobe=8, rerank=50, store=store)
    assert (ti[:, 0] == want[:, 0]).mean() == 1.0
    np.testing.assert_allclose(ts, np.take_along_axis(q @ x.T, ti, 1), rtol=1e-5)  # exact rescored


@pytest.mark.parametrize("bits, factory", [(4, "PQ8x4fs"), (8, "PQ8x8")])
def test_pq_scan_with_full_rerank_is_exact(tmp_path, bits, factory):
    """kind pq (no coarse quantizer; 4-bit codes in the fast-scan layout): rescoring every candidate from
    the store gives the exact top and bottom k, whatever the code error; a partial rerank, batched over
    queries, gives the exact scores of the rows it keeps and the same rows at every batch size."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.normal(size=(11, 32)).astype(np.float32)  # not near any row: TrackStar's case
    store = _store(tmp_path, x)
    assert factory_string("pq", 32, 0, 8, bits, False) == factory
    # IVF lists in fast-scan layout too, except on disk (FAISS cannot merge blocked lists into a file)
    assert factory_string("ivf_pq", 32, 8, 8, bits, True) == f"OPQ8,IVF8,{factory}"
    assert factory_string("ivf_pq", 32, 8, 8, bits, False, on_disk=True) == f"IVF8,PQ8x{bits}"
    index = build_index(store, "pq", pq_m=8, pq_bits=bits, train_sample=300, progress=False)
    ts, ti, bs, bi = search(index, q, 6, rerank=300, store=store)
    want = exact_search(q, store.iter_chunks(), 6)
    for got, exp in zip((ti, bi), (want[1], want[3])):
        np.testing.assert_array_equal(got, exp)
    np.testing.assert_allclose(ts, want[0], rtol=1e-5)
    _, cand = index.search(q, 40)
    _, cand_bottom = index.search(-q, 40)
    cand_bottom[0, -5:] = -1  # a candidate list shorter than asked (IVF padding): never chosen
    one = _rerank(q, cand, cand_bottom, store, 6, batch=64)
    for batch in (1, 4):
        top, bottom = _rerank(q, cand, cand_bottom, store, 6, batch=batch)
        for got, want, c, sign in ((top, one[0], cand, -1), (bottom, one[1], cand_bottom, 1)):
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_allclose(got[0], np.take_along_axis(q @ x.T, got[1], 1), rtol=1e-5)
            # the best k of the candidates, by exact score
            key = np.where(c >= 0, sign * np.take_along_axis(q @ x.T, np.maximum(c, 0), 1), np.inf)  # missing: last
            best = np.sort(key, axis=1)[:, :6] * sign
            np.testing.assert_allclose(got[0], best, rtol=1e-5)


def test_underfilled_ivf_search_pads_with_marked_rows(tmp_path):
    """nprobe=1 over tiny lists cannot return k rows: the gaps are row -1 / NaN, and valid_hits drops them."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    store = _store(tmp_path, x)
    ivf = build_index(store, "ivf_flat", nlist=16, progress=False)
    ts, ti, bs, bi = search(ivf, x[:4], 30, nprobe=1)
    assert (ti < 0).any()  # 64 rows / 16 lists: one probed list holds < 30 rows
    assert np.isnan(ts[ti < 0]).all() and not np.isnan(ts[ti >= 0]).any()
    for qi in range(4):
        s, r = valid_hits(ts[qi], ti[qi])
        assert (r >= 0).all() and len(r) == (ti[qi] >= 0).sum()
        np.testing.assert_allclose(s, x[r] @ x[qi], rtol=1e-5)


@pytest.mark.parametrize("pca", [0, 8])
def test_on_disk_ivf_equals_in_memory_and_survives_a_move(tmp_path, pca):
    """Inverted lists merged into a memory-mapped file give the same results as the in-memory index,
    also after the index directory moves (as on a DVC checkout into another clone); also behind index.pca."""
    from trackstar.retrieval.index import _on_disk

    rng = np.random.default_rng(3)
    x = rng.normal(size=(700, 16)).astype(np.float32)
    store = _store(tmp_path, x)
    mem = build_index(store, "ivf_pq", nlist=8, pq_m=4, pq_bits=6, progress=False, pca=pca)
    disk = build_index(store, "ivf_pq", nlist=8, pq_m=4, pq_bits=6, progress=False,
                       on_disk=tmp_path / "ix", block_rows=150, pca=pca)
    assert _on_disk(disk) and not _on_disk(mem) and disk.ntotal == 700
    save_index(disk, tmp_path / "ix", {"on_disk": True})
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == ["index.faiss", "lists.ivfdata", "meta.json"]
    del disk
    (tmp_path / "ix").rename(tmp_path / "moved")
    loaded, meta = load_index(tmp_path / "moved", expect={"on_disk": True})
    q = x[:10] + 0.1 * rng.normal(size=(10, 16)).astype(np.float32)
    for a, b in zip(search(mem, q, 7, nprobe=3), search(loaded, q, 7, nprobe=3)):
        np.testing.assert_array_equal(a, b)


def test_pca_to_the_passage_span_keeps_scores_exact_and_codes_better(tmp_path):
    """index.pca at the passages' rank: every score is exact (queries' energy outside the span cannot change a
    score), and a PQ code behind it, with half the bytes, tracks the exact scores far better than the same code
    over all d dimensions, whose error meets the queries' out-of-span part (the default pipeline's case)."""
    rng = np.random.default_rng(7)
    d, rank, n = 128, 64, 400
    basis = np.linalg.qr(rng.normal(size=(d, rank)))[0].astype(np.float32)
    x = rng.normal(size=(n, rank)).astype(np.float32) @ basis.T
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    inside = rng.normal(size=(12, rank)).astype(np.float32) @ basis.T
    q = 0.1 * inside + (outside := rng.normal(size=(12, d)).astype(np.float32)) - (outside @ basis) @ basis.T
    store = _store(tmp_path, x)
    exact = q @ x.T
    with pytest.raises(ValueError, match="index.pq_m=24 must divide index.pca=64"):
        build_index(store, "pq", pq_m=24, pq_bits=4, pca=rank, progress=False)
    with pytest.raises(ValueError, match=r"index.pca=200 must be 0 \(off\) or at most d=128"):
        build_index(store, "flat", pca=200, progress=False)
    with pytest.raises(ValueError, match=r"index.pca=64 .* training rows \(50: index.train_sample=50"):
        build_index(store, "flat", pca=rank, train_sample=50, progress=False)
    with pytest.raises(ValueError, match=r"index.pca=65 exceeds the rank of the 100 training rows \(64\)"):
        build_index(store, "flat", pca=rank + 1, train_sample=100, progress=False)
    flat = build_index(store, "flat", pca=rank, progress=False)
    ts, ti, bs, bi = search(flat, q, 10)
    want = exact_search(q, store.iter_chunks(), 10)
    np.testing.assert_array_equal(ti, want[1])
    np.testing.assert_array_equal(bi, want[3])
    np.testing.assert_allclose(ts, want[0], atol=1e-5)
    save_index(flat, tmp_path / "index", {"pca": rank})  # the transform travels in the index file
    np.testing.assert_array_equal(search(load_index(tmp_path / "index")[0], q, 10)[1], ti)

    def corr(index):
        est, ids = index.search(q, n)
        return np.mean([np.corrcoef(e, s[i])[0, 1] for e, s, i in zip(est, exact, ids)])

    with_pca = corr(build_index(store, "pq", pq_m=16, pq_bits=4, pca=rank, progress=False))  # 8 bytes a row
    without = corr(build_index(store, "pq", pq_m=32, pq_bits=4, progress=False))  # 16 bytes a row
    assert with_pca > 0.75 and without < 0.5, (with_pca, without)
