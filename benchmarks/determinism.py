"""Which stages give bit-identical outputs on another CPU: the default pipeline built once, then rebuilt under
stand-ins for another machine (torch's kernel set via ATEN_CPU_CAPABILITY, thread counts, OpenBLAS's core type),
comparing each stage's output hashes (dvc.lock) with the first build.

Two questions per stand-in: (1) `train` rerun there: is the model the same? (2) with the first build's model (as
after `dvc pull`), the stages after `train` rerun there: are their outputs the same? Training is shortened
(`--epochs`, default 3): bit-identity does not depend on how long the model trained, and the downstream stages
read the same shapes either way.

    python benchmarks/determinism.py [--epochs 3] [--work DIR] [--out FILE]

Writes benchmarks/results/determinism.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from tests.harness import ROOT, child_env, make_repo, set_param, write_results  # noqa: E402
from common import show  # noqa: E402

# stand-ins for another machine of the same kind; each names what it changes
VARIANTS: dict[str, dict[str, str]] = {
    "aten_avx2": {"ATEN_CPU_CAPABILITY": "avx2"},  # torch's AVX2 kernels, as on a CPU without AVX-512
    "threads_1": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    "openblas_haswell": {"OPENBLAS_CORETYPE": "Haswell"},  # numpy's BLAS kernels only
}
# stages whose outputs are reports of timing, or whose hash includes wall-clock figures, are not compared
NOT_COMPARED = {"report"}


def repro(repo: Path, env: dict[str, str], *args: str) -> None:
    """`dvc repro args` in repo under os.environ + env (exits on failure)."""
    proc = subprocess.run(["dvc", "repro", *args], cwd=repo, env=child_env(repo, {**os.environ, **env}),
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"dvc repro {' '.join(args)} failed in {repo} under {env}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def out_hashes(repo: Path) -> dict[str, dict[str, str]]:
    """{stage: {output path: md5}} from repo/dvc.lock (outputs DVC caches or tracks)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {name: {o["path"]: o.get("md5", "") for o in st.get("outs", [])} for name, st in lock.items()}


def compare(base: dict, other: dict, stages: list[str]) -> dict[str, bool]:
    """Per stage: every output byte-identical (same md5) to the base build's."""
    return {s: base[s] == other[s] for s in stages if s in base and s not in NOT_COMPARED}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", default="/tmp/trackstar-bench-determinism")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/determinism.json"))
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    base_repo = make_repo(work / "base")
    set_param(base_repo, "train.epochs", args.epochs)
    repro(base_repo, {})
    base = out_hashes(base_repo)
    downstream = [s for s in base if s not in ("data", "train")]
    results = {}
    for name, env in VARIANTS.items():
        repo = work / name
        shutil.copytree(base_repo, repo, symlinks=True)
        repro(repo, env, "--force", "--downstream", "moments")  # the base build's model, as after `dvc pull`
        same_model = compare(base, out_hashes(repo), downstream)
        repro(repo, env, "--force", "--single-item", "train")
        results[name] = {"env": env, "train_identical": base["train"] == out_hashes(repo)["train"],
                         "with_base_model": same_model,
                         "identical_with_base_model": sorted(s for s, ok in same_model.items() if ok),
                         "different_with_base_model": sorted(s for s, ok in same_model.items() if not ok)}
        print(f"{name}: train identical {results[name]['train_identical']}; with the base model, different: "
              f"{results[name]['different_with_base_model'] or 'none'}", flush=True)
        shutil.rmtree(repo)
    params = {"epochs": args.epochs, "variants": VARIANTS, "not_compared": sorted(NOT_COMPARED)}
    show("determinism", write_results(Path(args.out), params, {"variants": results}))


if __name__ == "__main__":
    main()
