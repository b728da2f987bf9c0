"""A corpus that grows: time to add a shard of 10 % of the corpus against a full rebuild, with a fixed
checkpoint (`model.source: checkpoint`), and DVC's own costs at >= 100 shards (benchmarks/README.md,
"Incremental corpus", says what each scenario is).

For default / large / large_wide: a full build from scratch of the corpus + s1..s5; in another clone the base
build (corpus + s1..s4, sharing the first clone's DVC cache, so its encodings come from the run-cache); then s5
is added and `dvc repro --no-run-cache` timed per stage. The add's retrievals (trackstar and every ladder rung)
must equal the full build's row for row. `scale`: --scale-shards tiny shards, `dvc status`, a no-op
`dvc repro` and `dvc push` to a local-directory remote.

    nice -n 10 python benchmarks/incremental.py [--scenarios large,large_wide,default,scale] [--note TEXT]

Updates results/incremental.json: each scenario's key replaced (with its commit and machine), the others kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import timed_repro  # benchmarks/pipeline.py: timed `dvc repro`

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from tests import harness  # noqa: E402
from tests.harness import ROOT, child_env, git, set_params  # noqa: E402
from tests.pipeline import run as run_checked  # noqa: E402
from common import small_checkpoint  # noqa: E402

HERE = ROOT / "benchmarks"
ENCODE = ("encode@", "encode_shard@")


def run(repo: Path, *cmd: str) -> str:
    """cmd in repo with the repo's own trackstar; its stdout (fails loudly)."""
    return run_checked(repo, *cmd, env=child_env(repo)).stdout


def world(entities: int, seed: int = 0):
    """The generated world at this size (passages already shuffled)."""
    from trackstar.data.world import FactWorldConfig, generate_fact_world

    return generate_fact_world(FactWorldConfig(seed=seed, entities=entities, contradicted=0.0))


def split(passages, queries, parts: dict[str, float], max_queries: int):
    """Consecutive slices of the (shuffled) passages by fraction; queries whose relevant passages all lie
    outside the last part, which is the one added later (a query must resolve before and after)."""
    out, start = {}, 0
    for i, (name, frac) in enumerate(parts.items()):
        stop = len(passages) if i == len(parts) - 1 else start + round(frac * len(passages))
        out[name] = passages[start:stop]
        start = stop
    late = {p.id for p in out[list(parts)[-1]]}
    keep = [q for q in queries if not late & set(q.relevant_ids or [])][:max_queries]
    return out, keep


@dataclass(frozen=True)
class Scenario:
    """One grow scenario: the world's size, the fixed checkpoint's shape and the params on top of the defaults."""

    name: str
    entities: int
    max_queries: int
    hidden: int
    layers: int
    vocab: int = 1024
    params: dict = field(default_factory=dict)


def checkpoint(out: Path, texts: list[str], sc: Scenario) -> None:
    """A fixed checkpoint: BPE tokenizer on the texts, a seeded Llama of the scenario's shape, a few AdamW steps."""
    from trackstar.model.train import ModelConfig, train_tokenizer

    cfg = ModelConfig(hidden_size=sc.hidden, num_layers=sc.layers, num_heads=max(1, sc.hidden // 32),
                      intermediate_size=4 * sc.hidden)
    small_checkpoint(train_tokenizer(texts[:20000], sc.vocab), cfg, texts, out)


def make_repo(dest: Path, ckpt: Path, parts: dict, queries, shards: list[str], params: dict) -> Path:
    """A copy of this repo with inputs/data/{corpus,queries}.jsonl, the listed shards, the checkpoint and params,
    committed."""
    from trackstar.data.records import query_record, write_jsonl

    harness.make_repo(dest)
    (dest / "inputs/data/shards").mkdir(parents=True, exist_ok=True)
    write_jsonl(dest / "inputs/data/corpus.jsonl", ({"id": p.id, "text": p.text} for p in parts["corpus"]))
    write_jsonl(dest / "inputs/data/queries.jsonl", (query_record(q) for q in queries))
    for s in shards:
        write_jsonl(dest / f"inputs/data/shards/{s}.jsonl", ({"id": p.id, "text": p.text} for p in parts[s]))
    shutil.rmtree(dest / "inputs/checkpoint")
    shutil.copytree(ckpt, dest / "inputs/checkpoint")
    set_params(dest, {**params, "data": {**params.get("data", {}),
                                         "shards": {s: f"inputs/data/shards/{s}.jsonl" for s in shards}}})
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "inputs")
    return dest


def retrievals(repo: Path) -> dict:
    out = {}
    for f in sorted([repo / "retrievals/trackstar.jsonl", *(repo / "retrievals/ladder").glob("*.jsonl")]):
        out[f.name] = [(r["example_id"], r["proponent_ids"], r["proponent_scores"], r["opponent_ids"],
                        r["opponent_scores"]) for r in map(json.loads, f.read_text().splitlines())]
    return out


AFTER_R = ("autocorrelation", "eigen", "hessian", "precondition@train", "precondition@query", "index", "retrieve",
           "ladder")


def r_change_cost(r: dict) -> dict:
    """What a change of R_train costs in the add (the stages after it, each and together) against encoding: the
    full build's encoding (every passage) and the add's (the new shard's)."""
    full_encode = sum(s for k, s in r["full_stage_s"].items() if k.startswith(ENCODE))
    add_encode = sum(s for k, s in r["add_stage_s"].items() if k.startswith(ENCODE))
    after = {k: r["add_stage_s"][k] for k in AFTER_R if k in r["add_stage_s"]}
    total = sum(after.values())
    return {"full_encode_s": full_encode, "add_encode_s": add_encode, "add_after_r_stage_s": after,
            "add_after_r_s": total, "after_r_vs_full_encode": total / full_encode,
            "after_r_vs_add_encode": total / add_encode,
            "precondition_train_vs_full_encode": after.get("precondition@train", 0.0) / full_encode}


def grow(sc: Scenario, work: Path) -> dict:
    """Base build, add s5 (timed per stage, dvc status captured), full build from scratch; compare scores."""
    name = sc.name
    passages, queries, _ = world(sc.entities)
    parts, queries = split(passages, queries, {"corpus": .5, "s1": .1, "s2": .1, "s3": .1, "s4": .1, "s5": .1},
                           sc.max_queries)
    ckpt = work / f"{name}-checkpoint"
    checkpoint(ckpt, [p.text for p in passages], sc)
    params = {**sc.params, "model": {"source": "checkpoint"}, "eval": {"tail_patch_queries": 0},
              "data": {"source": "files", "corpus": "inputs/data/corpus.jsonl", "queries": "inputs/data/queries.jsonl"}}
    base = ["s1", "s2", "s3", "s4"]
    # the full build from scratch first; the base build (corpus + s1..s4) shares its DVC cache, so its encodings
    # come from the run-cache (the base's own cost is not what is measured); the add then runs with
    # --no-run-cache, so s5 is encoded and everything after it recomputed, nothing restored
    scratch = make_repo(work / f"{name}-scratch", ckpt, parts, queries, [*base, "s5"], params)
    full_s, full_stages, _ = timed_repro(scratch)
    print(f"[{name}] full build from scratch ({len(passages)} passages): {full_s:.1f} s", flush=True)
    full_scores = retrievals(scratch)

    repo = make_repo(work / f"{name}-grow", ckpt, parts, queries, base, params)
    run(repo, "dvc", "cache", "dir", str(scratch / ".dvc/cache"))
    base_s, base_stages, base_ran = timed_repro(repo)
    print(f"[{name}] base build (corpus + 4 shards, encodings from the shared cache): {base_s:.1f} s", flush=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")

    from trackstar.data.records import write_jsonl
    write_jsonl(repo / "inputs/data/shards/s5.jsonl", ({"id": p.id, "text": p.text} for p in parts["s5"]))
    set_params(repo, {"data": {"shards": {s: f"inputs/data/shards/{s}.jsonl" for s in [*base, "s5"]}}})
    status = run(repo, "dvc", "status")
    add_s, add_stages, add_ran = timed_repro(repo, "--no-run-cache")
    assert [s for s in add_ran if s.startswith(ENCODE)] == ["encode_shard@s5"], add_ran
    print(f"[{name}] add s5 ({len(parts['s5'])} passages): {add_s:.1f} s; ran {add_ran}", flush=True)
    grown = retrievals(repo)
    equal = full_scores == grown
    print(f"[{name}] add / full = {add_s / full_s:.3f}; scores equal from scratch: {equal}", flush=True)
    out = {"passages": len(passages), "queries": len(queries), "added_passages": len(parts["s5"]),
           "model": {"hidden": sc.hidden, "layers": sc.layers, "vocab": sc.vocab},
           "d": json.loads((repo / "encodings/raw/shards/s5.zarr/zarr.json").read_text())["attributes"]["d"],
           "params": params, "base_build_s": base_s, "base_stages_run": base_ran, "add_shard_s": add_s, "full_build_s": full_s,
           "add_shard_vs_full": add_s / full_s, "scores_equal_from_scratch": equal,
           "add_stages_run": add_ran, "add_stage_s": add_stages, "full_stage_s": full_stages,
           "dvc_status_after_add": status}
    out.update(r_change_cost(out))
    for d in (repo, scratch):
        shutil.rmtree(d)
    return out


def scale(work: Path, shards: int, per_shard: int) -> dict:
    """Tiny shards: encode them all in one process (`encode.py shards`) + `dvc commit`, build the rest, then time
    `dvc status`, a no-op `dvc repro` and `dvc push` to a local-directory remote."""
    entities = max(12, shards * per_shard // 14 + 1)
    passages, queries, _ = world(entities)
    names = [f"s{i:04d}" for i in range(shards)]
    fracs = {"corpus": per_shard / len(passages), **{n: per_shard / len(passages) for n in names}, "rest": 0.0}
    parts, queries = split(passages, queries, fracs, 50)
    ckpt = work / "scale-checkpoint"
    checkpoint(ckpt, [p.text for p in passages], Scenario("scale", entities, 50, 32, 2, 300))
    params = {"model": {"source": "checkpoint"}, "eval": {"tail_patch_queries": 0}, "projection": {"k": 4},
              "hessian": {"mix_k": 5}, "retrieve": {"k": 10}, "bm25": {"k": 10},
              "data": {"source": "files", "corpus": "inputs/data/corpus.jsonl", "queries": "inputs/data/queries.jsonl"}}
    repo = make_repo(work / "scale", ckpt, parts, queries, names, params)
    t = time.perf_counter()
    run(repo, "dvc", "repro", "data", "train", "moments", "encode@train", "encode@query")
    run(repo, sys.executable, "stages/encode.py", "shards")
    run(repo, sys.executable, "stages/autocorrelation.py", "shards")
    encode_all_s = time.perf_counter() - t
    t = time.perf_counter()
    run(repo, "dvc", "commit", "-f", "encode_shard", "autocorrelation_shard")
    commit_s = time.perf_counter() - t
    t = time.perf_counter()
    ran = timed_repro(repo)[2]
    rest_s = time.perf_counter() - t
    assert not any(s.startswith(("encode", "autocorrelation_shard")) for s in ran), ran
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "built")

    def timed(*cmd: str, reps: int = 3) -> list[float]:
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            run(repo, *cmd)
            out.append(time.perf_counter() - t)
        return out

    status_s = timed("dvc", "status")
    noop_s = timed("dvc", "repro")
    remote = work / "scale-remote"
    run(repo, "dvc", "remote", "add", "-d", "local", str(remote))
    push_s = timed("dvc", "push", reps=1)
    repush_s = timed("dvc", "push", reps=1)
    store_files = [sum(1 for f in p.rglob("*") if f.is_file()) for p in (repo / "encodings/raw/shards").glob("*.zarr")]
    remote_files = sum(1 for f in remote.rglob("*") if f.is_file())
    out = {"shards": shards, "passages_per_shard": per_shard, "stages": len(run(repo, "dvc", "stage", "list").splitlines()),
           "encode_and_partials_one_process_s": encode_all_s, "dvc_commit_shard_stages_s": commit_s,
           "rest_of_pipeline_s": rest_s, "dvc_status_s": status_s, "dvc_status_median_s": statistics.median(status_s),
           "noop_repro_s": noop_s, "noop_repro_median_s": statistics.median(noop_s), "dvc_push_first_s": push_s[0],
           "dvc_push_again_s": repush_s[0], "files_per_shard_store": max(store_files), "remote_files": remote_files}
    print(f"[scale] {json.dumps(out)}", flush=True)
    shutil.rmtree(repo)
    shutil.rmtree(remote)
    return out


def markdown(res: dict) -> str:
    """The benchmarks/README section from a results file (`--markdown`)."""
    out = []
    for name in ("large", "large_wide", "default"):
        r = res.get(name)
        if not r:
            continue
        out += [f"**{name}** ({r['passages']:,} passages, d = {r['d']:,}, hidden {r['model']['hidden']}, "
                f"{r['model']['layers']} layers; s5 = {r['added_passages']:,} passages): full build from scratch "
                f"**{r['full_build_s']:.0f} s**, adding s5 **{r['add_shard_s']:.0f} s = "
                f"{100 * r['add_shard_vs_full']:.0f} %** of it; scores equal to the full build row for row: "
                f"**{str(r['scores_equal_from_scratch']).lower()}**.", "",
                "| stage | full build (s) | add s5 (s) |", "|---|---|---|"]
        for st in dict.fromkeys([*r["full_stage_s"], *r["add_stage_s"]]):
            f, a = r["full_stage_s"].get(st), r["add_stage_s"].get(st)
            out.append(f"| `{st}` | {'' if f is None else f'{f:.1f}'} | {'' if a is None else f'{a:.1f}'} |")
        if "add_after_r_s" in r:
            out += ["", f"What follows the change of R in the add ({', '.join(r['add_after_r_stage_s'])}): "
                        f"{r['add_after_r_s']:.1f} s = {r['after_r_vs_full_encode']:.2f} x the full build's encoding "
                        f"({r['full_encode_s']:.1f} s) and {r['after_r_vs_add_encode']:.2f} x the new shard's "
                        f"({r['add_encode_s']:.1f} s); `precondition@train` alone "
                        f"{r['add_after_r_stage_s'].get('precondition@train', 0.0):.1f} s = "
                        f"{r['precondition_train_vs_full_encode']:.3f} x the full encoding."]
        out.append("")
    sc = res.get("scale")
    if sc:
        out += [f"**scale** ({sc['shards']} shards of {sc['passages_per_shard']} passages, {sc['stages']} stages, "
                f"{sc['files_per_shard_store']} files per shard store): `dvc status` "
                f"**{sc['dvc_status_median_s']:.1f} s** (median of {len(sc['dvc_status_s'])}), no-op `dvc repro` "
                f"**{sc['noop_repro_median_s']:.1f} s**, first `dvc push` to a local-directory remote "
                f"**{sc['dvc_push_first_s']:.1f} s** ({sc['remote_files']:,} files), a second push "
                f"{sc['dvc_push_again_s']:.1f} s; all shards encoded in one process "
                f"{sc['encode_and_partials_one_process_s']:.0f} s, `dvc commit` of their "
                f"{2 * sc['shards']} stages {sc['dvc_commit_shard_stages_s']:.1f} s.", ""]
    return "\n".join(out)


LARGE_PARAMS = {"projection": {"k": 8}, "hessian": {"mix_k": 30}, "retrieve": {"k": 20}, "bm25": {"k": 20}}


def scenarios(args) -> dict[str, Scenario]:
    """The grow scenarios by name, sized by the command line."""
    return {"default": Scenario("default", 200, 400, 128, 4),
            "large": Scenario("large", args.large_entities, 100, args.large_hidden, args.large_layers,
                              params=LARGE_PARAMS),
            "large_wide": Scenario("large_wide", args.large_entities, 100, args.wide_hidden, args.large_layers,
                                   params=LARGE_PARAMS)}


def summary(res: dict) -> dict:
    """The top-level figures: each large scenario's add / full ratio, and whether every compared one matched."""
    out = {}
    if "large" in res:
        out["add_shard_vs_full"] = res["large"]["add_shard_vs_full"]
    if "large_wide" in res:
        out["add_shard_vs_full_wide"] = res["large_wide"]["add_shard_vs_full"]
    compared = [res[s]["scores_equal_from_scratch"] for s in ("default", "large", "large_wide") if s in res]
    out["scores_equal_from_scratch"] = bool(compared) and all(compared)  # false when nothing was compared
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/trackstar-bench-incremental")
    ap.add_argument("--scenarios", default="large,default,scale", help="of default, large, large_wide, scale")
    ap.add_argument("--large-entities", type=int, default=3200, help="18 passages each with the current generator: 57.6k")
    ap.add_argument("--large-hidden", type=int, default=256)
    ap.add_argument("--wide-hidden", type=int, default=384, help="the large_wide scenario's hidden size")
    ap.add_argument("--large-layers", type=int, default=2)
    ap.add_argument("--scale-shards", type=int, default=100)
    ap.add_argument("--note", help="the run's conditions, recorded as `note` (default: command, threads, load)")
    ap.add_argument("--out", default=str(HERE / "results/incremental.json"))
    ap.add_argument("--markdown", action="store_true", help="print the README section of --out and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    todo = args.scenarios.split(",")
    known = {*scenarios(args), "scale"}
    if not set(todo) <= known:
        sys.exit(f"--scenarios: {sorted(set(todo) - known)} unknown; choose from {sorted(known)}")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out_path = Path(args.out)
    old = json.loads(out_path.read_text()) if out_path.exists() else {}
    res = {k: v for k, v in old.items() if k not in ("commit", "params", "machine")}

    import torch

    res["note"] = args.note or (f"`python benchmarks/incremental.py {' '.join(sys.argv[1:])}`, "
                                f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} "
                                "at the start")
    for name in todo:
        if name == "scale":
            res["scale"] = scale(work, args.scale_shards, 20)
        else:
            res[name] = grow(scenarios(args)[name], work)
        res[name].update(commit=harness.commit(), machine=harness.machine())
        # after every scenario (a later one may not finish); the scenarios not run keep their own commit
        harness.write_results(out_path, vars(args), {**res, **summary(res)})
    print(json.dumps(summary(res)))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
