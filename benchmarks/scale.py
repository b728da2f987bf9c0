"""The scale benchmark: the pipeline on corpora of N passages around the default world, with its fixed checkpoint;
per stage wall time, peak RSS and bytes written, and TrackStar / BM25 MRR and recall@10 of the world's queries
(the needle among N passages).

For each N, a scratch copy of this checkout (its code, the current Python environment) whose inputs are a built
repo's (--repo, default this one after `dvc repro`): its corpus and queries (`data.source: files`), its model
(`model.source: checkpoint`), and N - (corpus rows) haystack passages (trackstar.data.haystack: more invented
entities with their own facts, distractors, confusers and near-miss names, none naming an entity of the world)
as shards of --shard-size passages (`data.shards`, so encode_shard@<name> and autocorrelation_shard@<name> do the
growing part). On top of --repo's params.yaml:

  hessian.train_sample = the corpus's rows   R_train from the model's own training passages only (the corpus rows
                                             come first), so MRR against N measures the haystack, not a whitening
                                             that the added passages took over
  encode.dtype = --dtype (bf16)              half the bytes of fp32 in every store, float32's range
  encode.save_plain = false                  no plain gradients: the ladder's rungs are not run
  retrieve.methods = []                      no ladder rungs
  eval.tail_patch_queries = 0                no tail-patch
  --set KEY=VALUE ...                        anything else (e.g. projection.d=1856, hessian.train_sample=0)

DVC's cache links outputs (cache.type hardlink,symlink), so no store is paid twice on disk. Every stage of
`dvc dag` runs as `dvc repro --single-item <stage>` in topological order, each measured as one child process:
seconds (wall), peak RSS (the largest of DVC's process and the stage's, from wait4), bytes written (the sizes
of its outputs in dvc.lock). Per N also the disk used by the scratch repo (workspace and DVC cache, a linked file
once), the metrics of metrics/metrics.json, a brute-force check of `retrieve`'s exact top-k and bottom-k for
--check-queries queries (every score of the final stores in float64, a full stable sort, ids compared with
retrievals/trackstar.jsonl), and the time the report site takes to draw its first query panel in headless
Chromium over http (median of 3 loads, cache off).

    nice -n 10 python benchmarks/scale.py --passages 20000,80000 [--out benchmarks/results/scale.json]
        [--repo PATH] [--work DIR] [--keep] [--shard-size 100000] [--dtype bf16] [--set projection.d=1856]
        [--check-queries 20] [--no-site]
    python benchmarks/scale.py --remeasure bm25 --work DIR --out FILE

--remeasure STAGE,...: in every scratch repo a --keep run left under --work (n<N>/), this checkout's
trackstar/ and stages/ replace the repo's and each named stage runs again, measured the same way (the same
corpus, stores and params: a later commit's figures for those stages, side by side with the run's); each
stage's outputs are compared byte for byte with what the repo held before (`changed_outputs`, `same_outputs`).

Writes --out after every N (and beside it the plot of time and peak RSS against N, --out with .png): {commit, params, machine, runs: [{passages, stages: {<stage>: {seconds,
peak_rss_bytes, bytes_written, cpu_seconds}}, mrr: {trackstar, bm25, random}, recall@10: {...}, brute_force: {...},
site: {...}, ...}]}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from tests.harness import ROOT, child_env, make_repo, measured, set_param, set_params, write_results  # noqa: E402
from tests.pipeline import run  # noqa: E402
from trackstar.config import DataParams  # noqa: E402
from trackstar.data.haystack import haystack_passages  # noqa: E402
from trackstar.data.records import count_lines, write_jsonl  # noqa: E402
from trackstar.data.world import world_config  # noqa: E402
from tests.browser import Chromium, find_chromium  # noqa: E402
from report import by_stage  # noqa: E402
from viewer import serve, time_loads  # noqa: E402

CACHE_TYPE = "hardlink,symlink"


@dataclass(frozen=True)
class Options:
    """The command line."""

    passages: list[int]
    remeasure: list[str]
    out: Path
    repo: Path
    work: Path | None
    keep: bool
    shard_size: int
    dtype: str
    sets: list[str]
    check_queries: int
    site: bool


def parse_args(argv: list[str] | None = None) -> Options:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", default="", help="corpus sizes N1,N2,... (each >= the corpus's rows)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scale.json")
    ap.add_argument("--repo", type=Path, default=ROOT, help="a built repo: data/, model/, params.yaml")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep each N's scratch repo")
    ap.add_argument("--shard-size", type=int, default=100_000, help="haystack passages per shard")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="bf16", help="encode.dtype of the stores")
    ap.add_argument("--check-queries", type=int, default=20, help="queries checked against a brute-force search")
    ap.add_argument("--no-site", dest="site", action="store_false", help="skip the report site's load time")
    ap.add_argument("--remeasure", metavar="STAGE,...", help="rerun these stages in the kept repos under --work")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a params.yaml key (dotted) set last; VALUE is YAML")
    a = ap.parse_args(argv)
    remeasure = [x for x in (a.remeasure or "").split(",") if x]
    if remeasure and (a.passages or not a.work):
        ap.error("--remeasure takes --work (the kept repos) and no --passages")
    if not remeasure and not a.passages:
        ap.error("--passages is required")
    try:
        passages = [int(x) for x in a.passages.split(",")] if a.passages else []
    except ValueError:
        ap.error(f"--passages: not a comma-separated list of integers: {a.passages!r}")
    if a.shard_size < 1:
        ap.error("--shard-size must be >= 1")
    for s in a.sets:
        if "=" not in s:
            ap.error(f"--set {s!r}: expected KEY=VALUE")
    return Options(passages, remeasure, a.out, a.repo.resolve(), a.work and a.work.resolve(), a.keep, a.shard_size, a.dtype, a.sets,
                   a.check_queries, a.site)


def overrides(opts: Options, corpus_rows: int) -> dict:
    """The params on top of --repo's params.yaml (the module docstring says why each)."""
    return {"data": {"source": "files", "corpus": "inputs/data/corpus.jsonl", "queries": "inputs/data/queries.jsonl"},
            "model": {"source": "checkpoint", "checkpoint": "inputs/checkpoint"},
            "hessian": {"train_sample": corpus_rows},
            "encode": {"dtype": opts.dtype, "save_plain": False},
            "retrieve": {"methods": []},
            "eval": {"tail_patch_queries": 0}}


def write_haystack(repo: Path, opts: Options, n: int) -> dict[str, str]:
    """n haystack passages of --repo's world as shards under repo/inputs/data/haystack/; data.shards' entries."""
    data = DataParams(**(yaml.safe_load((opts.repo / "params.yaml").read_text()).get("data") or {}))
    if data.source != "generate":
        sys.exit(f"{opts.repo / 'params.yaml'}: data.source must be generate (the haystack avoids the generated "
                 f"world's entities), got {data.source}")
    stream = haystack_passages(world_config(data), n)
    count = -(-n // opts.shard_size)
    width = max(3, len(str(count - 1)))
    shards = {}
    for j in range(count):
        name = f"h{j:0{width}d}"
        shards[name] = f"inputs/data/haystack/{name}.jsonl"
        write_jsonl(repo / shards[name], ({"id": p.id, "text": p.text}
                                          for p in itertools.islice(stream, opts.shard_size)))
    return shards


def setup(repo: Path, opts: Options, n: int, corpus_rows: int) -> dict:
    """repo: this checkout's files, --repo's params, corpus, queries and model as inputs, the haystack shards, the
    params; returns the params applied."""
    make_repo(repo)
    (repo / "dvc.lock").unlink(missing_ok=True)  # this checkout's own pipeline state, not the scratch's
    (repo / "inputs/data/haystack").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        shutil.copyfile(opts.repo / "data" / name, repo / "inputs/data" / name)
    shutil.rmtree(repo / "inputs/checkpoint")
    shutil.copytree(opts.repo / "model", repo / "inputs/checkpoint")
    shutil.copyfile(opts.repo / "params.yaml", repo / "params.yaml")
    applied = overrides(opts, corpus_rows)
    applied["data"]["shards"] = write_haystack(repo, opts, n - corpus_rows)
    set_params(repo, applied)
    for s in opts.sets:
        key, value = s.split("=", 1)
        set_param(repo, key, yaml.safe_load(value))
    run(repo, sys.executable, "-m", "dvc", "config", "cache.type", CACHE_TYPE)
    return applied


def stage_order(repo: Path) -> list[str]:
    """Every stage of `dvc dag`, upstream first (dvc.yaml's order among the ready ones)."""
    dot = run(repo, sys.executable, "-m", "dvc", "dag", "--dot").stdout
    nodes = re.findall(r'^"([^"]+)";$', dot, re.M)
    edges = re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, re.M)
    order: list[str] = []
    while len(order) < len(nodes):
        ready = [s for s in nodes if s not in order and all(a in order for a, b in edges if b == s)]
        if not ready:
            sys.exit(f"{repo}: dvc dag has a cycle")
        order.append(ready[0])
    return order


def outs_bytes(repo: Path, stage: str) -> int:
    """The sizes of a stage's outputs as dvc.lock records them."""
    entry = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]
    return sum(int(o.get("size", 0)) for o in entry.get("outs", []))


def disk_used(folder: Path) -> int:
    """Bytes allocated under folder, a hardlinked file once (symlinks not followed)."""
    seen, total = set(), 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def run_stages(repo: Path) -> dict[str, dict]:
    """Each stage by `dvc repro --single-item`, in order, measured; stops at the first failure."""
    stages = {}
    for stage in stage_order(repo):
        m = measured([sys.executable, "-m", "dvc", "repro", "--single-item", stage], repo, child_env(repo))
        if m.rc:
            sys.exit(f"dvc repro --single-item {stage} failed in {repo} ({m.rc}):\n{m.stdout[-3000:]}\n"
                     f"{m.stderr[-3000:]}")
        stages[stage] = {"seconds": round(m.seconds, 2), "peak_rss_bytes": round(m.peak_rss_mb * 2 ** 20),
                         "bytes_written": outs_bytes(repo, stage), "cpu_seconds": round(m.cpu_seconds, 2)}
        print(f"  {stage}: {m.seconds:.1f} s, {m.peak_rss_mb:.0f} MiB peak, "
              f"{stages[stage]['bytes_written'] / 2 ** 20:.1f} MiB written", file=sys.stderr, flush=True)
    return stages


def _float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """A store's stored rows as float32 (bf16 is kept as the top 16 bits of float32)."""
    if dtype == "bf16":
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32)


def _store_array(path: Path):
    import zarr
    g = zarr.open_group(str(path), mode="r")
    return g["g"], g.attrs["dtype"]


def brute_force(repo: Path, n_queries: int) -> dict:
    """`retrieve`'s TrackStar top-k and bottom-k of n_queries queries (evenly spaced) against every score of
    the final stores computed in float64 and fully sorted (stable, lower row first on ties): queries whose id
    lists match exactly, and the largest score difference. Independent of the pipeline's reader and search."""
    t0 = time.perf_counter()
    results = [json.loads(line) for line in (repo / "retrievals/trackstar.jsonl").read_text().splitlines()]
    pick = np.unique(np.linspace(0, len(results) - 1, n_queries).round().astype(int))
    qa, qdtype = _store_array(repo / "encodings/final/query.zarr")
    q = _float32(qa[:], qdtype)[pick].astype(np.float64)
    ta, tdtype = _store_array(repo / "encodings/final/train.zarr")
    rows = ta.chunks[0]
    scores = np.concatenate([_float32(ta[a:a + rows], tdtype).astype(np.float64) @ q.T
                             for a in range(0, ta.shape[0], rows)]).T  # [queries, N]
    ids = [json.loads(line)["id"] for f in ("data/corpus.jsonl", *sorted(
        p.relative_to(repo).as_posix() for p in (repo / "data/shards").glob("*.jsonl")))
        for line in open(repo / f, encoding="utf-8")]
    if len(ids) != scores.shape[1]:
        sys.exit(f"{repo}: {len(ids)} corpus lines but {scores.shape[1]} store rows")
    same = {"proponents": 0, "opponents": 0}
    max_diff = 0.0
    for row, s in zip(pick, scores):
        r = results[row]
        k = len(r["proponent_ids"])
        for side, order, got_ids, got_s in (("proponents", np.argsort(-s, kind="stable")[:k], r["proponent_ids"],
                                             r["proponent_scores"]),
                                            ("opponents", np.argsort(s, kind="stable")[:len(r["opponent_ids"])],
                                             r["opponent_ids"], r["opponent_scores"])):
            same[side] += [ids[i] for i in order] == got_ids
            max_diff = max(max_diff, float(np.abs(s[order] - np.asarray(got_s)).max()))
    return {"queries": len(pick), "k": k, "identical_proponents": same["proponents"],
            "identical_opponents": same["opponents"], "max_abs_score_diff": max_diff,
            "seconds": round(time.perf_counter() - t0, 1)}


def site_first_panel(repo: Path, repeats: int = 3) -> dict:
    """The report site over http in headless Chromium (cache off): median ms to its first query panel."""
    httpd, base = serve(repo)
    try:
        with Chromium(timeout=300) as c:
            c.send("Network.enable")
            c.send("Network.setCacheDisabled", cacheDisabled=True)
            return time_loads(c, f"{base}/report/index.html", repeats)
    finally:
        httpd.shutdown()


def scale_point(repo: Path, opts: Options, n: int, corpus_rows: int) -> dict:
    """One N: set up, run every stage, read the metrics."""
    t0 = time.perf_counter()
    applied = setup(repo, opts, n, corpus_rows)
    setup_s = time.perf_counter() - t0
    print(f"N = {n}: {len(applied['data']['shards'])} haystack shard(s), set up in {setup_s:.1f} s",
          file=sys.stderr, flush=True)
    stages = run_stages(repo)
    metrics = json.loads((repo / "metrics/metrics.json").read_text())
    attrs = json.loads((repo / "encodings/raw/train.zarr/zarr.json").read_text())["attributes"]
    check = brute_force(repo, opts.check_queries) if opts.check_queries else None
    site = None
    if opts.site:
        try:
            find_chromium()
            site = site_first_panel(repo)
        except FileNotFoundError as e:  # the run's figures stand without it; say why it is missing
            site = {"skipped": str(e)}
            print(f"  site check skipped: {e}", file=sys.stderr, flush=True)
    return {"passages": n, "corpus_passages": corpus_rows, "haystack_passages": n - corpus_rows,
            "shards": len(applied["data"]["shards"]), "d": attrs["d"], "setup_seconds": round(setup_s, 2),
            "seconds": round(sum(s["seconds"] for s in stages.values()), 2), "stages": stages,
            "disk_used_bytes": disk_used(repo),
            "mrr": {m: v["mrr"] for m, v in metrics.items()},
            "recall@10": {m: v["recall@10"] for m, v in metrics.items()},
            "brute_force": check, "site": site}


def _growth(stages: list[dict], stage: str, key: str) -> float:
    """How much a stage's figure grew from the first N it ran at to the largest."""
    have = [st[stage][key] for st in stages if stage in st]
    return have[-1] / have[0] if have[0] else 0.0


def plot(runs: list[dict], path: Path) -> None:
    """Time and peak RSS against N (log-log): the total and the three longest stages at the largest N; the
    largest peak RSS and the three stages whose RSS grew most (the per-shard stages summed over shards)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["passages"] for r in runs]
    stages = [by_stage(r["stages"]) for r in runs]
    last = stages[-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, scale, title in [(axes[0], "seconds", 1, "wall time (s)"),
                                  (axes[1], "peak_rss_bytes", 2 ** -20, "peak RSS (MiB)")]:
        if key == "seconds":
            ax.plot(ns, [r["seconds"] for r in runs], "-o", color="black", label="all stages")
        else:
            ax.plot(ns, [max(s[key] for s in r["stages"].values()) * scale for r in runs], "-o", color="black",
                    label="largest of any stage")
        rank = (lambda k: -last[k][key]) if key == "seconds" else (lambda k: -_growth(stages, k, key))
        for stage in sorted(last, key=rank)[:3]:
            pts = [(n, st[stage][key] * scale) for n, st in zip(ns, stages) if stage in st]
            ax.plot(*zip(*pts), "--.", label=stage)
        if key == "peak_rss_bytes":
            ax.axhline(8 * 1024, color="grey", lw=0.8)
            ax.text(ns[0], 8 * 1024 * 0.8, "hessian.memory_gb default (8 GiB)", fontsize=7, color="grey")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("passages N")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def out_digests(repo: Path, stage: str) -> dict[str, str]:
    """path -> md5 of each output of a stage, as dvc.lock records them."""
    entry = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]
    return {o["path"]: o.get("md5", "") for o in entry.get("outs", [])}


def remeasure(opts: Options) -> None:
    """--remeasure: the named stages again in each kept repo, with this checkout's library and stage scripts."""
    runs = []
    repos = sorted((d for d in opts.work.glob("n*") if (d / "dvc.lock").exists()), key=lambda d: int(d.name[1:]))
    if not repos:
        sys.exit(f"{opts.work}: no kept scratch repo (n<N>/ with a dvc.lock); run with --keep first")
    for repo in repos:
        for folder in ("trackstar", "stages"):
            shutil.rmtree(repo / folder)
            shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
        before = {st: out_digests(repo, st) for st in opts.remeasure}
        stages = {}
        for stage in opts.remeasure:
            m = measured([sys.executable, "-m", "dvc", "repro", "--single-item", "--force", stage], repo,
                         child_env(repo))
            if m.rc:
                sys.exit(f"dvc repro --single-item {stage} failed in {repo} ({m.rc}):\n{m.stderr[-3000:]}")
            stages[stage] = {"seconds": round(m.seconds, 2), "peak_rss_bytes": round(m.peak_rss_mb * 2 ** 20),
                             "bytes_written": outs_bytes(repo, stage), "cpu_seconds": round(m.cpu_seconds, 2),
                             "changed_outputs": sorted(k for k, v in out_digests(repo, stage).items()
                                                       if before[stage].get(k) != v)}
            stages[stage]["same_outputs"] = not stages[stage]["changed_outputs"]
            print(f"  N = {repo.name[1:]} {stage}: {m.seconds:.1f} s, {m.peak_rss_mb:.0f} MiB peak, changed outputs "
                  f"{stages[stage]['changed_outputs']}", file=sys.stderr, flush=True)
        runs.append({"passages": int(repo.name[1:]), "stages": stages})
        write_results(opts.out, {"remeasure": opts.remeasure, "work": str(opts.work)}, {"runs": runs})
    print(f"wrote {opts.out}")


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if opts.remeasure:
        return remeasure(opts)
    corpus = opts.repo / "data/corpus.jsonl"
    if not corpus.exists() or not (opts.repo / "model").is_dir():
        sys.exit(f"{opts.repo}: no data/corpus.jsonl or model/ (run `dvc repro` there first, or pass --repo)")
    corpus_rows = count_lines(corpus)
    if min(opts.passages) < corpus_rows:
        sys.exit(f"--passages {min(opts.passages)}: fewer than the corpus's {corpus_rows} rows ({corpus})")
    work = opts.work or Path(tempfile.mkdtemp(prefix="trackstar-scale-"))
    print(f"scratch repos under {work}", file=sys.stderr, flush=True)
    params = {"passages": opts.passages, "repo": str(opts.repo), "shard_size": opts.shard_size,
              "cache.type": CACHE_TYPE, "overrides": overrides(opts, corpus_rows), "set": opts.sets}
    runs = []
    for n in opts.passages:
        repo = work / f"n{n}"
        runs.append(scale_point(repo, opts, n, corpus_rows))
        r = runs[-1]
        print(f"N = {n}: {r['seconds']:.0f} s, MRR trackstar {r['mrr']['trackstar']:.3f} bm25 "
              f"{r['mrr']['bm25']:.3f}, disk {r['disk_used_bytes'] / 2 ** 30:.2f} GiB, brute force "
              f"{r['brute_force']}, site {r['site']}", file=sys.stderr, flush=True)
        write_results(opts.out, params, {"runs": runs})
        plot(runs, opts.out.with_suffix(".png"))
        if not opts.keep:
            shutil.rmtree(repo)
    if opts.work is None and not opts.keep:
        work.rmdir()
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
