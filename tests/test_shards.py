"""A corpus that grows in shards (docs/shards.md), end to end on a fixed checkpoint: with the corpus and 3
shards built, adding a 4th encodes only it (`dvc status` and the stages `dvc repro` ran say so), its scores
equal a from-scratch build on all 4 shards row for row, and removing it again restores every earlier
artifact from DVC's run-cache with nothing encoded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.pipeline import dvc, free_port, git, make_repo, repro, set_param
from trackstar.data.records import query_record, write_jsonl
from trackstar.data.world import FactWorldConfig, generate_fact_world
from trackstar.errors import TrackStarError
from trackstar.layout import corpus_stores, shard_partials

SHARDS = ["s1", "s2", "s3"]
# tiny params; eval.tail_patch_queries 0 keeps `evaluate` to MRR (the test is about what reruns)
OVERRIDES = {"model": {"source": "checkpoint"}, "eval": {"tail_patch_queries": 0},
             "data": {"source": "files", "corpus": "inputs/data/corpus.jsonl", "queries": "inputs/data/queries.jsonl",
                      "shards": {s: f"inputs/data/shards/{s}.jsonl" for s in SHARDS}}}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The fact world cut into the corpus + s1..s4 jsonl files and a fixed tiny checkpoint (one epoch of AdamW,
    so it has second moments), under inputs/ of a folder that each repo copies."""
    from trackstar.model.checkpoint import save_checkpoint
    from trackstar.model.train import ModelConfig, TrainConfig, build_model, pretrain, train_tokenizer

    root = tmp_path_factory.mktemp("world")
    passages, queries, _ = generate_fact_world(FactWorldConfig(entities=12, relations=2, paraphrases=2,
                                                               distractors_per_entity=1, contradicted=0.0, query_wording="held_out"))
    relevant = {r for q in queries for r in q.relevant_ids}
    # s4 holds passages no query needs (relevant ids must resolve with or without it)
    s4 = [p for p in passages if p.id not in relevant][:12]
    rest = [p for p in passages if p not in s4]
    cut = len(rest) // 2
    parts = {"corpus": rest[:cut], **{s: rest[cut + i::3] for i, s in enumerate(SHARDS)}, "s4": s4}
    (root / "inputs/data/shards").mkdir(parents=True)
    for name, rows in parts.items():
        path = root / ("inputs/data/corpus.jsonl" if name == "corpus" else f"inputs/data/shards/{name}.jsonl")
        write_jsonl(path, ({"id": p.id, "text": p.text} for p in rows))
    write_jsonl(root / "inputs/data/queries.jsonl", (query_record(q) for q in queries))
    texts = [p.text for p in passages]
    tok = train_tokenizer(texts, 300)
    model = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                    max_position_embeddings=64), tok)
    opt = pretrain(model, tok, texts, TrainConfig(epochs=1, batch_size=16, max_length=64), progress=False)
    save_checkpoint(model, tok, opt, root / "inputs/checkpoint")
    return root


def shard_repo(dest: Path, world: Path, shards: list[str]) -> Path:
    """A tiny repo whose inputs are the world's corpus + the given shards."""
    dest.mkdir(parents=True)
    shutil.copytree(world / "inputs/checkpoint", dest / "inputs/checkpoint")
    (dest / "inputs/data/shards").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        shutil.copy(world / "inputs/data" / name, dest / "inputs/data" / name)
    for s in shards:
        shutil.copy(world / f"inputs/data/shards/{s}.jsonl", dest / f"inputs/data/shards/{s}.jsonl")
    over = json.loads(json.dumps(OVERRIDES))
    over["data"]["shards"] = {s: f"inputs/data/shards/{s}.jsonl" for s in shards}
    return make_repo(dest, over)


def status_text(repo: Path) -> str:
    return dvc(repo, "status").stdout


def changed(repo: Path) -> set[str]:
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        return {name.rsplit("dvc.yaml:", 1)[-1] for name in r.status()}


def scores(repo: Path) -> dict[str, list]:
    """Every retrieval file's (query, proponent ids + scores, opponent ids + scores), in order."""
    out = {}
    for f in sorted([repo / "retrievals/trackstar.jsonl", *(repo / "retrievals/ladder").glob("*.jsonl")]):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        out[f.name] = [(r["example_id"], r["proponent_ids"], r["proponent_scores"], r["opponent_ids"],
                        r["opponent_scores"]) for r in rows]
    return out


def encoded(ran: list[str]) -> list[str]:
    return [s for s in ran if s.startswith("encode")]


def test_add_a_shard_encodes_only_it_and_equals_a_build_from_scratch(world, tmp_path):
    repo = shard_repo(tmp_path / "grow", world, SHARDS)
    ran = repro(repo)
    assert sorted(encoded(ran)) == ["encode@query", "encode@train", "encode_shard@s1", "encode_shard@s2",
                                    "encode_shard@s3"]
    assert sorted(s for s in ran if s.startswith("autocorrelation_shard")) == [f"autocorrelation_shard@{s}"
                                                                                for s in SHARDS]
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "3 shards")
    before = scores(repo)
    final = (repo / "encodings/final/train.zarr/zarr.json").read_text()

    shutil.copy(world / "inputs/data/shards/s4.jsonl", repo / "inputs/data/shards/s4.jsonl")
    set_param(repo, "data.shards", {**OVERRIDES["data"]["shards"], "s4": "inputs/data/shards/s4.jsonl"})
    text = status_text(repo)
    print(text)
    got = changed(repo)
    assert {s for s in got if s.startswith("encode")} == {"encode_shard@s4"}, text
    assert {"data", "encode_shard@s4"} <= got
    ran = repro(repo)
    assert encoded(ran) == ["encode_shard@s4"], ran
    assert [s for s in ran if s.startswith("autocorrelation_shard")] == ["autocorrelation_shard@s4"]
    assert "train" in ran and "autocorrelation" in ran and "precondition@train" in ran and "retrieve" in ran
    assert changed(repo) == set()
    grown = scores(repo)
    assert grown != before
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "4 shards")

    scratch = shard_repo(tmp_path / "scratch", world, [*SHARDS, "s4"])
    ran = repro(scratch, "retrieve", "ladder")  # what the comparison reads (bm25 and evaluate add nothing here)
    assert "encode_shard@s4" in ran and "autocorrelation_shard@s4" in ran
    assert scores(scratch) == grown  # ids and float scores, row for row

    # remove s4 again: params and inputs back, its store deleted (a store of no listed shard is refused)
    git(repo, "checkout", "HEAD~1", "--", "params.yaml")
    (repo / "inputs/data/shards/s4.jsonl").unlink()
    with pytest.raises(TrackStarError, match="s4.zarr: not a shard"):
        corpus_stores(SHARDS, repo)
    with pytest.raises(TrackStarError, match="s4.safetensors: not a shard"):
        shard_partials(SHARDS, repo)
    shutil.rmtree(repo / "encodings/raw/shards/s4.zarr")
    (repo / "hessian/partials/s4.safetensors").unlink()
    assert repro(repo) == []  # every stage restored from the run-cache: nothing encoded, nothing recomputed
    assert changed(repo) == set()
    assert scores(repo) == before
    assert (repo / "encodings/final/train.zarr/zarr.json").read_text() == final


def test_concat_reader_reads_stores_as_one(tmp_path):
    """Rows of several stores in order: chunks (dealt to ranks, cut at a row), re-blocked across store
    boundaries, and gathered by row number, all equal to the concatenated arrays."""
    import numpy as np

    from trackstar.store import ConcatReader, StoreWriter, StoreSpec

    rng = np.random.default_rng(0)
    parts, paths = [], []
    for i, n in enumerate([7, 5, 9]):
        x = rng.standard_normal((n, 6)).astype(np.float32)
        w = StoreWriter(tmp_path / f"s{i}.zarr", tmp_path / f"w{i}", StoreSpec(n, 6, ["g"], chunk_mb=3 * 6 * 4 / 2**20,
                        attrs={"checkpoint_hash": "c", "config": {}}))
        w.prepare()
        for c in range(w.n_chunks):
            a, b = w.chunk_range(c)
            w.write_chunk(c, {"g": x[a:b]})
        w.finalize()
        parts.append(x)
        paths.append(tmp_path / f"s{i}.zarr")
    want = np.concatenate(parts)
    r = ConcatReader(paths)
    assert r.n == 21 and np.array_equal(r.read_all(), want)
    got = list(r.iter_chunks(0, 2, stop=16)) + list(r.iter_chunks(1, 2, stop=16))
    rows = np.concatenate([x for _, x in sorted(got, key=lambda t: t[0])])
    assert np.array_equal(rows, want[:16])
    blocks = list(r.iter_blocks(4))
    assert [s for s, _ in blocks] == [0, 4, 8, 12, 16, 20] and np.array_equal(np.concatenate([b for _, b in blocks]), want)
    pick = np.array([20, 0, 8, 7, 3, 12])
    assert np.array_equal(r.read_rows(pick), want[pick])


def test_torchrun_ranks_take_whole_shards(world, tmp_path):
    """`torchrun stages/encode.py shards`: each of 2 ranks encodes whole shards into their own stores, equal to
    the stores of one process; `dvc commit` records them, and no encode_shard@ stage is left to run."""
    import sys

    import numpy as np

    from tests.pipeline import run
    from trackstar.store import StoreReader

    repo = shard_repo(tmp_path / "ranks", world, SHARDS)
    repro(repo, "data", "train", "moments")  # what encode_shard@ reads
    out = run(repo, sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", str(free_port()), "stages/encode.py", "shards").stdout
    assert sorted(json.loads(x)["split"] for x in out.splitlines() if x.startswith("{")) == [f"shard:{s}" for s in SHARDS]
    ranked = {s: StoreReader(repo / f"encodings/raw/shards/{s}.zarr").read_all() for s in SHARDS}
    dvc(repo, "commit", "-f", "encode_shard")
    assert not {s for s in changed(repo) if s.startswith("encode_shard")}
    for s in SHARDS:  # the same shard encoded by one plain process
        shutil.rmtree(repo / f"encodings/raw/shards/{s}.zarr")
    run(repo, sys.executable, "stages/encode.py", "shards")
    for s in SHARDS:
        np.testing.assert_array_equal(StoreReader(repo / f"encodings/raw/shards/{s}.zarr").read_all(), ranked[s])
