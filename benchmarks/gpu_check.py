"""The GPU check: on one device, the encoder in fp32 and in bf16 autocast against the CPU's fp32 rows (TrackStar
scores and MRR), its tokens/s against a plain training step of the same model and batches, and exact search on
the device against FAISS's CPU flat index. Writes benchmarks/results/gpu.json with the commit.

What it compares, all on the same examples (the world's first --passages passages and every query), each
encoder built by the library (`Encoder`, `encode.device` / `encode.autocast` set as a user would):

  encode      cpu_fp32 (the reference), then fp32 and bf16 on --device: tokens/s of the passages' encode (after
              one warm-up batch); the corrected rows' relative error; the TrackStar scores (rows whitened by
              the world's `hessian` W_mix, unit-normalized, query x passage dot products) against the
              reference's: largest difference, mean and lowest per-query Spearman rank correlation, top-1
              agreement; and TrackStar MRR / recall@10 within the --passages passages
  train_step  forward + backward + AdamW step (the train stage's loss) of the same checkpoint over the same
              batches (sorted by length, encode.batch_size), fp32 and bf16: encode's cost in training steps
  search      exact inner-product top-k of the reference's final rows: FAISS IndexFlatIP on the CPU against
              faiss-gpu's flat index when faiss-gpu sees a GPU, else torch (one matmul + topk) on --device, with
              the reason; time and agreement of the ids

The world: --repo, a repo where `dvc repro hessian` has run, or else one built here in a temporary folder from
this checkout (--world default: params.yaml with train.epochs 3, so that it fits the budget; tiny: the tests'
world), encoded on the CPU so that W_mix comes from fp32 rows. Budget: benchmarks/gpu_check.sh stops it after
5 minutes. Not yet run on a GPU; estimated from the 2-core stage times (benchmarks/results/pipeline.json), the
default world's build takes about 85 s of stages on 2 cores, the check a CPU encode of 4,800 examples (~20 s)
plus the device's work. On 2 CPU cores `--device cpu --world tiny` took 28 s (22 s of it the build).

usage: benchmarks/gpu_check.sh [--device cuda|cpu] [--world default|tiny] [--repo PATH] [--passages N]
                               [--out benchmarks/results/gpu.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from common import sync, timed_loop  # noqa: E402
from tests.harness import ROOT, child_env, make_repo, measured, write_results  # noqa: E402

if TYPE_CHECKING:
    from trackstar.config import Params
    from trackstar.data.examples import Example

WORLDS = {"default": {"train": {"epochs": 3}}}


@dataclass
class World:
    """A built world's files and what the check encodes of it."""
    repo: Path
    params: Params
    passages: list[Example]
    passage_ids: list[str]
    queries: list[Example]
    relevant: list[set[str] | None]


@dataclass
class Encoded:
    """One encoder's corrected rows of the passages and the queries, and the passages' encode time."""
    passages: np.ndarray
    queries: np.ndarray
    seconds: float


def build_world(name: str, dest: Path) -> tuple[Path, float]:
    """A copy of this checkout in dest with the `name` world's params, encoded on the CPU, after `dvc repro
    hessian`; its path and the seconds the build took."""
    from tests.pipeline import TINY

    overrides = {**(TINY if name == "tiny" else WORLDS[name]), "encode": {"device": "cpu"}}
    repo = make_repo(dest / "repo", overrides)
    run = measured([sys.executable, "-m", "dvc", "repro", "hessian"], repo, child_env(repo))
    if run.rc != 0:
        raise SystemExit(f"dvc repro hessian failed in {repo}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return repo, run.seconds


def load_world(repo: Path, n_passages: int | None) -> World:
    """The params and the examples (tokenized once, by a CPU encoder) of a built world."""
    from trackstar import layout
    from trackstar.config import load_params
    from trackstar.data.records import iter_corpus, read_queries
    from trackstar.encode.encoder import Encoder

    params = load_params(repo / "params.yaml")
    enc = Encoder(params, repo / layout.MODEL, repo / layout.MOMENTS, repo / "params.yaml")
    corpus, queries = repo / layout.CORPUS, repo / layout.QUERIES
    ids = [p.id for p in islice(iter_corpus(corpus), n_passages)]
    return World(repo, params, list(islice(enc.passages(corpus), len(ids))), ids, list(enc.queries(queries)),
                 [set(q.relevant_ids) if q.relevant_ids is not None else None for q in read_queries(queries)])


def encode(world: World, device: str, autocast: str) -> Encoded:
    """The world's examples through the library's encoder with encode.device / encode.autocast set."""
    from trackstar import layout
    from trackstar.encode.encoder import Encoder

    p = world.params
    params = p.model_copy(update={"encode": p.encode.model_copy(update={"device": device, "autocast": autocast})})
    enc = Encoder(params, world.repo / layout.MODEL, world.repo / layout.MOMENTS, world.repo / "params.yaml")
    enc.encode(world.passages[:p.encode.batch_size])  # warm-up (CUDA context, kernels)
    sync(enc.device)
    t0 = time.perf_counter()
    rows = enc.encode(world.passages)[0].copy()
    sync(enc.device)
    seconds = time.perf_counter() - t0
    return Encoded(rows, enc.encode(world.queries)[0].copy(), seconds)


def train_step_seconds(world: World, device: str, bf16: bool) -> float:
    """Seconds of forward + backward + AdamW step over the encoder's batches of the passages (after one)."""
    import torch

    from trackstar import layout
    from trackstar.data.examples import collate, pad_token_id
    from trackstar.distributed import rank_device
    from trackstar.model.checkpoint import checkpoint_dtype, load_checkpoint, weights_dtype
    from trackstar.model.train import _batch_loss

    dev = torch.device(rank_device(device, 0))
    model_dir = world.repo / layout.MODEL
    model, tok = load_checkpoint(model_dir, dev, weights_dtype(checkpoint_dtype(model_dir), dev))
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)  # the rate does not enter the timing
    pad, size = pad_token_id(tok), world.params.encode.batch_size
    order = sorted(world.passages, key=lambda e: len(e.input_ids))  # the encoder's batches
    batches = [collate(order[i:i + size], pad) for i in range(0, len(order), size)]

    def step(b: dict) -> None:
        b = {k: v.to(dev) for k, v in b.items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = _batch_loss(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed_loop(step, batches, dev)


def final_rows(world: World, rows: np.ndarray) -> np.ndarray:
    """Rows as the `precondition` stage writes them: W_mix g, unit-normalized."""
    from trackstar import layout
    from trackstar.hessian.whitening import load_whitening, whiten

    w, _ = load_whitening(world.repo / layout.W_MIX, world.repo / layout.EIGEN)
    return whiten(rows, w, normalize=True)


def scores(world: World, e: Encoded) -> np.ndarray:
    """TrackStar scores, queries x passages."""
    return final_rows(world, e.queries) @ final_rows(world, e.passages).T


def quality(world: World, s: np.ndarray) -> dict:
    """TrackStar MRR@retrieve.k and recall@10 of score matrix s within the encoded passages."""
    from trackstar.evaluation.metrics import mrr, recall_at_k

    top = np.argsort(-s, axis=1, kind="stable")[:, :world.params.retrieve.k]
    ranked = [[world.passage_ids[j] for j in row] for row in top]
    return {"mrr": mrr(ranked, world.relevant), "recall@10": recall_at_k(ranked, world.relevant, 10)}


def versus(ref: np.ndarray, s: np.ndarray) -> dict:
    """How score matrix s agrees with the reference's: per-query Spearman, top-1, largest difference."""
    from scipy.stats import rankdata

    a, b = rankdata(ref, axis=1), rankdata(s, axis=1)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    rho = (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    return {"spearman_mean": float(rho.mean()), "spearman_min": float(rho.min()),
            "top1_agree": float((ref.argmax(axis=1) == s.argmax(axis=1)).mean()),
            "score_max_abs_diff": float(np.abs(ref - s).max())}


def search(p: np.ndarray, q: np.ndarray, k: int, device: str) -> dict:
    """Exact inner-product top-k: FAISS's CPU flat index against faiss-gpu (when it sees a GPU) or torch on the
    device; seconds (after a warm-up) and agreement."""
    import faiss
    import torch

    from trackstar.distributed import rank_device

    cpu = faiss.IndexFlatIP(p.shape[1])
    cpu.add(p)
    t0 = time.perf_counter()
    d_cpu, i_cpu = cpu.search(q, k)
    cpu_s = time.perf_counter() - t0
    dev = torch.device(rank_device(device, 0))
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if dev.type == "cuda" and gpus > 0:
        how, why = "faiss-gpu", "faiss-gpu sees a GPU"
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
        index.search(q[:1], k)
        t0 = time.perf_counter()
        d_dev, i_dev = index.search(q, k)
    else:
        how = "torch"
        why = "faiss-gpu is not installed or sees no GPU" if dev.type == "cuda" else "--device cpu"
        pt, qt = torch.from_numpy(p).to(dev), torch.from_numpy(q).to(dev)
        torch.topk(qt[:1] @ pt.T, k)
        sync(dev)
        t0 = time.perf_counter()
        top = torch.topk(qt @ pt.T, k)
        sync(dev)
        d_dev, i_dev = top.values.cpu().numpy(), top.indices.cpu().numpy()
    dev_s = time.perf_counter() - t0
    return {"rows": len(p), "queries": len(q), "d": p.shape[1], "k": k, "cpu_faiss_flat_s": cpu_s,
            "device": how, "why": why, "device_s": dev_s, "ids_equal": float((i_cpu == i_dev).all(axis=1).mean()),
            "score_max_abs_diff": float(np.abs(d_cpu - d_dev).max())}


def check(world: World, device: str) -> dict:
    """Every figure of the check on one built world."""
    import torch

    tokens = sum(len(e.input_ids) for e in world.passages)
    ref = encode(world, "cpu", "off")
    ref_scores = scores(world, ref)
    out = {"encode": {"cpu_fp32": {"tokens_per_s": tokens / ref.seconds, **quality(world, ref_scores)}},
           "train_step": {}}
    for name, autocast in (("fp32", "off"), ("bf16", "bf16")):
        e = encode(world, device, autocast)
        s = scores(world, e)
        rel = float(np.linalg.norm(e.passages - ref.passages) / np.linalg.norm(ref.passages))
        train_s = train_step_seconds(world, device, autocast == "bf16")
        out["encode"][name] = {"tokens_per_s": tokens / e.seconds, "rows_rel_err": rel, **quality(world, s),
                               "vs_cpu_fp32": versus(ref_scores, s)}
        out["train_step"][name] = {"tokens_per_s": tokens / train_s, "encode_over_train_time": e.seconds / train_s}
    out["search"] = search(final_rows(world, ref.passages), final_rows(world, ref.queries),
                           world.params.retrieve.k, device)
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    out["world_size"] = {"passages": len(world.passages), "queries": len(world.queries), "tokens": tokens,
                         "d": int(ref.passages.shape[1]), "gpu": gpu}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--world", default="default", choices=["default", "tiny"])
    ap.add_argument("--repo", type=Path, help="a repo after `dvc repro hessian` (default: build --world)")
    ap.add_argument("--passages", type=int, help="the first N passages (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        repo, build_s = (args.repo, None) if args.repo else build_world(args.world, Path(tmp))
        t0 = time.perf_counter()
        figures = check(load_world(repo.resolve(), args.passages), args.device)
        figures["seconds"] = {"build_world": build_s, "check": time.perf_counter() - t0}
    result = write_results(args.out, {"device": args.device, "world": None if args.repo else args.world,
                                      "repo": str(args.repo) if args.repo else None, "passages": args.passages},
                           figures)
    print(f"wrote {args.out}: bf16 vs CPU fp32 {result['encode']['bf16']['vs_cpu_fp32']}", file=sys.stderr)


if __name__ == "__main__":
    main()
