"""Gradient-encoding throughput next to plain training and next to EleutherAI bergson.

Tokens/s (non-pad tokens) on the same checkpoint, passages, batches (sorted by length, so padding is identical)
and device, each measurement in its own process (its own peak RSS), its batch loop timed after one warm-up batch:

  training        forward + backward + AdamW step (the cost of one epoch of training on these passages)
  floor           frozen forward + backward to the activations, no projection: what every hook-based encoder
                  (ours, bergson) computes before it projects anything
  ours            the encode stage's `Encoder.encode`: rank-1 Adam correction when the checkpoint has optimizer
                  state, corrected AND plain rows (`encode.save_plain: true`)
  ours_corrected  the same, corrected rows only (what bergson computes)
  bergson         bergson 2.5.1's gradient build loop (GradientCollector + CollectorComputer) with its
                  AdafactorNormalizer from the same second moments, writing its on-disk index

d: ours is k^2 x layers with the k of `projection.d: --target-d` (ProjectionParams.k_for); bergson's
projection_dim p gives p^2 per module, chosen the same way on the same nn.Linear set, so d is equal.

    python benchmarks/encode_throughput.py [--model model] [--corpus data/corpus.jsonl] [--out ...]

bergson is optional (its entry is null, with the reason, when it cannot be imported). It pins other versions
than ours: install it in its own venv and run this script with that venv's python:
    python3 -m venv /tmp/bvenv && . /tmp/bvenv/bin/activate && pip install torch==2.13.0 -e . &&
    pip install --no-deps bergson==2.5.1 && pip install accelerate jaxtyping ml_dtypes natsort \
        scipy peft petname simple-parsing torchopt
A wider model for the same measurement: benchmarks/make_model.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from tests.harness import write_results  # noqa: E402
import common  # noqa: E402


# --------------------------------------------------------------------------- shared setup

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
    import torch

    tokens = sum(len(e.input_ids) for e in examples)  # non-pad tokens (bos/eos included)
    return {"examples": len(examples), "batches": len(batches), "tokens": tokens,
            "seconds": round(seconds, 4), "tokens_per_s": tokens / seconds, "device": str(device),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def _timed_loop(step, examples, batches, device) -> dict:
    """One untimed warm-up batch, then `step` over every batch, timed."""
    return _common(examples, batches, common.timed_loop(step, batches, device), device)


# --------------------------------------------------------------------------- measurements

def measure_step(args, train: bool) -> dict:
    """train: forward + backward + AdamW step with the train stage's loss. Else the floor: forward + backward to
    the activations with frozen weights, no projection (what every hook-based encoder runs before projecting)."""
    import torch

    from trackstar.data.examples import collate, per_example_loss
    from trackstar.model.train import _batch_loss

    model, _tok, examples, batches, pad_id, device = _setup(args)
    autocast = torch.bfloat16 if device.type == "cuda" else None  # as the encode stage on CUDA
    model.train(train)
    model.requires_grad_(train)
    if train:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)  # lr is irrelevant to the timing
    else:
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))

    def step(idx):
        b = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            # train: the train stage's loss (mean token cross-entropy); floor: the logits
            out = _batch_loss(model, b) if train else model(input_ids=b["input_ids"],
                                                             attention_mask=b["attention_mask"]).logits
        if not train:
            return per_example_loss(out, b["input_ids"], b["loss_mask"]).sum().backward()
        opt.zero_grad(set_to_none=True)
        out.backward()
        opt.step()

    out = _timed_loop(step, examples, batches, device)  # warm-up batch first (allocates AdamW's state)
    if train:
        out.update(optimizer="torch.optim.AdamW", loss="mean token cross-entropy (train stage)",
                   autocast=str(autocast) if autocast else None)
    return {**out, "model": _model_info(model, args)}


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
    common.sync(device)
    t0 = time.perf_counter()
    # examples are already sorted by length, so the encoder's own (stable) sort keeps these batches
    cor, pl = enc.encode(examples, out)
    common.sync(device)
    seconds = time.perf_counter() - t0
    out = _common(examples, batches, seconds, device)
    out.update(d=enc.d, k=enc.k, n_layers=len(enc.layers), k_choice="one k for all layers (the largest with "
               f"k^2 x layers <= {args.target_d}; the library has no per-layer k)", correction=kind, plain_rows=plain,
               autocast=str(enc.autocast) if enc.autocast else None, weights=str(next(model.parameters()).dtype),
               model=_model_info(model, args), layers=[l.name for l in enc.layers])
    return out


def measure_bergson(args) -> dict:
    try:
        from bergson.collector.collector import CollectorComputer, HookCollectorBase
        from bergson.collector.gradient_collectors import GradientCollector
        from bergson.config.config import IndexConfig, PreprocessConfig
        from bergson.gradients import AdamNormalizer
        from bergson.utils.worker_utils import processor_for
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return {"error": f"bergson not importable: {type(e).__name__}: {e}"}
    from importlib.metadata import version

    import torch
    from datasets import Dataset

    from trackstar.model.checkpoint import load_second_moments

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
        common.sync(device)
        t0 = time.perf_counter()
        computer.run_with_collector_hooks(desc="bench")
        common.sync(device)
        total = time.perf_counter() - t0
        return total - teardown_s[0], teardown_s[0], collector

    run(str(run_root / "warmup"), [batches[0]])  # warm-up
    seconds, teardown, collector = run(str(run_root / "index"), batches)
    shapes = collector.shapes()
    d = sum(int(torch.Size(s).numel()) for s in shapes.values())
    out = _common(examples, batches, seconds, device)
    out.update(version=version("bergson"), d=d, projection_dim=p, n_modules=len(shapes),
               normalizer=(type(next(iter(normalizers.values()))).__name__ if normalizers else None),
               teardown_seconds_excluded=round(teardown, 4), autocast=None, precision="fp32",
               model=_model_info(model, args),
               entry="GradientCollector + CollectorComputer.run_with_collector_hooks on the full model "
                     "(collect_gradients minus its model.base_model), on-disk index written (Builder)",
               modules=list(shapes))
    shutil.rmtree(run_root, ignore_errors=True)
    return out


WORKERS = {"training": lambda a: measure_step(a, train=True), "floor": lambda a: measure_step(a, train=False), "ours": lambda a: measure_ours(a, plain=True),
           "ours_corrected": lambda a: measure_ours(a, plain=False), "bergson": measure_bergson}


def run_child(name: str, args: argparse.Namespace) -> dict:
    """One measurement in its own process (its own peak RSS); {"error": why} if it failed."""
    print(f"[{name}] running ...", file=sys.stderr, flush=True)
    try:
        return common.run_worker(__file__, name, vars(args))
    except RuntimeError as e:
        return {"error": str(e)}


def main() -> None:
    if common.worker_mode(WORKERS):
        return
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
    ap.add_argument("--measure", default=",".join(WORKERS), help=f"comma-separated subset of {','.join(WORKERS)}")
    ap.add_argument("--out", default="benchmarks/results/encode_throughput.json")
    args = ap.parse_args()
    wanted = [m.strip() for m in args.measure.split(",") if m.strip()]
    if unknown := set(wanted) - set(WORKERS):
        ap.error(f"--measure: unknown {sorted(unknown)}; choose from {tuple(WORKERS)}")
    res = {m: (run_child(m, args) if m in wanted else {"error": "not measured (--measure)"}) for m in WORKERS}

    ok = {m: "error" not in res[m] for m in WORKERS}
    tps = {m: res[m]["tokens_per_s"] if ok[m] else None for m in WORKERS}
    ratio = lambda a, b: tps[a] / tps[b] if ok[a] and ok[b] else None  # noqa: E731
    first = next((res[m] for m in WORKERS if ok[m]), {})
    bergson = res["bergson"] if ok["bergson"] else {}
    out = {
        "workers": {"torch": first.get("torch"), "torch_threads": first.get("torch_threads"),
                    "device": first.get("device")},
        "model": first.get("model") or {"name": Path(args.model).resolve().name},
        "model_dir": str(args.model),
        "corpus": args.corpus,
        "examples": first.get("examples"),
        "tokens": first.get("tokens"),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "target_d": args.target_d,
        "d_ours": next((res[m]["d"] for m in ("ours", "ours_corrected") if ok[m]), None),
        "k_ours": next((res[m]["k"] for m in ("ours", "ours_corrected") if ok[m]), None),
        "d_bergson": bergson.get("d"),
        "projection_dim_bergson": bergson.get("projection_dim"),
        **{f"tokens_per_s_{m.replace('corrected', 'corrected_only')}": tps[m] for m in WORKERS},
        "ratio_vs_training": ratio("ours", "training"),
        "ratio_vs_bergson": ratio("ours", "bergson"),
        "ratio_corrected_only_vs_bergson": ratio("ours_corrected", "bergson"),
        "ratio_floor_vs_bergson": ratio("floor", "bergson"),
        "ratio_corrected_only_vs_floor": ratio("ours_corrected", "floor"),
        "bergson": {k: bergson[k] for k in ("version", "normalizer", "entry", "n_modules", "precision")}
        if bergson else None,
        "bergson_null_reason": res["bergson"].get("error"),
        "peak_rss_mb": {m: res[m].get("peak_rss_mb") for m in WORKERS},
        "seconds": {m: res[m].get("seconds") for m in WORKERS},
        "details": res,
    }
    common.show("encode_throughput", write_results(Path(args.out), vars(args), out))


if __name__ == "__main__":
    main()
