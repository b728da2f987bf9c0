"""Projection-size sweep: MRR and tail-patch against d, one `dvc exp run -S projection.k=K` per k.

Run in a repo after `dvc repro` (the model and data come from its cache; each experiment reruns
encode and everything after it). The experiments stay as DVC experiments (`dvc exp show`).
Writes benchmarks/results/d_sweep.{json,csv,png}.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from trackstar.evaluation.metrics import METHODS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from tests.harness import write_results  # noqa: E402

HERE = Path(__file__).resolve().parent


def dvc(*args: str) -> str:
    res = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"dvc {' '.join(args)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return res.stdout


def read_metrics() -> dict:
    return {"metrics": json.loads(Path("metrics/metrics.json").read_text()),
            "hessian": json.loads(Path("metrics/hessian.json").read_text())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="4,8,12,16", help="projection.k values (d = k^2 x layers)")
    ap.add_argument("--out", default=str(HERE / "results/d_sweep"))
    args = ap.parse_args()
    rows = []
    for k in [int(x) for x in args.ks.split(",")]:
        t = time.perf_counter()
        dvc("exp", "run", "-n", f"d-sweep-k{k}", "-S", f"projection.k={k}")
        sec = time.perf_counter() - t
        m = read_metrics()
        d = m["hessian"]["d"]
        row = {"k": k, "d": d, "seconds": round(sec, 1), "lambda": m["hessian"].get("lambda")}
        for method in METHODS:
            if method in m["metrics"]:
                for key in ("mrr", "recall@10", "tail_patch@1", "tail_patch@10"):
                    row[f"{method}.{key}"] = m["metrics"][method].get(key)
        rows.append(row)
        print(f"k={k:3d} d={d:6d}  trackstar MRR {row.get('trackstar.mrr', float('nan')):.3f}  "
              f"tail-patch@10 {row.get('trackstar.tail_patch@10', float('nan')):.3g}  ({sec:.0f} s)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_results(out.with_suffix(".json"), {"params.yaml": yaml.safe_load(Path("params.yaml").read_text()),
                                             **vars(args)}, {"rows": rows})
    with open(out.with_suffix(".csv"), "w", newline="") as f:  # plain column names for `dvc plots`
        flat = lambda key: key.replace(".", "_").replace("@", "_at_")
        w = csv.DictWriter(f, fieldnames=[flat(k) for k in rows[0]])
        w.writeheader()
        w.writerows({flat(k): v for k, v in r.items()} for r in rows)
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in [(axes[0], "mrr", "MRR"), (axes[1], "tail_patch@10", "tail-patch@10 (Δ log p)")]:
        for method in METHODS:
            ys = [r.get(f"{method}.{key}") for r in rows]
            if all(y is not None for y in ys):
                style = "--" if method in ("bm25", "random") else "-o"
                ax.plot([r["d"] for r in rows], ys, style, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("projection size d")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
