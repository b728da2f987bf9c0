"""Tail-patch influence: one optimizer step from the final checkpoint on a single
proponent, theta' = theta - lr * g / sqrt(v_hat + eps) (final second moments, no momentum), then
the change in the query target's log-probability and probability: measured on the stepped model,
not predicted to first order. The step depends only on the proponent, so the work is grouped by
passage: one gradient per distinct passage, all the queries that have it re-scored in one forward.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from typing import Mapping, MutableMapping, Sequence

import torch
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from trackstar.data.examples import Example, collate, per_example_loss

# vmap over scaled-dot-product attention falls back to a loop and says so on every call: not news to a user
warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)


# queries re-scored per forward under one stepped model (bounds the [queries, length, vocab] logits)
_QUERY_BATCH = 16


@dataclass(frozen=True)
class Step:
    """One tail-patch step theta - lr * g / sqrt(v_hat + eps) (v_hat None: a plain gradient step), on examples
    padded with `pad_id`; `batch` proponents per vmapped backward (None: by the model's size)."""

    lr: float
    v_hat: Mapping[str, torch.Tensor] | None
    pad_id: int
    eps: float = 1e-8
    batch: int | None = None
    progress: bool = True


def _batch_size(model: torch.nn.Module, budget_bytes: int = 1 << 29) -> int:
    """Proponents per vmapped step: each holds ~3 parameter-sized tensors (gradient, direction, patched
    weights); at most 16 (measured fastest on CPU for small models, 3.2-3.6x the one-at-a-time loop)."""
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(1, min(16, budget_bytes // max(1, 3 * n_bytes)))


def _losses(model: torch.nn.Module, params: Mapping[str, torch.Tensor], ids: torch.Tensor,
            mask: torch.Tensor) -> torch.Tensor:
    """Summed masked loss of each right-padded sequence of a batch, run without an attention mask: with
    causal attention and the loss masked to real tokens, padding changes neither the loss nor its gradient."""
    logits = functional_call(model, dict(params), args=(), kwargs={"input_ids": ids}).logits
    return per_example_loss(logits, ids, mask)


def _target_loss(model: torch.nn.Module, params: Mapping[str, torch.Tensor], ids: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """Summed masked loss of one right-padded sequence (the unit torch.func differentiates per example)."""
    return _losses(model, params, ids[None], mask[None]).sum()


def inverse_sqrt_moments(model: torch.nn.Module, v_hat: Mapping[str, torch.Tensor] | None, eps: float
                         ) -> dict[str, torch.Tensor | None]:
    """1 / sqrt(v_hat + eps) per parameter, computed once for every step (None: a plain gradient step)."""
    out: dict[str, torch.Tensor | None] = {}
    for n, p in model.named_parameters():
        v = None if v_hat is None else v_hat.get(n)
        out[n] = None if v is None else (v.to(device=p.device, dtype=p.dtype) + eps).rsqrt()
    return out


def _passage_key(ex: Example) -> tuple:
    """Identity of a proponent's step: its tokens and loss mask (the step does not depend on the query)."""
    return tuple(ex.input_ids), tuple(ex.loss_mask)


def target_logprobs(model: torch.nn.Module, queries: Sequence[Example], pad_id: int, batch: int = _QUERY_BATCH
                    ) -> list[float]:
    """log p(target | prompt) of every query (minus its summed target-token loss), through the same
    vmapped forward the tail-patch re-score uses, `batch` queries per forward."""
    params = {n: p.detach()[None] for n, p in model.named_parameters()}
    score = vmap(lambda pr, ids, mask: _losses(model, pr, ids, mask))
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.no_grad():
        for s in range(0, len(queries), batch):
            q = collate(list(queries[s:s + batch]), pad_id)
            out += [-float(x) for x in score(params, q["input_ids"][None].to(device), q["loss_mask"][None].to(device))[0]]
    return out


def batched_deltas(model: torch.nn.Module, queries: Sequence[Example], pairs: Sequence[tuple[int, Example]],
                   step: Step, base: Sequence[float] | None = None) -> list[float]:
    """Change in log p(target) of query i after one step theta - lr * g / sqrt(v_hat + eps) on the
    passage, for every (query index i, passage) pair.

    Grouped by passage: each distinct passage's step is computed once (one per-example gradient, `batch`
    passages per vmapped backward) and all its queries are re-scored under the stepped weights in one
    vmapped forward; the stepped weights are new tensors, the model's own are never modified. Passages
    are processed in order of their query count so a chunk pads few query slots. `base`: the queries'
    `target_logprobs`, when the caller has them.
    """
    batch, pad_id, lr = step.batch or _batch_size(model), step.pad_id, step.lr
    device = next(model.parameters()).device
    params = {n: p.detach() for n, p in model.named_parameters()}
    inv = inverse_sqrt_moments(model, step.v_hat, step.eps)
    base_t = torch.tensor(target_logprobs(model, queries, pad_id) if base is None else list(base),
                          dtype=torch.float64)
    groups: dict[tuple, tuple[Example, list[int]]] = {}
    for j, (_, ex) in enumerate(pairs):
        groups.setdefault(_passage_key(ex), (ex, []))[1].append(j)
    order = sorted(groups.values(), key=lambda g: len(g[1]))
    step_grads = vmap(grad(lambda pr, ids, mask: _target_loss(model, pr, ids, mask)), in_dims=(None, 0, 0))
    score = vmap(lambda pr, ids, mask: _losses(model, pr, ids, mask))
    out = [0.0] * len(pairs)
    bar = tqdm(total=len(order), desc="tail-patch", unit="passage", disable=not step.progress or None,
               mininterval=2.0)
    for s in range(0, len(order), batch):
        chunk = order[s:s + batch]
        b = collate([ex for ex, _ in chunk], pad_id)
        g = step_grads(params, b["input_ids"].to(device), b["loss_mask"].to(device))
        new = {n: torch.addcmul(p, g[n], inv[n], value=-lr) if inv[n] is not None else p - lr * g[n]
               for n, p in params.items()}
        del g
        width = max(len(members) for _, members in chunk)
        for c in range(0, width, _QUERY_BATCH):
            # slot t of passage j holds its (c+t)-th pair, or repeats its last one (discarded) past its count
            slots = [[members[min(t, len(members) - 1)] for t in range(c, min(c + _QUERY_BATCH, width))]
                     for _, members in chunk]
            q = collate([queries[pairs[j][0]] for row in slots for j in row], pad_id)
            shape = (len(chunk), len(slots[0]), -1)
            with torch.no_grad():
                lp = -score(new, q["input_ids"].view(shape).to(device), q["loss_mask"].view(shape).to(device))
            for (_, members), row, vals in zip(chunk, slots, lp.double().cpu()):
                for t, (j, v) in enumerate(zip(row, vals.tolist())):
                    if c + t < len(members):
                        out[j] = v - float(base_t[pairs[j][0]])
        bar.update(len(chunk))
    bar.close()
    return out


def pair_key(query: Example, passage: Example) -> str:
    """A stable id of one (query, proponent) step: their tokens and the query's target mask."""
    raw = json.dumps([query.input_ids, query.loss_mask, passage.input_ids]).encode()
    return hashlib.sha256(raw).hexdigest()[:24]


def tail_patch(model: torch.nn.Module, queries: Sequence[Example], proponents: Mapping[str, Sequence[Sequence[Example]]],
               step: Step, ks: Sequence[int], cache: MutableMapping[str, float] | None = None
               ) -> dict[str, dict[str, float]]:
    """Mean change in target log-prob / prob over the top-k proponents of each query, per method.

    `proponents[method][i]` lists query i's proponents, best first (their passage examples).
    Each distinct (query, passage) pair is computed once and shared between methods, and each distinct
    passage's step once for all its queries (`batched_deltas`); with `cache`
    (pair_key -> log-prob change, for this model and step) known steps are reused and new
    ones added, so a rerun after a ranking change computes only the pairs it has not seen.
    """
    kmax = max(ks)
    cache = {} if cache is None else cache
    todo: dict[str, tuple[int, Example]] = {}
    for lists in proponents.values():
        for i, q in enumerate(queries):
            for ex in list(lists[i])[:kmax]:
                key = pair_key(q, ex)
                if key not in cache:
                    todo.setdefault(key, (i, ex))
    base = target_logprobs(model, queries, step.pad_id)
    if todo:
        fresh = batched_deltas(model, queries, list(todo.values()), step, base)
        cache.update(zip(todo, fresh))
    n = max(1, len(queries))
    out = {}
    for m, lists in proponents.items():
        sums = {k: [0.0, 0.0] for k in ks}
        for i, q in enumerate(queries):
            deltas = [cache[pair_key(q, ex)] for ex in list(lists[i])[:kmax]]
            for k in ks:
                top = deltas[:k]
                if top:
                    sums[k][0] += sum(top) / len(top)
                    sums[k][1] += sum(math.exp(base[i] + d) - math.exp(base[i]) for d in top) / len(top)
        out[m] = {**{f"tail_patch@{k}": sums[k][0] / n for k in ks}, **{f"tail_patch_prob@{k}": sums[k][1] / n for k in ks}}
    return out
