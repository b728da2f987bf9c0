"""The on-disk memo: round trip, a cut-short entry is a miss, old entries are pruned."""

import numpy as np

from trackstar.memo import Memo, memo_key


def test_round_trip_miss_and_prune(tmp_path):
    m = Memo(tmp_path, keep=2)
    assert memo_key(a=1, b=[2]) == memo_key(b=[2], a=1) != memo_key(a=1, b=[3])
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert m.load_arrays("s", "k1") is None
    m.save_arrays("s", "k1", {"x": x})
    np.testing.assert_array_equal(m.load_arrays("s", "k1")["x"], x)
    (tmp_path / "s-k1.safetensors").write_bytes((tmp_path / "s-k1.safetensors").read_bytes()[:20])
    assert m.load_arrays("s", "k1") is None  # cut short: recompute, never a wrong value
    m.save_json("t", "a", {"v": 1.5})
    assert m.load_json("t", "a") == {"v": 1.5}
    for key in ("k2", "k3", "k4"):
        m.save_arrays("s", key, {"x": x})
    assert sorted(p.name for p in tmp_path.glob("s-*")) == ["s-k3.safetensors", "s-k4.safetensors"]
    assert m.load_json("t", "a") == {"v": 1.5}  # other names untouched
