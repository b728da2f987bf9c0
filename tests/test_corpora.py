"""Corpora through `datasets` (docs/corpora.md): parquet, arrow and save_to_disk inputs with configurable
columns give the same passages as the jsonl they were made from, streamed in batches; the `data` stage writes
them (and shards) as jsonl; a missing column or a duplicate id is refused naming the file, row and field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import yaml

from trackstar.data.corpus import read_passages
from trackstar.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpora")
    ds = datasets.Dataset.from_dict({"doc_id": list(range(12)),  # integer ids: read as "0".."11"
                                     "body": [f"Passage number {i} ünïcode." for i in range(12)],
                                     "url": ["x"] * 12})
    ds.to_parquet(str(root / "c.parquet"))
    ds.save_to_disk(str(root / "c_ds"))
    arrow = next((root / "c_ds").glob("*.arrow"))
    with open(root / "c.jsonl", "w") as f:
        for r in ds:
            f.write(json.dumps({"doc_id": str(r["doc_id"]), "body": r["body"]}) + "\n")
    return {"jsonl": root / "c.jsonl", "parquet": root / "c.parquet", "arrow": arrow, "save_to_disk": root / "c_ds"}


@pytest.mark.parametrize("kind", ["parquet", "arrow", "save_to_disk"])
def test_formats_read_as_the_jsonl(files, kind):
    want = list(read_passages(files["jsonl"], "body", "doc_id"))
    assert len(want) == 12 and want[10].id == "10"
    got = list(read_passages(files[kind], "body", "doc_id", batch_rows=5))  # several batches
    assert got == want


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "save_to_disk"])
def test_missing_column_names_file_and_field(files, kind):
    with pytest.raises(InputError) as e:
        list(read_passages(files[kind], "text", "doc_id"))
    assert str(files[kind]) in str(e.value) and "'text'" in str(e.value)


def test_bad_rows_name_row_and_field(tmp_path):
    datasets.Dataset.from_dict({"id": ["a", "b", "a"], "text": ["x", "y", "z"]}).to_parquet(str(tmp_path / "dup.parquet"))
    with pytest.raises(InputError, match=r"dup.parquet:3: field 'id': duplicate id 'a' \(first on row 1\)"):
        list(read_passages(tmp_path / "dup.parquet"))
    datasets.Dataset.from_dict({"id": ["a", "b"], "text": ["x", " "]}).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(InputError, match=r"empty.parquet:2: field 'text': must not be empty"):
        list(read_passages(tmp_path / "empty.parquet"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="junk.parquet: cannot be read as parquet"):
        list(read_passages(tmp_path / "junk.parquet"))


def data_stage(tmp: Path, data: dict) -> subprocess.CompletedProcess:
    (tmp / "params.yaml").write_text(yaml.safe_dump({"data": {"source": "files", **data}}))
    return subprocess.run([sys.executable, str(ROOT / "stages/data.py")], cwd=tmp, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)})


def test_data_stage_writes_corpus_and_shards_as_jsonl(files, tmp_path):
    (tmp_path / "inputs/data").mkdir(parents=True)
    for name in ("parquet", "save_to_disk"):
        src = files[name]
        dest = tmp_path / "inputs/data" / src.name
        subprocess.run(["cp", "-r", str(src), str(dest)], check=True)
    ds = datasets.Dataset.from_dict({"doc_id": ["e1", "e2"], "body": ["Extra one.", "Extra two."]})
    ds.to_parquet(str(tmp_path / "inputs/data/extra.parquet"))
    (tmp_path / "inputs/data/q.jsonl").write_text(json.dumps({"id": "q", "prompt": "P", "target": " T",
                                                              "relevant_ids": ["3", "e2"]}) + "\n")
    proc = data_stage(tmp_path, {"corpus": "inputs/data/c.parquet", "queries": "inputs/data/q.jsonl",
                                 "text_column": "body", "id_column": "doc_id",
                                 "shards": {"extra": "inputs/data/extra.parquet"}})
    assert proc.returncode == 0, proc.stderr
    corpus = [json.loads(x) for x in (tmp_path / "data/corpus.jsonl").read_text().splitlines()]
    assert corpus[3] == {"id": "3", "text": "Passage number 3 ünïcode."} and len(corpus) == 12
    shard = [json.loads(x) for x in (tmp_path / "data/shards/extra.jsonl").read_text().splitlines()]
    assert shard == [{"id": "e1", "text": "Extra one."}, {"id": "e2", "text": "Extra two."}]
    assert json.loads((tmp_path / "data/shards/shards.json").read_text())["extra"]["passages"] == 2

    # a shard repeating an id of the corpus, and a column that does not exist, are refused before any output moves
    proc = data_stage(tmp_path, {"corpus": "inputs/data/c.parquet", "queries": "inputs/data/q.jsonl",
                                 "text_column": "body", "id_column": "doc_id",
                                 "shards": {"again": "inputs/data/c_ds"}})
    assert proc.returncode == 2 and "inputs/data/c_ds" in proc.stderr and "duplicate id '0'" in proc.stderr
    proc = data_stage(tmp_path, {"corpus": "inputs/data/c_ds", "queries": "inputs/data/q.jsonl",
                                 "text_column": "content", "id_column": "doc_id"})
    assert proc.returncode == 2
    assert "inputs/data/c_ds: field 'content': no such column (columns: doc_id, body, url); set data.text_column" \
        in proc.stderr
