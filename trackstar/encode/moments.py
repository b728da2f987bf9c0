"""Estimated second moments (`correction.kind: estimated`): computed once per checkpoint and corpus
sample by the `moments` stage, read by every encode stage and `trackstar trace`.

The file is a safetensors map holding, for every nn.Linear / Conv1D weight (the output head
included, so the layer selection `gradients.include` ... can change without recomputing it), the
row and column means of the mean squared per-example gradient v in (out, in) orientation
(`<parameter>@row`, `<parameter>@col`): the factored (Adafactor-style) form, which is all the
rank-1 correction reads, at n_out + n_in numbers a weight instead of n_out x n_in. Its metadata records the checkpoint
hash and the sample it was estimated from; for any other correction kind the file holds no tensors.
`second_moments` is the one place that decides which moments the correction and tail-patch divide by.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trackstar import layout
from trackstar import tensorfile
from trackstar.config import Params
from trackstar.data.records import iter_corpus
from trackstar.errors import ArtifactMismatch, InputError
from trackstar.data.examples import Example, pad_token_id, passage_example
from trackstar.encode.gradients import estimate_second_moments
from trackstar.encode.layers import find_layers
from trackstar.fingerprint import file_sha256
from trackstar.model.checkpoint import checkpoint_hash, load_for_gradients, load_second_moments


def sample_passages(tok, corpus, n: int, seed: int, max_length: int) -> list[Example]:
    """Reservoir sample of n passages (one streaming pass over the corpus), seeded."""
    rng = random.Random(seed)
    res: list[str] = []
    for i, p in enumerate(iter_corpus(corpus)):
        if len(res) < n:
            res.append(p.text)
        else:
            j = rng.randint(0, i)
            if j < n:
                res[j] = p.text
    return [passage_example(tok, t, max_length) for t in res]


def write_moments(path, moments: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically write the moments (possibly none) with `meta` (JSON-encoded values) as metadata."""
    tensorfile.save(path, {k: v.detach().cpu().numpy() for k, v in moments.items()},
                    metadata={k: json.dumps(v, sort_keys=True) for k, v in meta.items()})


def estimate_moments(params: Params, root: Path = Path(".")) -> dict:
    """The `moments` stage: for correction.kind estimated, estimate the moments of root's model on a seeded
    sample of its corpus and write them to root's moments file; for any other kind write a file with no
    tensors (nothing to estimate). Returns the stage's summary."""
    c, g = params.correction, params.gradients
    out = root / layout.MOMENTS
    if c.kind != "estimated":
        write_moments(out, {}, {"kind": c.kind})
        return {"kind": c.kind, "estimated": False}
    model, tok, device = load_for_gradients(root / layout.MODEL, params.encode.device, g.max_length,
                                            root / "params.yaml")
    t0 = time.time()
    layers = find_layers(model, ".*", "^$", include_lm_head=True)  # every weight: the selection can change freely
    sample = sample_passages(tok, root / layout.CORPUS, c.estimate_samples, c.seed, g.max_length)
    means = estimate_second_moments(model, layers, sample, pad_token_id(tok), params.encode.batch_size, progress=True)
    moments = {f"{name}@{side}": t for name, rc in means.items() for side, t in zip(("row", "col"), rc)}
    meta = {"kind": "estimated", "checkpoint_hash": checkpoint_hash(root / layout.MODEL), "samples": len(sample),
            "seed": c.seed, "max_length": g.max_length}
    write_moments(out, moments, meta)
    return {"kind": "estimated", "samples": len(sample), "parameters": len(moments) // 2, "device": str(device),
            "seconds": round(time.time() - t0, 1)}


def read_moments(path, checkpoint_hash: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{parameter name: (row means, column means)} of the estimated moments, (out, in) orientation;
    refuses a file made for another kind or another checkpoint."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "missing: correction.kind: estimated reads the moments the `moments` stage "
                         "writes (run `dvc repro moments`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise InputError(str(path), f"corrupt moments file: {type(e).__name__}: {e}") from None
    if meta.get("kind") != "estimated":
        raise ArtifactMismatch(f"{path}: holds moments for correction.kind {meta.get('kind')!r}, not 'estimated'; "
                               "run `dvc repro` first")
    if meta.get("checkpoint_hash") != checkpoint_hash:
        raise ArtifactMismatch(f"{path}: estimated for checkpoint {str(meta.get('checkpoint_hash'))[:12]}, "
                               f"not the current model ({checkpoint_hash[:12]}); run `dvc repro` first")
    names = {k.rsplit("@", 1)[0] for k in tensors}
    if any(f"{n}@row" not in tensors or f"{n}@col" not in tensors for n in names):
        raise InputError(str(path), "corrupt moments file: every parameter needs an @row and an @col tensor")
    return {n: (tensors[f"{n}@row"], tensors[f"{n}@col"]) for n in sorted(names)}


def moments_kind(path) -> str | None:
    """The correction kind a moments file was written for (None: no file); cheap, reads the header only."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("kind", "null"))
    except Exception as e:  # noqa: BLE001
        raise InputError(str(path), f"corrupt moments file: {type(e).__name__}: {e}") from None


def rank1_v(model, factored: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each weight's v as the rank-1 fit r c^T / mean(r) of its row/column means, in the parameter's own
    orientation (Conv1D stores (in, out)): the full-shape v-hat a tail-patch step divides by, rebuilt from
    the factored file (the same fit the encoder's rank-1 correction applies)."""
    from trackstar.encode.correction import scales_from_means

    layers = {l.param_name: l for l in find_layers(model, include_lm_head=True)}
    out = {}
    for name, (r, c) in factored.items():
        s_out, s_in = scales_from_means(r, c)  # 1/sqrt(v) = s_out s_in^T, so v = (s_out s_in^T)^-2
        v = torch.outer(s_out.double(), s_in.double()).pow(-2)
        out[name] = (layers[name].weight_grad_out_in(v) if name in layers else v).float()
    return out


@dataclass(frozen=True)
class SecondMoments:
    """The second moments v to divide gradients by, where they come from, and a stable key for memos."""

    source: str  # optimizer_state | estimated | none
    origin: Path  # the checkpoint directory or the moments file: named in errors, hashed into the key
    tensors: dict | None = None  # optimizer_state: v-hat by parameter; estimated: (row, column) means by parameter

    @property
    def key(self) -> str:
        """`optimizer_state`, `none`, or `estimated:<sha256 of the moments file>`."""
        return f"estimated:{file_sha256(self.origin)}" if self.source == "estimated" else self.source

    def v_hat(self, model) -> dict[str, torch.Tensor] | None:
        """Full-shape v-hat by parameter name, what an optimizer step divides by: Adam's own, the estimate's
        rank-1 fit (`rank1_v`), or None (a plain gradient step)."""
        return rank1_v(model, self.tensors) if self.source == "estimated" else self.tensors


def second_moments(model_dir, moments_file, checkpoint_hash: str, kind: str | None = None) -> SecondMoments:
    """Which second moments to use, shared by the encoder's correction and tail-patch.

    For the correction (`kind` = correction.kind): adam / adam_rank1 the checkpoint's Adam state (none when it
    has none, which the correction refuses), estimated the `moments` stage's file, none nothing. For an
    optimizer step (`kind` None, tail-patch): the checkpoint's Adam state when it has one, else the stage's
    estimate when its file holds one, else none."""
    model_dir, moments_file = Path(model_dir), Path(moments_file)
    if kind in (None, "adam", "adam_rank1"):
        state = load_second_moments(model_dir)
        if state:
            return SecondMoments("optimizer_state", model_dir, state[0])
        if kind is None and moments_kind(moments_file) == "estimated":
            kind = "estimated"
    if kind == "estimated":
        return SecondMoments("estimated", moments_file, read_moments(moments_file, checkpoint_hash))
    return SecondMoments("none", model_dir)
