"""DVC stage `moments`: the estimated second moments (correction.kind: estimated), computed once
per checkpoint and corpus sample, batched on the model's device; encode@* and trace read them.
For any other correction kind it writes a file with no tensors (nothing to estimate)."""

import json
import time

from trackstar.model.checkpoint import (
    checkpoint_dtype,
    checkpoint_hash,
    context_length,
    load_checkpoint,
    pick_device,
    weights_dtype,
)
from trackstar.config import load_params, param_error
from trackstar.encode.moments import MOMENTS_FILE, estimate_for_model, write_moments
from trackstar.runner import run_main

CORPUS = "data/corpus.jsonl"


def main() -> None:
    params = load_params()
    c, g = params.correction, params.gradients
    if c.kind != "estimated":
        write_moments(MOMENTS_FILE, {}, {"kind": c.kind})
        print(json.dumps({"kind": c.kind, "estimated": False}))
        return
    device = pick_device(params.encode.device)
    model, tok = load_checkpoint("model", device, weights_dtype(checkpoint_dtype("model"), device))
    ctx = context_length(model)
    if ctx is not None and g.max_length > ctx:
        raise param_error("gradients.max_length", f"{g.max_length} exceeds the context of the model in model "
                          f"({ctx} positions)")
    t0 = time.time()
    moments, n = estimate_for_model(model, tok, CORPUS, c.estimate_samples, c.seed, g.max_length,
                                    params.encode.batch_size)
    meta = {"kind": "estimated", "checkpoint_hash": checkpoint_hash("model"), "samples": n, "seed": c.seed,
            "max_length": g.max_length}
    write_moments(MOMENTS_FILE, moments, meta)
    print(json.dumps({"kind": "estimated", "samples": n, "parameters": len(moments) // 2, "device": str(device),
                      "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    run_main(main)
