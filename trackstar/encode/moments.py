"""Estimated second moments (`correction.kind: estimated`): computed once per checkpoint and corpus
sample by the `moments` stage, read by every encode stage and `trackstar trace`.

The file is a safetensors map holding, for every nn.Linear / Conv1D weight (the output head
included, so the layer selection `gradients.include` ... can change without recomputing it), the
row and column means of the mean squared per-example gradient v in (out, in) orientation
(`<parameter>@row`, `<parameter>@col`): the factored (Adafactor-style) form, which is all the
rank-1 correction reads, at n_out + n_in numbers a weight instead of n_out x n_in. Its metadata records the checkpoint
hash and the sample it was estimated from; for any other correction kind the file holds no tensors.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import torch

from trackstar.data.records import iter_corpus
from trackstar.errors import ArtifactMismatch, InputError
from trackstar.data.examples import Example, pad_token_id, passage_example
from trackstar.encode.gradients import estimate_second_moments
from trackstar.encode.layers import find_layers

MOMENTS_FILE = "model_moments/second_moments.safetensors"


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


def estimate_for_model(model, tok, corpus, samples: int, seed: int, max_length: int, batch_size: int,
                       progress: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """(row/column means of the moments of every Linear/Conv1D weight as `@row` / `@col` tensors, number
    of passages used), estimated on the model's device."""
    layers = find_layers(model, ".*", "^$", include_lm_head=True)
    sample = sample_passages(tok, corpus, samples, seed, max_length)
    means = estimate_second_moments(model, layers, sample, pad_token_id(tok), batch_size, progress=progress)
    return {f"{name}@{side}": t for name, rc in means.items() for side, t in zip(("row", "col"), rc)}, len(sample)


def write_moments(path, moments: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically write the moments (possibly none) with `meta` (JSON-encoded values) as metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in moments.items()}, tmp,
                  metadata={k: json.dumps(v, sort_keys=True) for k, v in meta.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def tail_patch_moments(path, model, checkpoint_hash: str) -> dict[str, torch.Tensor] | None:
    """The estimated v-hat for tail-patch steps on a checkpoint without optimizer state: `rank1_v` of the
    `moments` stage's file when it holds estimated moments (correction.kind: estimated), else None (no
    file, or another kind: a plain gradient step)."""
    if moments_kind(path) != "estimated":
        return None
    return rank1_v(model, read_moments(path, checkpoint_hash))
