"""FAISS inner-product indexes over a preconditioned store: built by streaming chunks, searched
with optional exact rerank of ANN candidates read from the store grouped by chunk.

Kinds: flat (exact), ivf_flat, ivf_pq (optionally with OPQ), and pq: an exhaustive scan of PQ codes
with no coarse quantizer (4-bit codes use FAISS's SIMD fast-scan layout). IVF partitions passages by
their own clusters; TrackStar's whitened queries are nearly orthogonal to every passage, so they miss
the lists their best passages sit in, while a scan of compact codes plus an exact rerank does not
depend on that geometry (benchmarks/retrieval.py). An optional projection onto the passages' top
principal directions (uncentered, so inner products are kept) goes in front: lossless when it keeps
their whole span (N < d passages span N dimensions), and then a code spends its bits where scores are
decided, not on directions only the queries occupy (benchmarks/pipeline_ann.py). GPU FAISS is used
when present. The pipeline's `flat` kind without pca builds no FAISS copy of the store: it is searched
in place (`trackstar.retrieval.searcher`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from trackstar.atomic import atomic_path, atomic_write_text
from trackstar.config import IndexParams
from trackstar.errors import ArtifactMismatch
from trackstar.store import StoreReader

ON_DISK_LISTS = "lists.ivfdata"
RERANK_BUDGET = 256 << 20  # bytes of candidate rows `_rerank` reads at once


def factory_string(p: IndexParams, d: int) -> str:
    """The FAISS factory string of an index config over d dimensions. 4-bit PQ codes use the SIMD fast-scan
    layout, except with on-disk lists, which FAISS cannot merge in that (blocked) layout."""
    if p.kind == "flat":
        return "Flat"
    if p.kind == "ivf_flat":
        return f"IVF{p.nlist},Flat"
    if d % p.pq_m:
        raise ValueError(f"index.pq_m={p.pq_m} must divide d={d}")
    pq = f"PQ{p.pq_m}x{p.pq_bits}" + ("fs" if p.pq_bits == 4 and not p.on_disk else "")
    return (f"OPQ{p.pq_m}," if p.opq else "") + (pq if p.kind == "pq" else f"IVF{p.nlist},{pq}")


def principal_directions(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues of x^T x, descending; d x r orthonormal basis of its top r directions), uncentered, r the
    rank (eigenvalues above 1e-6 of the largest). The Gram matrix x x^T is the smaller eigenproblem when
    n < d (same nonzero spectrum); x^T u / sqrt(ev) of a null direction would be noise, not a unit vector."""
    x = np.asarray(x, dtype=np.float32)
    n, d = x.shape
    ev, vec = np.linalg.eigh(((x @ x.T) if n < d else (x.T @ x)).astype(np.float64))
    ev, vec = np.clip(ev[::-1], 0, None), vec[:, ::-1]
    rank = int(np.sum(ev > ev[0] * 1e-6))
    basis = (x.T.astype(np.float64) @ vec[:, :rank]) / np.sqrt(ev[:rank]) if n < d else vec[:, :rank]
    return ev, basis


def span_transform(sample: np.ndarray, dims: int):
    """A FAISS LinearTransform onto the sample's top `dims` principal directions. Uncentered (unlike
    FAISS's PCAMatrix, which subtracts the mean and so changes inner products): x -> V^T x keeps q.x for
    every x in the span, whatever part of q lies outside it."""
    _, basis = principal_directions(sample)
    if dims > basis.shape[1]:
        raise ValueError(f"index.pca={dims} exceeds the rank of the {len(sample)} training rows ({basis.shape[1]})")
    lt = faiss.LinearTransform(basis.shape[0], dims, False)
    faiss.copy_array_to_vector(np.ascontiguousarray(basis[:, :dims].T, dtype=np.float32).ravel(), lt.A)
    lt.is_trained = True
    return lt


def _gpu(index):
    """Move to GPU when faiss-gpu and a CUDA device are present; else unchanged."""
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        try:
            return faiss.index_cpu_to_gpu(res, 0, index), res
        except RuntimeError:  # a kind faiss-gpu lacks (e.g. fast-scan PQ): search on the CPU
            return index, None
    return index, None


def _training_sample(store: StoreReader, n: int, seed: int) -> np.ndarray:
    """A seeded row sample, read grouped by chunk."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(store.n, size=min(n, store.n), replace=False))
    return store.read_rows(rows)


def build_index(store: StoreReader, p: IndexParams, out: str | Path | None = None, progress: bool = True,
                block_rows: int = 262_144):
    """Train (if needed) on a row sample, then add the store chunk by chunk (bounded memory).

    With `p.on_disk` (IVF kinds only) the inverted lists go to `out/lists.ivfdata` (FAISS
    OnDiskInvertedLists, memory-mapped at search time), so the index may exceed RAM: rows are added in
    blocks of `block_rows` to temporary shard indexes that are then merged on disk.
    `p.pca` > 0: `span_transform` of the training sample to that many dimensions in front."""
    if p.on_disk and not p.kind.startswith("ivf"):
        raise ValueError(f"index.on_disk needs an IVF kind (ivf_flat or ivf_pq), not {p.kind}")
    if p.on_disk and out is None:
        raise ValueError("index.on_disk needs the index directory to write its lists to")
    if not 0 <= p.pca <= min(store.d, p.train_sample, store.n):
        raise ValueError(f"index.pca={p.pca} must be 0 (off) or at most d={store.d} and the training rows "
                         f"({min(p.train_sample, store.n)}: index.train_sample={p.train_sample}, {store.n} rows)")
    if p.pca and p.kind in ("ivf_pq", "pq") and p.pca % p.pq_m:
        raise ValueError(f"index.pq_m={p.pq_m} must divide index.pca={p.pca}")
    dim = p.pca or store.d
    index = faiss.index_factory(dim, factory_string(p, dim), faiss.METRIC_INNER_PRODUCT)
    if p.pca or not index.is_trained:
        faiss.seed_global_rng(p.seed) if hasattr(faiss, "seed_global_rng") else None
        sample = _training_sample(store, p.train_sample, p.seed)
        if p.pca:
            index = faiss.IndexPreTransform(span_transform(sample, p.pca), index)
        if not index.is_trained:
            index.train(sample)
    bar = tqdm(total=store.n, desc="index add", unit="row", disable=not progress or None, mininterval=2.0)
    if not p.on_disk:
        for _, x in store.iter_chunks():
            index.add(np.ascontiguousarray(x, dtype=np.float32))
            bar.update(len(x))
        bar.close()
        return index
    return _build_on_disk(index, store, Path(out), block_rows, bar)


def _build_on_disk(trained, store: StoreReader, out: Path, block_rows: int, bar):
    """Shard indexes of `block_rows` rows each (global ids), merged into one on-disk list file."""
    shards = out / "shards.tmp"
    shutil.rmtree(shards, ignore_errors=True)
    shards.mkdir(parents=True)
    files, block, pending = [], None, 0

    def flush():
        nonlocal block, pending
        if block is not None and block.ntotal:
            files.append(str(shards / f"s{len(files):05d}.faiss"))
            faiss.write_index(block, files[-1])
        block, pending = faiss.clone_index(trained), 0

    flush()
    for start, x in store.iter_chunks():
        block.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), np.arange(start, start + len(x), dtype=np.int64))
        pending += len(x)
        bar.update(len(x))
        if pending >= block_rows:
            flush()
    flush()
    bar.close()
    ivfs = []
    for f in files:
        part = faiss.read_index(f, faiss.IO_FLAG_MMAP)
        ivf = faiss.extract_index_ivf(part)
        ivfs.append(ivf.invlists)
        ivf.own_invlists = False  # the merged lists copy the entries; keep the readers alive until then
    index = faiss.clone_index(trained)
    target = faiss.extract_index_ivf(index)
    lists = faiss.OnDiskInvertedLists(target.nlist, target.code_size, str(out / ON_DISK_LISTS))
    vec = faiss.InvertedListsPtrVector()
    for iv in ivfs:
        vec.push_back(iv)
    ntotal = lists.merge_from_multiple(vec.data(), vec.size(), False)
    index.ntotal = target.ntotal = ntotal
    target.replace_invlists(lists, True)
    lists.this.disown()
    shutil.rmtree(shards, ignore_errors=True)
    return index


def save_index(index, path: str | Path, meta: dict) -> None:
    """Index file + meta json, each written atomically."""
    path = Path(path)
    with atomic_path(path / "index.faiss") as tmp:
        faiss.write_index(index, str(tmp))
    atomic_write_text(path / "meta.json", json.dumps(meta, indent=2, sort_keys=True))


def read_meta(path: str | Path, expect: dict | None = None) -> dict:
    """An index directory's meta.json; refuses one that disagrees with `expect`, naming the field."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise ArtifactMismatch(f"{path}: index meta '{key}' is {meta.get(key)!r}, expected {want!r}")
    return meta


def load_index(path: str | Path, expect: dict | None = None):
    """(FAISS index, meta); refuses an index whose meta disagrees with `expect`, naming the field."""
    meta = read_meta(path, expect)
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR if meta.get("on_disk") else 0  # lists memory-mapped from path
    return faiss.read_index(str(Path(path) / "index.faiss"), flags), meta


def search(index, queries: np.ndarray, k: int, nprobe: int = 8, rerank: int = 0,
           store: StoreReader | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(top scores, top rows, bottom scores, bottom rows), each [Q, k]. Bottom-k = top-k of -q.
    With rerank > k, the top `rerank` ANN candidates are rescored exactly from the store.
    An IVF search whose probed lists hold fewer than k rows pads with row -1 (score NaN):
    consumers drop those (`trackstar.retrieval.results.valid_hits`); raise `nprobe` to fill them."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except (RuntimeError, AttributeError):
        pass
    if not _on_disk(index):
        index, _res = _gpu(index)
    width = max(k, rerank) if store is not None and rerank else k
    ts, ti = index.search(q, width)
    bs, bi = index.search(-q, width)
    bs = -bs
    if store is not None and rerank:
        (ts, ti), (bs, bi) = _rerank(q, ti, bi, store, k)
    ts, ti, bs, bi = ts[:, :k].astype(np.float32), ti[:, :k], bs[:, :k].astype(np.float32), bi[:, :k]
    ts[ti < 0] = np.nan
    bs[bi < 0] = np.nan
    return ts, ti, bs, bi


def _on_disk(index) -> bool:
    try:
        return isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists),
                          faiss.OnDiskInvertedLists)
    except (RuntimeError, AttributeError):
        return False


def _rerank(q: np.ndarray, top: np.ndarray, bottom: np.ndarray, store: StoreReader, k: int, batch: int = 0):
    """Exact scores of the proponent and opponent candidate rows; the best k (largest / most negative) of
    each kept. Per batch of queries one grouped read of the distinct rows of both candidate sets (by chunk,
    never one read per row); the batch is sized so that those rows stay under RERANK_BUDGET (or is `batch`
    queries), so memory does not grow with queries or rerank depth."""
    cand = np.concatenate([top, bottom], axis=1)
    scores = np.full(cand.shape, np.nan, dtype=np.float32)
    batch = batch or max(1, min(64, RERANK_BUDGET // max(1, cand.shape[1] * store.d * 4)))
    for b in range(0, len(q), batch):
        c = cand[b:b + batch]
        uniq, inv = np.unique(c[c >= 0], return_inverse=True)
        vecs = store.read_rows(uniq)
        pos = np.full(c.shape, -1)
        pos[c >= 0] = inv
        for j, row in enumerate(pos):
            ok = row >= 0
            scores[b + j, ok] = vecs[row[ok]] @ q[b + j]
    out = []
    for part, sign in ((slice(0, top.shape[1]), -1), (slice(top.shape[1], None), 1)):
        s, i = scores[:, part], cand[:, part]
        key = np.where(i >= 0, sign * s, np.inf)  # missing candidates last
        order = np.argsort(key, axis=1, kind="stable")[:, :k]
        out.append((np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)))
    return out[0], out[1]
