"""Peak RSS and time of the `autocorrelation` and `eigen` stages for the full, per-layer and per-module Hessian
at SmolLM2-135M's layout (211 linear modules x k^2 columns), against the memory plan's estimates.

The real stage scripts, each in its own process, on random stores at each k; a structure whose estimate exceeds
--limit-gb is only estimated. Baseline, same run and stores: the stages at commit BASELINE (the full d x d
statistics always), where their d x d fits (--baseline-ks).

    python benchmarks/hessian_memory.py            # k = 4 (d = 3,376) and k = 16 (d = 54,016), ~3 min on 2 CPUs
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trackstar.config import EncodeParams, HessianParams  # noqa: E402
from trackstar.hessian.plan import BASE_BYTES, GIB, plan  # noqa: E402
from trackstar.store import StoreSpec  # noqa: E402
from tests.harness import measured, write_results  # noqa: E402
from common import show, write_store  # noqa: E402

OUT = ROOT / "benchmarks/results/hessian_memory.json"
BASELINE = "0b33863"  # the last commit before hessian.structure
BARE = ("import numpy, scipy.linalg, zarr, safetensors, json; import trackstar.store, trackstar.hessian.whitening, "
        "trackstar.hessian.plan, trackstar.memo")


def cost(cmd: list[str], cwd: Path, env: dict | None = None) -> dict:
    """cmd's wall time, CPU time and peak RSS (tests/harness.py `measured`); raises with its stderr on failure."""
    m = measured(cmd, cwd, env)
    if m.rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({m.rc}):\n{m.stderr[-3000:]}")
    return m.figures()


SMOL_MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj"]


def smol_layout(k: int) -> list[dict]:
    """SmolLM2-135M's encoded modules: 30 blocks x 7 linear modules + lm_head = 211, k^2 columns each."""
    names = [f"model.layers.{i}.{m}" for i in range(30) for m in SMOL_MODULES] + ["lm_head"]
    return [{"name": n, "start": i * k * k, "stop": (i + 1) * k * k, "n_out": 0, "n_in": 0} for i, n in enumerate(names)]


def write_stores(repo: Path, layout: list[dict], n_train: int, n_query: int, seed: int) -> None:
    """Random float32 stores with the attrs the stages read; columns scaled per module (an anisotropic R)."""
    rng = np.random.default_rng(seed)
    d = layout[-1]["stop"]
    scale = np.concatenate([np.full(m["stop"] - m["start"], 1.0 / (1 + i % 7)) for i, m in enumerate(layout)])
    enc = EncodeParams()
    for split, n in (("train", n_train), ("query", n_query)):
        attrs = {"k": round((layout[0]["stop"]) ** 0.5), "projection_seed": 0, "correction": "none",
                 "checkpoint_hash": "synthetic", "layout": layout, "config": {"synthetic": True}, "split": split,
                 "input_sha256": f"synthetic-{split}", "encode": enc.model_dump(exclude={"device", "batch_size"})}
        write_store(repo / f"encodings/raw/{split}.zarr", StoreSpec(n, d, ["g"], enc.dtype, enc.chunk_mb,
                                                                   enc.compressor, attrs),
                    lambda c, a, b: rng.standard_normal((b - a, d), dtype=np.float32) * scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="4,16", help="projection k values (d = 211 k^2)")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--limit-gb", type=float, default=6.0, help="estimated peak above which a structure is not run")
    ap.add_argument("--baseline-ks", default="4", help="k values at which the baseline stages also run")
    args = ap.parse_args()
    py = sys.executable
    base_code = Path(tempfile.mkdtemp(prefix="hessmem-baseline-"))
    subprocess.run(f"git -C {ROOT} archive {BASELINE} trackstar stages | tar -x -C {base_code}", shell=True, check=True)
    base_env = {**os.environ, "PYTHONPATH": str(base_code)}
    bare = cost([py, "-c", BARE], ROOT)
    runs = []
    for k in (int(x) for x in args.ks.split(",")):
        layout = smol_layout(k)
        d = layout[-1]["stop"]
        with tempfile.TemporaryDirectory(prefix="hessmem-") as tmp:
            repo = Path(tmp)
            write_stores(repo, layout, args.train, args.queries, seed=k)
            for structure in ("full", "layer", "module"):
                h = HessianParams(structure=structure, memory_gb=1000)
                c = plan(layout, args.train, args.queries, h, EncodeParams()).chosen
                row = {"k": k, "d": d, "structure": structure, "code": "this", "blocks": len(c.blocks),
                       "largest_block": max(c.sizes),
                       "estimated_mb": {"autocorrelation": round(c.autocorrelation / 2**20, 1),
                                        "eigen": round(c.eigen / 2**20, 1)}}
                if c.peak > args.limit_gb * GIB:
                    row["skipped"] = f"estimated peak {c.peak / GIB:.1f} GiB > --limit-gb {args.limit_gb:g}"
                    runs.append(row)
                    continue
                (repo / "params.yaml").write_text(yaml.safe_dump({"hessian": {"structure": structure,
                                                                              "memory_gb": 1000}}))
                shutil.rmtree(repo / "hessian", ignore_errors=True)
                for stage in ("autocorrelation", "eigen"):
                    row[stage] = cost([py, str(ROOT / f"stages/{stage}.py")], repo)
                runs.append(row)
                print(f"k={k} {structure}: done", flush=True)
            if str(k) not in args.baseline_ks.split(","):
                continue
            for structure, diagonal in (("full", False), ("module", True)):
                (repo / "params.yaml").write_text(yaml.safe_dump({"hessian": {"block_diagonal": diagonal}}))
                shutil.rmtree(repo / "hessian", ignore_errors=True)
                row = {"k": k, "d": d, "structure": structure, "code": f"baseline {BASELINE}",
                       "blocks": 1 if structure == "full" else len(layout),
                       "largest_block": d if structure == "full" else k * k}
                for stage in ("autocorrelation", "eigen"):
                    row[stage] = cost([py, str(base_code / f"stages/{stage}.py")], repo, base_env)
                runs.append(row)
                print(f"k={k} {structure} (baseline {BASELINE}): done", flush=True)
    result = {"rows": {"train": args.train, "queries": args.queries}, "layout": "SmolLM2-135M: 30 x 7 modules + lm_head",
              "bare_interpreter_rss_mb": bare["peak_rss_mb"], "base_bytes_mb": BASE_BYTES / 2**20,
              "baseline": f"commit {BASELINE}: full d x d statistics, block_diagonal split only in eigen", "runs": runs}
    shutil.rmtree(base_code, ignore_errors=True)
    show("hessian_memory", write_results(OUT, vars(args), result))


if __name__ == "__main__":
    main()
