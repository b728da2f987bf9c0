"""The on-disk memo: round trip, a cut-short entry is a miss, old entries are pruned."""

import os

from trackstar.memo import Memo, memo_key


def test_round_trip_miss_and_prune(tmp_path):
    m = Memo(tmp_path, keep=2)
    assert memo_key(a=1, b=[2]) == memo_key(b=[2], a=1) != memo_key(a=1, b=[3])
    value = {"q0|p3": [0.25, -1.5], "q1|p0": [0.0, 2.0]}
    assert m.load_json("s", "k1") is None
    m.save_json("s", "k1", value)
    assert m.load_json("s", "k1") == value
    (tmp_path / "s-k1.json").write_bytes((tmp_path / "s-k1.json").read_bytes()[:20])
    assert m.load_json("s", "k1") is None  # cut short: recompute, never a wrong value
    os.utime(tmp_path / "s-k1.json", ns=(10**9,) * 2)  # the oldest entry
    m.save_json("t", "a", {"v": 1.5})
    assert m.load_json("t", "a") == {"v": 1.5}
    for i, key in enumerate(("k2", "k3", "k4")):
        m.save_json("s", key, value)
        os.utime(tmp_path / f"s-{key}.json", ns=(10**9 * (i + 2),) * 2)  # distinct mtimes: a defined order
    assert sorted(p.name for p in tmp_path.glob("s-*")) == ["s-k3.json", "s-k4.json"]
    assert m.load_json("t", "a") == {"v": 1.5}  # other names untouched
    assert not list(tmp_path.glob("*.tmp"))
