"""Tail-patch influence (docs/method.md): one optimizer step from the final checkpoint on a single
proponent, theta' = theta - lr * g / sqrt(v_hat + eps) (final second moments, no momentum), then
the change in the query target's log-probability and probability.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from typing import Mapping, MutableMapping, Sequence

import torch
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from .examples import Example, collate, per_example_loss

# vmap over scaled-dot-product attention falls back to a loop and says so on every call: not news to a user
warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)


def _batch_size(model: torch.nn.Module, budget_bytes: int = 1 << 29) -> int:
    """Proponents per vmapped step: each holds ~3 parameter-sized tensors (gradient, direction, patched
    weights); at most 16 (measured fastest on CPU for small models, 3.2-3.6x the one-at-a-time loop)."""
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(1, min(16, budget_bytes // max(1, 3 * n_bytes)))


def _target_loss(model: torch.nn.Module, params: Mapping[str, torch.Tensor], ids: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """Summed masked loss of one right-padded sequence, run without an attention mask: with causal
    attention and the loss masked to real tokens, padding changes neither the loss nor its gradient."""
    logits = functional_call(model, dict(params), args=(), kwargs={"input_ids": ids[None]}).logits
    return per_example_loss(logits, ids[None], mask[None]).sum()


def target_logprobs(model: torch.nn.Module, queries: Sequence[Example], pad_id: int, batch: int | None = None
                    ) -> list[float]:
    """log p(target | prompt) of every query (minus its summed target-token loss), vmapped."""
    batch = batch or _batch_size(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    qb = collate(list(queries), pad_id)
    loss = vmap(lambda ids, mask: _target_loss(model, params, ids, mask))
    with torch.no_grad():
        return [-float(x) for s in range(0, len(queries), batch)
                for x in loss(qb["input_ids"][s:s + batch], qb["loss_mask"][s:s + batch])]


def batched_deltas(model: torch.nn.Module, queries: Sequence[Example], pairs: Sequence[tuple[int, Example]],
                   pad_id: int, v_hat: Mapping[str, torch.Tensor] | None, lr: float, eps: float = 1e-8,
                   batch: int | None = None, progress: bool = True, base: Sequence[float] | None = None
                   ) -> list[float]:
    """Change in log p(target) of query i after one step theta - lr * g / sqrt(v_hat + eps) on the
    passage, for every (query index i, passage) pair, `batch` pairs at a time through torch.func (vmap
    of per-example gradients, then of the query forward under each pair's patched weights). `base`:
    the queries' `target_logprobs`, when the caller has them."""
    batch = batch or _batch_size(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    base = torch.tensor(target_logprobs(model, queries, pad_id, batch) if base is None else list(base), dtype=torch.float64)
    step_grads = vmap(grad(lambda pr, ids, mask: _target_loss(model, pr, ids, mask)), in_dims=(None, 0, 0))
    patched_loss = vmap(lambda pr, ids, mask: _target_loss(model, pr, ids, mask))
    out: list[float] = []
    for s in tqdm(range(0, len(pairs), batch), desc="tail-patch", unit="batch", disable=not progress or None,
                  mininterval=2.0):
        chunk = pairs[s:s + batch]
        b = collate([ex for _, ex in chunk], pad_id)
        g = step_grads(params, b["input_ids"], b["loss_mask"])
        new = {n: p - lr * (g[n] / (v_hat[n].to(g[n]) + eps).sqrt() if v_hat is not None and n in v_hat else g[n])
               for n, p in params.items()}
        q = collate([queries[i] for i, _ in chunk], pad_id)
        with torch.no_grad():
            patched = -patched_loss(new, q["input_ids"], q["loss_mask"])
        out += (patched.double() - base[[i for i, _ in chunk]]).tolist()
    return out


def pair_key(query: Example, passage: Example) -> str:
    """A stable id of one (query, proponent) step: their tokens and the query's target mask."""
    raw = json.dumps([query.input_ids, query.loss_mask, passage.input_ids]).encode()
    return hashlib.sha256(raw).hexdigest()[:24]


def tail_patch(model: torch.nn.Module, queries: Sequence[Example], proponents: Mapping[str, Sequence[Sequence[Example]]],
               pad_id: int, v_hat: Mapping[str, torch.Tensor] | None, lr: float, ks: Sequence[int],
               eps: float = 1e-8, progress: bool = True, batch: int | None = None,
               cache: MutableMapping[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Mean change in target log-prob / prob over the top-k proponents of each query, per method.

    `proponents[method][i]` lists query i's proponents, best first (their passage examples).
    Each distinct (query, passage) step is computed once and shared between methods; with `cache`
    (pair_key -> log-prob change, for this model, v_hat, lr and eps) known steps are reused and new
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
    base = target_logprobs(model, queries, pad_id, batch)
    if todo:
        fresh = batched_deltas(model, queries, list(todo.values()), pad_id, v_hat, lr, eps, batch, progress, base)
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
