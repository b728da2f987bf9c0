"""Streaming exact search equals brute force (also over query blocks, and as the pipeline's flat index, with a
bounded working set); FAISS flat and IVF with rerank agree with it."""

import json
import tracemalloc

import numpy as np
import pytest

from trackstar import layout
from trackstar.config import IndexParams, Params, RetrieveParams
from trackstar.errors import ArtifactMismatch
from trackstar.retrieval.exact import exact_search, search_blocks
from trackstar.retrieval.index import _rerank, build_index, factory_string, load_index, save_index, search
from trackstar.retrieval.results import valid_hits
from trackstar.retrieval.searcher import trackstar_search, write_index
from trackstar.store import ConcatReader, StoreReader, StoreSpec, StoreWriter


def _build(store, out=None, block_rows=262_144, **params):
    return build_index(store, IndexParams(**params), out, progress=False, block_rows=block_rows)


def _store(tmp_path, x, chunk_mb=0.002, name="s.zarr", attrs=None):
    spec = StoreSpec(len(x), x.shape[1], ["g"], chunk_mb=chunk_mb, attrs=attrs or {})
    w = StoreWriter(tmp_path / name, tmp_path / f"work-{name}", spec)
    w.prepare()
    for c in w.pending():
        a, b = w.chunk_range(c)
        w.write_chunk(c, {"g": x[a:b]})
    w.finalize()
    return StoreReader(tmp_path / name)


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
    flat = _build(store, kind="flat")
    _, got, _, got_bot = search(flat, q, 5)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_bot, want_bot)
    ivf = _build(store, kind="ivf_pq", nlist=8, pq_m=8, pq_bits=6)
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
    assert factory_string(IndexParams(kind="pq", pq_m=8, pq_bits=bits), 32) == factory
    # IVF lists in fast-scan layout too, except on disk (FAISS cannot merge blocked lists into a file)
    ivf = dict(kind="ivf_pq", nlist=8, pq_m=8, pq_bits=bits)
    assert factory_string(IndexParams(**ivf, opq=True), 32) == f"OPQ8,IVF8,{factory}"
    assert factory_string(IndexParams(**ivf, on_disk=True), 32) == f"IVF8,PQ8x{bits}"
    index = _build(store, kind="pq", pq_m=8, pq_bits=bits, train_sample=300)
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
    ivf = _build(store, kind="ivf_flat", nlist=16)
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
    mem = _build(store, kind="ivf_pq", nlist=8, pq_m=4, pq_bits=6, pca=pca)
    disk = _build(store, tmp_path / "ix", 150, kind="ivf_pq", nlist=8, pq_m=4, pq_bits=6, on_disk=True, pca=pca)
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
        _build(store, kind="pq", pq_m=24, pq_bits=4, pca=rank)
    with pytest.raises(ValueError, match=r"index.pca=200 must be 0 \(off\) or at most d=128"):
        _build(store, kind="flat", pca=200)
    with pytest.raises(ValueError, match=r"index.pca=64 .* training rows \(50: index.train_sample=50"):
        _build(store, kind="flat", pca=rank, train_sample=50)
    with pytest.raises(ValueError, match=r"index.pca=65 exceeds the rank of the 100 training rows \(64\)"):
        _build(store, kind="flat", pca=rank + 1, train_sample=100)
    flat = _build(store, kind="flat", pca=rank)
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

    with_pca = corr(_build(store, kind="pq", pq_m=16, pq_bits=4, pca=rank))  # 8 bytes a row
    without = corr(_build(store, kind="pq", pq_m=32, pq_bits=4))  # 16 bytes a row
    assert with_pca > 0.75 and without < 0.5, (with_pca, without)


def _in_ram(q, x, k):
    """The reference: every score in RAM (numpy), ranked by a stable sort, so equal scores keep the lower row first."""
    s = q @ x.T
    top, bottom = np.argsort(-s, axis=1, kind="stable")[:, :k], np.argsort(s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, top, 1), top, np.take_along_axis(s, bottom, 1), bottom


@pytest.mark.parametrize("ties", [False, True])
def test_query_blocks_streamed_over_store_chunks_equal_an_in_ram_search(tmp_path, ties):
    """Query blocks that cut across the query store's chunks, each one pass over a store of many chunks: the
    same top and bottom rows as an in-RAM search (exact ties: lowest row first), the same scores to float
    tolerance."""
    rng = np.random.default_rng(11)
    draw = (lambda n: rng.integers(-1, 2, size=(n, 4))) if ties else (lambda n: rng.normal(size=(n, 24)))
    x, q = draw(500).astype(np.float32), draw(23).astype(np.float32)
    row_mb = x.shape[1] * 4 / 2**20
    store = _store(tmp_path, x, chunk_mb=40 * row_mb)
    queries = ConcatReader([_store(tmp_path, q, chunk_mb=5 * row_mb, name="q.zarr").path])
    assert (store.chunk_rows, queries.parts[0].chunk_rows) == (40, 5)  # blocks of 7 queries cut across chunks
    for k in (1, 9, 60):
        got = search_blocks(queries, 7, lambda b: exact_search(b, store.iter_chunks(), k, query_batch=3))
        want = _in_ram(q, x, k)
        for g, w in zip(got[1::2], want[1::2]):
            np.testing.assert_array_equal(g, w)
        for g, w in zip(got[::2], want[::2]):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def _final_stores(root, x, q, chunk_mb=0.002):
    """Final train and query stores under a pipeline root, as precondition@{train,query} leave them."""
    attrs = {"whitening_id": "w1", "checkpoint_hash": "c1", "config": {"d": x.shape[1]}}
    for split, rows in (("train", x), ("query", q)):
        path = layout.final_store(split, root)
        _store(path.parent, rows, chunk_mb, name=path.name, attrs=attrs)


def test_flat_index_is_the_final_store_searched_in_place(tmp_path):
    """`index.kind: flat` writes only index/meta.json naming the final store; `retrieve` streams that store and
    gets the in-RAM search's rows; a full-probe IVF index (FAISS) agrees; a meta that disagrees is refused."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    q = rng.normal(size=(10, 16)).astype(np.float32)
    _final_stores(tmp_path, x, q)
    params = Params(retrieve=RetrieveParams(k=6, query_batch=4))
    meta = write_index(params.index, tmp_path)
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["meta.json"]
    assert meta["store"] == "encodings/final/train.zarr" and meta["rows"] == 300 and meta["whitening_id"] == "w1"
    got, want = trackstar_search(params, tmp_path), _in_ram(q, x, 6)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[3], want[3])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    ivf = Params(index=IndexParams(kind="ivf_flat", nlist=4, nprobe=4), retrieve=params.retrieve)
    assert "factory" in write_index(ivf.index, tmp_path) and (tmp_path / "index/index.faiss").exists()
    for a, b in zip(trackstar_search(ivf, tmp_path)[1::2], got[1::2]):
        np.testing.assert_array_equal(a, b)
    meta_path = tmp_path / "index/meta.json"
    meta_path.write_text(json.dumps({**meta, "rows": 299}))
    with pytest.raises(ArtifactMismatch, match=r"index: index meta 'rows' is 299, expected 300"):
        trackstar_search(params, tmp_path)


def test_streamed_retrieve_holds_one_chunk_and_one_query_block_not_the_stores(tmp_path, monkeypatch):
    """The working set of `retrieve` over a flat index is bounded by a chunk, a query block and the n × k
    results, whatever the stores' size: numpy's allocations (traced) peak at about 0.3 MiB for train stores of
    1 to 16 MiB in 64 KiB chunks; here under an eighth of an 8 MiB store, and neither store is read whole."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(16_384, 128)).astype(np.float32)  # 8 MiB in 64 KiB chunks
    q = rng.normal(size=(200, 128)).astype(np.float32)
    _final_stores(tmp_path, x, q, chunk_mb=1 / 16)
    params = Params(retrieve=RetrieveParams(k=5, query_batch=100))
    write_index(params.index, tmp_path)

    def refuse(self):
        raise AssertionError(f"{self.path} read whole")

    monkeypatch.setattr(StoreReader, "read_all", refuse)
    monkeypatch.setattr(ConcatReader, "read_all", refuse)
    tracemalloc.start()
    try:
        got = trackstar_search(params, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes / 8, f"peak {peak} bytes against a {x.nbytes}-byte store"
    np.testing.assert_array_equal(got[1], _in_ram(q, x, 5)[1])
