"""Store writing, resume after a partial run, bf16 round trip and refusals."""

import numpy as np
import pytest

from trackstar.errors import ArtifactMismatch
from trackstar.store import StoreReader, StoreWriter, StoreSpec, from_storage, to_storage


def test_partial_run_resumes_and_skips_finished_chunks(tmp_path):
    x = np.arange(40 * 8, dtype=np.float32).reshape(40, 8)
    mk = lambda: StoreWriter(tmp_path / "out.zarr", tmp_path / "work", StoreSpec(40, 8, ["g"], chunk_mb=8 * 4 * 6 / 2**20,
                             attrs={"seed": 1}))
    w = mk()
    assert w.chunk_rows == 6 and w.n_chunks == 7
    assert w.prepare() is False
    for c in [0, 1, 2]:
        a, b = w.chunk_range(c)
        w.write_chunk(c, {"g": x[a:b]})
    assert not (tmp_path / "out.zarr").exists()  # nothing in place until complete
    w2 = mk()
    assert w2.prepare() is True
    assert w2.pending() == [3, 4, 5, 6]
    assert w2.pending(rank=1, world=2) == [3, 5]
    for c in w2.pending():
        a, b = w2.chunk_range(c)
        w2.write_chunk(c, {"g": x[a:b]})
    w2.finalize()
    r = StoreReader(tmp_path / "out.zarr", expect={"seed": 1})
    np.testing.assert_array_equal(r.read_all(), x)
    np.testing.assert_array_equal(r.read_rows(np.array([39, 0, 13, 14])), x[[39, 0, 13, 14]])
    with pytest.raises(ArtifactMismatch, match="attr 'seed' is 1 but the current config expects 2"):
        StoreReader(tmp_path / "out.zarr", expect={"seed": 2})


def test_changed_attrs_restart_from_scratch(tmp_path):
    w = StoreWriter(tmp_path / "o.zarr", tmp_path / "w", StoreSpec(10, 4, ["g"], attrs={"seed": 1}))
    w.prepare()
    w.write_chunk(0, {"g": np.ones((10, 4), np.float32)})
    w2 = StoreWriter(tmp_path / "o.zarr", tmp_path / "w", StoreSpec(10, 4, ["g"], attrs={"seed": 2}))
    assert w2.prepare() is False and w2.pending() == [0]


def test_incomplete_store_is_refused(tmp_path):
    w = StoreWriter(tmp_path / "o.zarr", tmp_path / "w", StoreSpec(10, 4, ["g"]))
    w.prepare()
    with pytest.raises(ArtifactMismatch, match="incomplete"):
        StoreReader(tmp_path / "w" / "store.zarr")
    with pytest.raises(Exception, match="chunks not written"):
        w.finalize()


def test_bf16_round_trip_is_round_to_nearest():
    import torch
    x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    want = torch.from_numpy(x).bfloat16().float().numpy()
    np.testing.assert_array_equal(from_storage(to_storage(x, "bf16"), "bf16"), want)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_read_rows_memory_mapped_equals_decoded(tmp_path, dtype):
    """Uncompressed stores are gathered through memory maps of the chunk files; the rows must equal
    what zarr decodes (compressed store), in any order, with repeats and a partial last chunk."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(53, 12)).astype(np.float32)
    readers = {}
    for comp in ["none", "zstd"]:
        w = StoreWriter(tmp_path / f"{comp}.zarr", tmp_path / f"w{comp}", StoreSpec(53, 12, ["g"], dtype=dtype,
                        chunk_mb=12 * 4 * 10 / 2**20, compressor=comp))
        w.prepare()
        for c in w.pending():
            a, b = w.chunk_range(c)
            w.write_chunk(c, {"g": x[a:b]})
        w.finalize()
        readers[comp] = StoreReader(tmp_path / f"{comp}.zarr")
    assert readers["none"]._mapped_chunk(0) is not None and readers["zstd"]._mapped_chunk(0) is None
    rows = rng.integers(0, 53, size=40)
    rows[:3] = [52, 52, 0]
    rows[3:9] = [8, 9, 10, 11, 12, 7]  # consecutive rows across the boundary of chunks 0 and 1 (10 rows a chunk)
    got = readers["none"].read_rows(rows)
    np.testing.assert_array_equal(got, readers["zstd"].read_rows(rows))
    np.testing.assert_array_equal(got, readers["zstd"].read_all()[rows])


def test_small_store_has_one_chunk_of_its_own_size(tmp_path):
    """A store with fewer rows than a chunk holds is one chunk of exactly its rows: zarr keeps an
    uncompressed chunk at full shape, so a 32 MB chunk for 5 rows would cost 32 MB on disk."""
    x = np.arange(5 * 8, dtype=np.float32).reshape(5, 8)
    w = StoreWriter(tmp_path / "out.zarr", tmp_path / "work", StoreSpec(5, 8, ["g"], chunk_mb=32.0))
    assert w.chunk_rows == 5 and w.n_chunks == 1
    w.prepare()
    w.write_chunk(0, {"g": x})
    w.finalize()
    size = sum(p.stat().st_size for p in (tmp_path / "out.zarr").rglob("*") if p.is_file())
    assert size < 4096, size
    np.testing.assert_array_equal(StoreReader(tmp_path / "out.zarr").read_all(), x)


def test_fp16_overflow_is_refused_with_the_fix(tmp_path):
    """Corrected gradients can exceed float16's range: the row would be stored as inf and fail far downstream."""
    w = StoreWriter(tmp_path / "o.zarr", tmp_path / "w", StoreSpec(10, 4, ["g"], dtype="fp16"))
    w.prepare()
    x = np.ones((10, 4), np.float32)
    x[3, 2] = 7.0e4
    with pytest.raises(Exception, match=r"array 'g', chunk 0 \(rows 0..9\): a value of magnitude 7e\+04 overflows "
                                        r"float16 \(largest 65504\); set encode.dtype to bf16"):
        w.write_chunk(0, {"g": x})
    x[3, 2] = 6.0e4  # within range: written
    w.write_chunk(0, {"g": x})
    w.finalize()
    assert StoreReader(tmp_path / "o.zarr").read_all()[3, 2] == np.float16(6.0e4)
