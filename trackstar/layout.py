"""Where the pipeline's artifacts live, relative to a repository root: the one place that spells the paths the
stages share (data files, encoding stores, Hessian files, index, retrievals, metrics, report, resume folders).

Every function takes the root last (default: the working directory, where DVC runs the stages) and, where
shards matter, the shard names of params.yaml data.shards. `corpus_stores` and `shard_partials` refuse a
leftover file of a shard no longer listed: it would silently change what DVC hashes."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from trackstar.errors import TrackStarError

Root = str | Path

DATA = Path("data")
CORPUS = DATA / "corpus.jsonl"
QUERIES = DATA / "queries.jsonl"
SHARD_DATA = DATA / "shards"  # one <name>.jsonl per shard + shards.json
SHARDS_MANIFEST = SHARD_DATA / "shards.json"
MODEL = Path("model")
MOMENTS = Path("model_moments/second_moments.safetensors")  # correction.kind: estimated
RAW = Path("encodings/raw")  # train.zarr, query.zarr, shards/<name>.zarr
RAW_SHARDS = RAW / "shards"
FINAL = Path("encodings/final")  # train.zarr, query.zarr (preconditioned)
WORK = Path(".work")  # resume state and memos, outside DVC's outputs
HESSIAN = Path("hessian")
STATS = HESSIAN / "stats.safetensors"
EIGEN = HESSIAN / "eigen.safetensors"
W_MIX = HESSIAN / "w_mix.safetensors"
PARTIALS = HESSIAN / "partials"  # <name>.safetensors per shard
INDEX = Path("index")
RETRIEVALS = Path("retrievals")
TRACKSTAR = RETRIEVALS / "trackstar.jsonl"
BM25 = RETRIEVALS / "bm25.jsonl"
LADDER = RETRIEVALS / "ladder"  # <method>.jsonl per ladder rung
METRICS = Path("metrics")
PREDICTIONS = Path("eval/predictions.jsonl")
REPORT = Path("report")
SPLITS = ("train", "query")


def at(path: Path, root: Root = ".") -> Path:
    """`path` (one of the names above) under `root`."""
    return Path(root) / path


def shard_data(name: str, root: Root = ".") -> Path:
    """A shard's passages as the data stage writes them: data/shards/<name>.jsonl."""
    return Path(root) / SHARD_DATA / f"{name}.jsonl"


def raw_store(split: str, root: Root = ".") -> Path:
    """The encode stage's store of the corpus (train) or the queries (query)."""
    return Path(root) / RAW / f"{split}.zarr"


def raw_shard_store(name: str, root: Root = ".") -> Path:
    """One shard's raw encodings (encode_shard@<name>)."""
    return Path(root) / RAW_SHARDS / f"{name}.zarr"


def final_store(split: str, root: Root = ".") -> Path:
    """The preconditioned, unit-normalized store of a split (precondition@<split>)."""
    return Path(root) / FINAL / f"{split}.zarr"


def partial(name: str, root: Root = ".") -> Path:
    """One shard's partial autocorrelation sums (autocorrelation_shard@<name>)."""
    return Path(root) / PARTIALS / f"{name}.safetensors"


def work_dir(job: str, root: Root = ".") -> Path:
    """The resume folder of one job (e.g. encode-train, precondition-query, tailpatch)."""
    return Path(root) / WORK / job


def ladder_file(method: str, root: Root = ".") -> Path:
    """One ladder rung's retrievals."""
    return Path(root) / LADDER / f"{method}.jsonl"


def check_strays(folder: Path, suffix: str, shards: Iterable[str], what: str) -> None:
    """Refuse a `*suffix` entry of `folder` that names no listed shard; `what` says what it holds."""
    names = set(shards)
    stray = sorted(p.name for p in folder.glob(f"*{suffix}") if p.name[:-len(suffix)] not in names)
    if stray:
        raise TrackStarError(f"{folder / stray[0]}: not a shard in params.yaml data.shards (a removed shard's "
                             f"{what}); delete it (rm -r {folder / stray[0]})")


def corpus_stores(shards: Iterable[str], root: Root = ".") -> list[Path]:
    """The corpus's raw store, then one per shard by name; refuses a store of no listed shard."""
    names = sorted(shards)
    check_strays(Path(root) / RAW_SHARDS, ".zarr", names, "encodings")
    return [raw_store("train", root), *(raw_shard_store(n, root) for n in names)]


def shard_partials(shards: Iterable[str], root: Root = ".") -> list[Path]:
    """One partial per shard, by name; refuses a partial of no listed shard."""
    names = sorted(shards)
    check_strays(Path(root) / PARTIALS, ".safetensors", names, "sums")
    return [partial(n, root) for n in names]
