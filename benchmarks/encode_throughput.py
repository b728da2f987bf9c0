"""Gradient-encoding throughput next to plain training and next to EleutherAI bergson.

What: tokens/s (non-pad tokens only) of, on the SAME checkpoint, the SAME tokenized passages,
the SAME batches (passages sorted by length, then cut into --batch-size batches, so padding is
identical) and the SAME device:

  training        forward + backward + torch.optim.AdamW step, batch by batch (the cost of one
                  epoch of pretraining on these passages: the yardstick);
  ours            the encode stage's fast hook path (the stage's `Encoder`, `Encoder.encode`): per-example
                  loss gradients of every selected layer, rank-1 (Adafactor-style) Adam correction
                  when the checkpoint has optimizer state, Kronecker projection to k x k per layer;
                  corrected AND plain rows, as the stage computes with `encode.save_plain: true`;
  ours_corrected  the same without the plain rows (what bergson computes: corrected rows only);
  bergson         bergson 2.5.1's gradient build loop (`GradientCollector` + `CollectorComputer`,
                  what `bergson build` / `collect_gradients` run), per-module projection, its
                  AdafactorNormalizer built from the same second moments, writing its on-disk index.

Why: the encode stage is the expensive one; "how many training epochs does one encoding pass
cost" and "how does it compare with the reference implementation" are the two numbers a user
needs to budget a run. Both libraries compute the same per-layer two-sided projection
P_out (sum_t delta_t a_t^T) P_in^T from forward/backward hooks, so the comparison is like for like.

Projection size: ours is d = k^2 x (layers found); the library takes one k for every layer, so
d = 2^14 can't be hit exactly: k is what `projection.d: --target-d` (default 2^14) gives, the largest
k with k^2 x layers <= --target-d (`ProjectionParams.k_for`). bergson's `projection_dim` p gives a
p x p block per module (`HookCollectorBase.shapes`), i.e. d = p^2 x modules; p is chosen the
same way, and on the same module set (every nn.Linear incl. lm_head) it is p = k, d equal.

Each measurement runs in its own subprocess (so each peak RSS, ru_maxrss, is its own) and
times only its batch loop, after one warm-up batch; model loading and tokenization are not
timed. No network: everything loads from the local checkpoint directory.

usage (after `dvc repro`; bergson needs its own venv, see below):
    python benchmarks/encode_throughput.py [--model model] [--corpus data/corpus.jsonl]
        [--examples 2048] [--batch-size 32] [--max-length 64]
        [--out benchmarks/results/encode_throughput.json]
bergson is optional: if it is not importable its entry is null, with the reason. Install it in
a separate venv (it pins other versions than ours):
    python3 -m venv /tmp/bvenv && . /tmp/bvenv/bin/activate && pip install torch==2.13.0 -e . &&
    pip install --no-deps bergson==2.5.1 && pip install accelerate jaxtyping ml_dtypes natsort \
        scipy peft petname simple-parsing torchopt
and run the script with /tmp/bvenv/bin/python.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from tests.harness import peak_rss_mb, write_results  # noqa: E402

MEASUREMENTS = ("training", "floor", "ours", "ours_corrected", "bergson")
RESULT_TAG = "ENCODE_THROUGHPUT_RESULT "


# --------------------------------------------------------------------------- shared setup

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _params():
    """params.yaml sections the encode stage reads (library defaults when there is no params.yaml)."""
    from trackstar.config import CorrectionParams, GradientsParams, ProjectionParams

    if Path("params.yaml").is_file():
        from trackstar.config import load_params

        p = load_params()
        return p.gradients, p.correction, p.projection
    return GradientsParams(), CorrectionParams(), ProjectionParams()


def _prepare(args) -> None:
    """Torch as every pipeline stage sets it (trackstar.runner), the thread count asked for, a fixed seed."""
    import torch

    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def _examples(tok, args):
    """The passages as examples sorted by length, and their batches (index lists)."""
    from trackstar.data.records import iter_corpus
    from trackstar.data.examples import passage_example

    texts = [p.text for _, p in zip(range(args.examples), iter_corpus(args.corpus))]
    if not texts:
        raise SystemExit(f"{args.corpus}: no passages")
    examples = [passage_example(tok, t, args.max_length) for t in texts]
    # the encode stage sorts by length inside a chunk (trackstar.encode.encoder.Encoder.encode); sorting here
    # once (stable) gives every measurement the very same batches and padding
    examples.sort(key=lambda e: len(e.input_ids))
    batches = [list(range(i, min(i + args.batch_size, len(examples))))
               for i in range(0, len(examples), args.batch_size)]
    return examples, batches


def _setup(args):
    """Model, tokenizer, examples sorted by length, batches (index lists), pad id, device."""
    from trackstar.model.checkpoint import load_checkpoint, pick_device
    from trackstar.data.examples import pad_token_id

    _prepare(args)
    device = pick_device(args.device)
    model, tok = load_checkpoint(args.model)
    model.to(device)
    examples, batches = _examples(tok, args)
    return model, tok, examples, batches, pad_token_id(tok), device


def _model_info(model, args) -> dict:
    return {"name": Path(args.model).resolve().name, "type": type(model).__name__,
            "params": sum(p.numel() for p in model.parameters()),
            "layers": int(getattr(model.config, "num_hidden_layers", 0) or 0),
            "hidden_size": int(getattr(model.config, "hidden_size", 0) or 0)}


def _common(examples, batches, seconds: float, device) -> dict:
    tokens = sum(len(e.input_ids) for e in examples)  # non-pad tokens (bos/eos included)
    return {"examples": len(examples), "batches": len(batches), "tokens": tokens,
            "seconds": round(seconds, 4), "tokens_per_s": tokens / seconds, "device": str(device)}


def _timed_loop(step, examples, batches, device) -> dict:
    """One untimed warm-up batch, then `step` over every batch, timed."""
    step(batches[0])
    _sync(device)
    t0 = time.perf_counter()
    for idx in batches:
        step(idx)
    _sync(device)
    return _common(examples, batches, time.perf_counter() - t0, device)


# --------------------------------------------------------------------------- measurements

def measure_training(args) -> dict:
    import torch

    from trackstar.data.examples import collate
    from trackstar.model.train import _batch_loss

    model, _tok, examples, batches, pad_id, device = _setup(args)
    autocast = torch.bfloat16 if device.type == "cuda" else None  # as the encode stage on CUDA
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)  # lr is irrelevant to the timing

    def step(idx):
        b = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = _batch_loss(model, b)  # the train stage's loss: mean token cross-entropy
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out = _timed_loop(step, examples, batches, device)  # warm-up batch first (allocates AdamW's state)
    out.update(optimizer="torch.optim.AdamW", loss="mean token cross-entropy (train stage)",
               autocast=str(autocast) if autocast else None,
               model=_model_info(model, args))
    return out


def measure_floor(args) -> dict:
    """Forward + backward to the activations with frozen weights and no projection: the work every
    hook-based encoder (ours, bergson) must do before it projects anything, i.e. its speed ceiling."""
    import torch

    from trackstar.data.examples import collate, per_example_loss

    model, _tok, examples, batches, pad_id, device = _setup(args)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))

    def step(idx):
        b = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        per_example_loss(logits, b["input_ids"], b["loss_mask"]).sum().backward()

    out = _timed_loop(step, examples, batches, device)
    out.update(model=_model_info(model, args))
    return out


def measure_ours(args, plain: bool) -> dict:
    import numpy as np

    from trackstar.config import EncodeParams, Params
    from trackstar.encode.encoder import Encoder
    from trackstar.model.checkpoint import load_second_moments

    _prepare(args)
    gp, cp, pp = _params()
    kind = "adam_rank1" if load_second_moments(args.model) is not None else "none"
    params = Params(gradients=gp.model_copy(update={"max_length": args.max_length}), correction=cp.model_copy(update={"kind": kind}),
                    projection=pp.model_copy(update={"d": args.target_d}),
                    encode=EncodeParams(device=args.device, batch_size=args.batch_size, save_plain=plain))
    enc = Encoder(params, args.model, Path(args.model) / "no_moments_file")  # kind is never `estimated` here
    model, device = enc.model, enc.device
    examples, batches = _examples(enc.tok, args)
    # output rows go to buffers allocated (and faulted in) once, as the stage reuses one pair for all chunks
    out = tuple(np.ones((len(examples), enc.d), dtype=np.float32) for _ in range(2))
    enc.encode([examples[i] for i in batches[0]], out)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    # examples are already sorted by length, so the encoder's own (stable) sort keeps these batches
    cor, pl = enc.encode(examples, out)
    _sync(device)
    seconds = time.perf_counter() - t0
    out = _common(examples, batches, seconds, device)
    out.update(d=enc.d, k=enc.k, n_layers=len(enc.layers), k_choice="one k for all layers (the largest with "
               f"k^2 x layers <= {args.target_d}; the library has no per-layer k)", correction=kind, plain_rows=plain,
               autocast=str(enc.autocast) if enc.autocast else None, weights=str(next(model.parameters()).dtype),
               model=_model_info(model, args), layers=[l.name for l in enc.layers])
    return out


def measure_bergson(args) -> dict:
    try:
        import bergson
        from bergson.collector.collector import CollectorComputer, HookCollectorBase
        from bergson.collector.gradient_collectors import GradientCollector
        from bergson.config.config import IndexConfig, PreprocessConfig
        from bergson.gradients import AdamNormalizer
        from bergson.utils.worker_utils import processor_for
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return {"error": f"bergson not importable: {type(e).__name__}: {e}"}
    import torch
    from datasets import Dataset

    from trackstar.model.checkpoint import load_second_moments

    try:
        from importlib.metadata import version

        bergson_version = version("bergson")
    except Exception:  # noqa: BLE001
        bergson_version = getattr(bergson, "__version__", None)

    model, _tok, examples, batches, pad_id, device = _setup(args)
    # gradient setup of bergson.utils.worker_utils.setup_model_and_peft: all weights frozen, the
    # input embeddings trainable (so every layer's output has a gradient to hook)
    model.requires_grad_(False)
    model.get_input_embeddings().requires_grad_(True)

    # The collector is given the full LlamaForCausalLM, not model.base_model as collect_gradients
    # does: base_model (LlamaModel) lacks lm_head, which ours encodes; with the full model both
    # encode the same nn.Linear set, and bergson's discovery (every LayerAdapter.supported_modules)
    # finds exactly ours.
    targets = HookCollectorBase.discover_targets(model)
    p = _params()[2].model_copy(update={"d": args.target_d}).k_for(len(targets))  # as ours: projection.d's k

    normalizers = {}
    state = load_second_moments(args.model)  # bias-corrected v-hat by parameter name
    if state and args.bergson_normalizer != "none":
        mods = dict(model.named_modules())
        params = {id(prm): n for n, prm in model.named_parameters()}
        for name in targets:
            v = state[0][params[id(mods[name].weight)]].to(device)  # nn.Linear: [out, in]
            adam = AdamNormalizer(weight_avg_sq=v)
            # adafactor: bergson's own rank-1 fit (row/col means), the same math as our adam_rank1
            normalizers[name] = adam.to_adafactor() if args.bergson_normalizer == "adafactor" else adam

    run_root = Path(tempfile.mkdtemp(prefix="bergson-bench-"))
    data = Dataset.from_dict({"input_ids": [e.input_ids for e in examples],
                              "length": [len(e.input_ids) for e in examples]})

    def run(run_path: str, batch_list) -> tuple[float, float, object]:
        cfg = IndexConfig(run_path=run_path, model=str(args.model), projection_dim=p, precision="fp32",
                          loss_reduction="sum", loss_fn="ce")
        cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
        processor = processor_for(cfg, normalizers)  # what create_processor builds, minus its file I/O
        collector = GradientCollector(model=model, cfg=cfg, processor=processor, data=data,
                                      preprocess_cfg=PreprocessConfig(), attention_cfgs={},
                                      filter_modules=cfg.filter_modules)
        computer = CollectorComputer(model=model, data=data, collector=collector, batches=batch_list, cfg=cfg)
        teardown_s = [0.0]
        inner = collector.teardown

        def timed_teardown():  # saving data.hf / processor after the loop: excluded from the timing
            t = time.perf_counter()
            inner()
            teardown_s[0] = time.perf_counter() - t

        collector.teardown = timed_teardown
        _sync(device)
        t0 = time.perf_counter()
        computer.run_with_collector_hooks(desc="bench")
        _sync(device)
        total = time.perf_counter() - t0
        return total - teardown_s[0], teardown_s[0], collector

    run(str(run_root / "warmup"), [batches[0]])  # warm-up
    seconds, teardown, collector = run(str(run_root / "index"), batches)
    shapes = collector.shapes()
    d = sum(int(torch.Size(s).numel()) for s in shapes.values())
    out = _common(examples, batches, seconds, device)
    out.update(version=bergson_version, d=d, projection_dim=p, n_modules=len(shapes),
               normalizer=(type(next(iter(normalizers.values()))).__name__ if normalizers else None),
               teardown_seconds_excluded=round(teardown, 4), autocast=None, precision="fp32",
               model=_model_info(model, args),
               entry="GradientCollector + CollectorComputer.run_with_collector_hooks on the full model "
                     "(collect_gradients minus its model.base_model), on-disk index written (Builder)",
               modules=list(shapes))
    shutil.rmtree(run_root, ignore_errors=True)
    return out


def worker(args) -> None:
    if args.worker == "training":
        res = measure_training(args)
    elif args.worker == "floor":
        res = measure_floor(args)
    elif args.worker == "ours":
        res = measure_ours(args, plain=True)
    elif args.worker == "ours_corrected":
        res = measure_ours(args, plain=False)
    else:
        res = measure_bergson(args)
    import torch

    res["torch_threads"] = torch.get_num_threads()
    res["torch"] = torch.__version__
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(RESULT_TAG + json.dumps(res), flush=True)


# --------------------------------------------------------------------------- driver

def run_child(name: str, argv: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    print(f"[{name}] running ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, __file__, *argv, "--worker", name], env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"error": f"worker exited with {proc.returncode}: " + " | ".join(tail)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="model", help="checkpoint dir (HF model + tokenizer + optimizer state)")
    ap.add_argument("--corpus", default="data/corpus.jsonl")
    ap.add_argument("--examples", type=int, default=2048, help="first N passages of the corpus")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--target-d", type=int, default=2 ** 14, help="projection size to approach (total)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--bergson-normalizer", default="adafactor", choices=["adafactor", "adam", "none"],
                    help="adafactor = bergson's rank-1 fit (our adam_rank1's math); adam = its exact "
                         "element-wise normalizer, which forms each [out, in] gradient before projecting")
    ap.add_argument("--measure", default=",".join(MEASUREMENTS),
                    help=f"comma-separated subset of {','.join(MEASUREMENTS)}")
    ap.add_argument("--out", default="benchmarks/results/encode_throughput.json")
    ap.add_argument("--worker", choices=MEASUREMENTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    wanted = [m.strip() for m in args.measure.split(",") if m.strip()]
    if unknown := set(wanted) - set(MEASUREMENTS):
        ap.error(f"--measure: unknown {sorted(unknown)}; choose from {MEASUREMENTS}")
    argv = ["--model", args.model, "--corpus", args.corpus, "--examples", str(args.examples),
            "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
            "--target-d", str(args.target_d), "--device", args.device, "--threads", str(args.threads),
            "--bergson-normalizer", args.bergson_normalizer]
    res = {m: (run_child(m, argv) if m in wanted else {"error": "not measured (--measure)"}) for m in MEASUREMENTS}

    def ok(m):
        return "error" not in res[m]

    def tps(m):
        return res[m]["tokens_per_s"] if ok(m) else None

    def ratio(a, b):
        return tps(a) / tps(b) if ok(a) and ok(b) else None

    first = next((res[m] for m in MEASUREMENTS if ok(m)), {})
    model_info = first.get("model")
    out = {
        "workers": {"torch": first.get("torch"), "torch_threads": first.get("torch_threads"),
                    "device": first.get("device")},
        "model": model_info or {"name": Path(args.model).resolve().name},
        "model_dir": str(args.model),
        "corpus": args.corpus,
        "examples": first.get("examples"),
        "tokens": first.get("tokens"),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "target_d": args.target_d,
        "d_ours": next((res[m]["d"] for m in ("ours", "ours_corrected") if ok(m)), None),
        "k_ours": next((res[m]["k"] for m in ("ours", "ours_corrected") if ok(m)), None),
        "d_bergson": res["bergson"].get("d") if ok("bergson") else None,
        "projection_dim_bergson": res["bergson"].get("projection_dim") if ok("bergson") else None,
        "tokens_per_s_training": tps("training"),
        "tokens_per_s_floor": tps("floor"),
        "tokens_per_s_ours": tps("ours"),
        "tokens_per_s_ours_corrected_only": tps("ours_corrected"),
        "tokens_per_s_bergson": tps("bergson"),
        "ratio_vs_training": ratio("ours", "training"),
        "ratio_vs_bergson": ratio("ours", "bergson"),
        "ratio_corrected_only_vs_bergson": ratio("ours_corrected", "bergson"),
        "ratio_floor_vs_bergson": ratio("floor", "bergson"),
        "ratio_corrected_only_vs_floor": ratio("ours_corrected", "floor"),
        "bergson": None if not ok("bergson") else {k: res["bergson"][k] for k in
                                                   ("version", "normalizer", "entry", "n_modules", "precision")},
        "bergson_null_reason": None if ok("bergson") else res["bergson"]["error"],
        "peak_rss_mb": {m: res[m].get("peak_rss_mb") for m in MEASUREMENTS},
        "seconds": {m: res[m].get("seconds") for m in MEASUREMENTS},
        "details": res,
    }
    out = write_results(Path(args.out), {k: v for k, v in vars(args).items() if k != "worker"}, out)

    rows = [("training (fwd+bwd+AdamW)", "training", "-"), ("floor (frozen fwd+bwd)", "floor", "-"), ("ours (corrected + plain)", "ours", out["d_ours"]),
            ("ours (corrected only)", "ours_corrected", out["d_ours"]), ("bergson build", "bergson", out["d_bergson"])]
    print(f"model {out['model'].get('name')} ({out['model'].get('params')} params), {out['examples']} passages, "
          f"{out['tokens']} tokens, batch {args.batch_size}, {out['machine']['cpus']} cpus, "
          f"{out['workers']['torch_threads']} torch threads")
    print(f"{'measurement':<28}{'d':>8}{'tokens/s':>12}{'seconds':>10}{'peak RSS MB':>13}")
    for label, m, d in rows:
        if ok(m):
            print(f"{label:<28}{d!s:>8}{tps(m):>12.0f}{res[m]['seconds']:>10.2f}{res[m]['peak_rss_mb']:>13.0f}")
        else:
            print(f"{label:<28}{d!s:>8}{'null':>12}   ({res[m]['error'][:200]})")
    fmt = lambda x: f"{x:.3f}" if x is not None else "null"  # noqa: E731
    print(f"ours / training = {fmt(out['ratio_vs_training'])}   ours / bergson = {fmt(out['ratio_vs_bergson'])}   "
          f"ours corrected-only / bergson = {fmt(out['ratio_corrected_only_vs_bergson'])}   "
          f"floor / bergson = {fmt(out['ratio_floor_vs_bergson'])}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except Exception:  # a worker's traceback goes to its stderr, which the driver reports
        traceback.print_exc()
        sys.exit(1)
