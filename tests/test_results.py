"""retrievals/*.jsonl: round trip, the published TDA-viewer field names, validation errors."""

from __future__ import annotations

import json
import os

import pytest

from trackstar.data.records import Query
from trackstar.errors import InputError
from trackstar.retrieval.results import CORE_FIELDS, Hits, QueryResult, make_result, read_results, write_results


def sample() -> list[QueryResult]:
    return [
        QueryResult("q0", "The capital of Veloria is", " Ostrand",
                    ["p3", "p1"], [0.91, 0.5], ["Veloria's capital: Ostrand.", "Ostrand ü city"],
                    ["p9"], [-0.25], ["unrelated"]),
        QueryResult("q1", "Ilsa Brandt was born in", " Kessel", ["p2"], [1], ["text"],
                    extra={"query_set": "fact_world", "proponent_correct": [True]}),
    ]


def test_round_trip(tmp_path):
    path = tmp_path / "sub" / "r.jsonl"
    assert write_results(path, sample()) == 2
    back = read_results(path)
    assert back == [
        QueryResult(**{**r.__dict__, "proponent_scores": [float(s) for s in r.proponent_scores]})
        for r in sample()
    ]
    assert isinstance(back[1].proponent_scores[0], float)
    assert back[1].extra == {"query_set": "fact_world", "proponent_correct": [True]}
    assert [p.name for p in path.parent.iterdir()] == ["r.jsonl"]  # no temp files left


def test_published_field_names_and_types(tmp_path):
    path = tmp_path / "r.jsonl"
    write_results(path, sample())
    lines = path.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    assert list(first) == list(CORE_FIELDS)
    assert set(CORE_FIELDS) == {"example_id", "inputs_plaintext", "targets_plaintext", "proponents",
                                "proponent_ids", "proponent_scores", "opponents", "opponent_ids",
                                "opponent_scores"}
    assert first["proponents"] == ["Veloria's capital: Ostrand.", "Ostrand ü city"]  # texts
    assert all(isinstance(s, float) for s in first["proponent_scores"])
    second = json.loads(lines[1])
    assert second["opponents"] == second["opponent_ids"] == second["opponent_scores"] == []
    assert list(second)[-2:] == ["query_set", "proponent_correct"]


def test_reads_published_bm25_style_record_without_opponents(tmp_path):
    path = tmp_path / "bm25.jsonl"
    rec = {"example_id": "trex_1", "query_set": "trex", "inputs_plaintext": "X was born in",
           "targets_plaintext": "Y", "proponents": ["X was born in Y."], "proponent_ids": ["s1"],
           "proponent_scores": [12.5]}
    path.write_text(json.dumps(rec) + "\n\n", encoding="utf-8")
    (r,) = read_results(path)
    assert r.opponents == r.opponent_ids == r.opponent_scores == []
    assert r.extra == {"query_set": "trex"}


def test_make_result_looks_up_texts():
    texts = {"a": "alpha", "b": "beta"}
    r = make_result(Query("q", "p", "t"), Hits(["b", "a"], [2.0, 1.0]), texts, Hits(["a"], [-1.0]), query_set="x")
    assert r.proponents == ["beta", "alpha"] and r.opponents == ["alpha"]
    assert (r.example_id, r.inputs_plaintext, r.targets_plaintext) == ("q", "p", "t")
    assert r.extra == {"query_set": "x"}
    r2 = make_result(Query("q", "p", "t"), Hits(["a"], [1.0]), texts.get)
    assert r2.proponents == ["alpha"] and r2.opponent_ids == []


GOOD = {"example_id": "q0", "inputs_plaintext": "p", "targets_plaintext": "t",
        "proponents": ["x"], "proponent_ids": ["a"], "proponent_scores": [1.0],
        "opponents": [], "opponent_ids": [], "opponent_scores": []}


@pytest.mark.parametrize("change,field,fragment", [
    ({"example_id": 3}, "example_id", "string"),
    ({"inputs_plaintext": None}, "inputs_plaintext", "string"),
    ({"proponent_scores": ["0.5"]}, "proponent_scores", "number"),
    ({"proponent_scores": [True]}, "proponent_scores", "number"),
    ({"proponent_ids": ["a", "b"]}, "proponent_ids", "lengths differ"),
    ({"proponents": "x"}, "proponents", "list"),
    ({"proponent_ids": [7]}, "proponent_ids", "string"),
    ({"opponent_scores": None}, "opponent_scores", "list"),
])
def test_bad_field_names_file_line_field(tmp_path, change, field, fragment):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(GOOD), json.dumps({**GOOD, "example_id": "q1", **change})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputError) as ei:
        read_results(path)
    e = ei.value
    assert (e.path, e.line, e.field) == (str(path), 2, field)
    msg = str(e)
    assert f"{path}:2" in msg and field in msg and fragment in msg


def test_missing_field_and_partial_opponents(tmp_path):
    path = tmp_path / "bad.jsonl"
    rec = {k: v for k, v in GOOD.items() if k != "targets_plaintext"}
    path.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl:1: field 'targets_plaintext': missing"):
        read_results(path)
    rec = {k: v for k, v in GOOD.items() if k != "opponent_ids"}
    path.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r":1: field 'opponent_ids': missing"):
        read_results(path)


def test_invalid_json_nan_and_duplicates(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl:2: invalid JSON"):
        read_results(path)
    path.write_text(json.dumps({**GOOD, "proponent_scores": [float("nan")]}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r":1: invalid JSON.*NaN"):
        read_results(path)
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n", encoding="utf-8")
    with pytest.raises(InputError) as ei:
        read_results(path)
    assert (ei.value.line, ei.value.field) == (2, "example_id")
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(InputError, match=r":1: expected a JSON object"):
        read_results(path)
    with pytest.raises(InputError, match="cannot open"):
        read_results(tmp_path / "missing.jsonl")


def test_write_is_atomic_and_validates(tmp_path):
    path = tmp_path / "r.jsonl"
    write_results(path, sample())
    before = path.read_bytes()

    def broken():
        yield sample()[0]
        yield QueryResult("q9", "p", "t", ["a"], [float("nan")], ["x"])

    with pytest.raises(ValueError, match="finite"):
        write_results(path, broken())
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="lengths differ"):
        write_results(path, [QueryResult("q", "p", "t", ["a", "b"], [1.0], ["x"])])
    with pytest.raises(ValueError, match="duplicate example_id"):
        write_results(path, [sample()[0], sample()[0]])
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["r.jsonl"]
