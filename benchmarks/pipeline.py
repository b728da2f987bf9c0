"""Pipeline costs: per-stage time of a full default `dvc repro`, no-op repro time, rerun after a
`hessian.mix_k` edit as a fraction of the full run, and encode time / peak memory at 1x, 2x, 4x
corpus size (linear time, flat memory are the goals).

Works in a fresh `git clone` of this repo under --work, with the current Python environment
(the one that has trackstar and dvc installed). Writes benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from tests.harness import ROOT, child_env, measured, set_param, write_results  # noqa: E402
from common import show  # noqa: E402

HERE = ROOT / "benchmarks"


def timed_repro(repo: Path, *args: str, env: dict[str, str] | None = None) -> tuple[float, dict[str, float], list[str]]:
    """Wall time of `dvc repro`, the time of each stage it ran (from its 'Running stage' lines), and their names;
    `env` adds environment variables to the child's."""
    t0 = time.perf_counter()
    marks: list[tuple[str, float]] = []
    proc = subprocess.Popen(["dvc", "repro", *args], cwd=repo, env={**child_env(repo), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:
        log.append(line)
        m = re.match(r"Running stage '([^']+)'", line)
        if m:
            marks.append((m.group(1), time.perf_counter()))
    if proc.wait():
        sys.exit(f"dvc repro failed in {repo}:\n{''.join(log[-40:])}")
    end = time.perf_counter()
    stages = {name: (marks[i + 1][1] if i + 1 < len(marks) else end) - t for i, (name, t) in enumerate(marks)}
    return end - t0, stages, [m[0] for m in marks]


def encode_scaling(repo: Path, work: Path, scales: list[int]) -> list[dict]:
    """encode@train on the corpus repeated s times (fresh ids), in its own process: time, peak RSS."""
    out = []
    src = (repo / "data/corpus.jsonl").read_text().splitlines()
    for s in scales:
        d = work / f"scale{s}"
        shutil.rmtree(d, ignore_errors=True)
        (d / "data").mkdir(parents=True)
        shutil.copy(repo / "params.yaml", d / "params.yaml")
        os.symlink(repo / "model", d / "model")
        if (repo / "model_moments").exists():
            os.symlink(repo / "model_moments", d / "model_moments")
        shutil.copy(repo / "data/queries.jsonl", d / "data/queries.jsonl")
        with open(d / "data/corpus.jsonl", "w") as f:
            for r in range(s):
                for line in src:
                    rec = json.loads(line)
                    rec["id"] = f"{rec['id']}~{r}"
                    f.write(json.dumps(rec) + "\n")
        m = measured([sys.executable, str(repo / "stages/encode.py"), "train"], d, child_env(repo))
        if m.rc:
            sys.exit(f"encode at scale {s} failed")
        info = json.loads(m.stdout.strip().splitlines()[-1])
        out.append({"scale": s, "rows": info["rows"], "d": info["d"], "seconds": m.seconds,
                    "rows_per_s": info["rows"] / m.seconds, "peak_rss_mb": m.peak_rss_mb})
        print(f"encode x{s}: {info['rows']} rows in {m.seconds:.1f} s, peak RSS {m.peak_rss_mb:.0f} MB", flush=True)
        shutil.rmtree(d)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/trackstar-bench-pipeline")
    ap.add_argument("--scales", default="1,2,4")
    ap.add_argument("--mix-k", type=int, default=80, help="the hessian.mix_k value of the edit")
    ap.add_argument("--out", default=str(HERE / "results/pipeline.json"))
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    repo = work / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    # a fresh clone: no DVC cache and no outputs, so every stage runs (as for a new user)

    # --force: every stage runs. Without it a clone whose committed dvc.lock matches the code skips
    # `evaluate` (its outputs are git-tracked, cache: false, and come with the clone), and the full run
    # would leave out its cost and its tail-patch memo
    full_s, stages, ran = timed_repro(repo, "--force")
    assert "evaluate" in ran, ran
    print(f"full dvc repro: {full_s:.1f} s", flush=True)
    noop = []
    for _ in range(3):
        sec, _, ran = timed_repro(repo)
        assert not ran, f"no-op repro ran {ran}"
        noop.append(sec)
    print(f"no-op dvc repro: median {statistics.median(noop):.2f} s", flush=True)
    default_mix_k = yaml.safe_load((repo / "params.yaml").read_text())["hessian"]["mix_k"]
    set_param(repo, "hessian.mix_k", args.mix_k)
    edit_s, edit_stages, edit_ran = timed_repro(repo)
    print(f"after hessian.mix_k {default_mix_k} -> {args.mix_k}: {edit_s:.1f} s "
          f"({edit_s / full_s:.1%} of full), ran {edit_ran}", flush=True)
    set_param(repo, "hessian.mix_k", default_mix_k)
    revert_s, _, revert_ran = timed_repro(repo)
    print(f"revert (run-cache restore): {revert_s:.1f} s, ran {revert_ran}", flush=True)

    scaling = encode_scaling(repo, work, [int(s) for s in args.scales.split(",")])
    base = scaling[0]
    for r in scaling:
        r["time_ratio_vs_1x"] = r["seconds"] / base["seconds"]
        r["rss_ratio_vs_1x"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    figures = {
        "train_epochs": yaml.safe_load((repo / "params.yaml").read_text())["train"]["epochs"],
        "full_repro_s": full_s,
        "stage_s": stages,
        "noop_repro_s": noop,
        "noop_repro_median_s": statistics.median(noop),
        "mix_k_edit": {"from": default_mix_k, "to": args.mix_k, "seconds": edit_s, "fraction_of_full": edit_s / full_s,
                       "stages_run": edit_ran, "stage_s": edit_stages},
        "revert": {"seconds": revert_s, "stages_run": revert_ran},
        "encode_scaling": scaling,
    }
    params = {"clone": "default params.yaml", "mix_k_edit": args.mix_k, "scales": args.scales}
    show("pipeline", write_results(Path(args.out), params, figures))


if __name__ == "__main__":
    main()
