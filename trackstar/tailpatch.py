"""Tail-patch influence (DESIGN §6): one optimizer step from the final checkpoint on a single
proponent, theta' = theta - lr * g / sqrt(v_hat + eps) (final second moments, no momentum), then
the change in the query target's log-probability and probability.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from .examples import Example, collate, per_example_loss


def target_logprob(model: torch.nn.Module, example: Example, pad_id: int,
                   params: Mapping[str, torch.Tensor] | None = None) -> float:
    """log p(target | prompt) = minus the summed target-token loss, optionally with other params."""
    b = collate([example], pad_id)
    with torch.no_grad():
        if params is None:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        else:
            logits = functional_call(model, dict(params), args=(),
                                     kwargs={"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}).logits
    return -float(per_example_loss(logits, b["input_ids"], b["loss_mask"]).sum())


def step_direction(model: torch.nn.Module, example: Example, pad_id: int,
                   v_hat: Mapping[str, torch.Tensor] | None, eps: float) -> dict[str, torch.Tensor]:
    """u = g / sqrt(v_hat + eps) for every trainable parameter (plain g where v_hat is None)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    b = collate([example], pad_id)
    with torch.enable_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = per_example_loss(logits, b["input_ids"], b["loss_mask"]).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    out = {}
    for (n, p), g in zip(params.items(), grads):
        if g is None:
            continue
        out[n] = g / (v_hat[n].to(g) + eps).sqrt() if v_hat is not None and n in v_hat else g
    return out


def patched_delta(model: torch.nn.Module, query: Example, u: Mapping[str, torch.Tensor], lr: float, pad_id: int,
                  base_logprob: float) -> float:
    """log p(target) after theta - lr * u, minus before."""
    params = dict(model.named_parameters())
    new = {n: (p - lr * u[n]) if n in u else p for n, p in params.items()}
    return target_logprob(model, query, pad_id, new) - base_logprob


def tail_patch(model: torch.nn.Module, queries: Sequence[Example], proponents: Mapping[str, Sequence[Sequence[Example]]],
               pad_id: int, v_hat: Mapping[str, torch.Tensor] | None, lr: float, ks: Sequence[int],
               eps: float = 1e-8, progress: bool = True) -> dict[str, dict[str, float]]:
    """Mean change in target log-prob / prob over the top-k proponents of each query, per method.

    `proponents[method][i]` lists query i's proponents, best first (their passage examples).
    Each distinct passage's step is computed once per query and shared between methods.
    """
    import math

    kmax = max(ks)
    sums = {m: {k: [0.0, 0.0] for k in ks} for m in proponents}
    for i in tqdm(range(len(queries)), desc="tail-patch", unit="query", disable=not progress or None, mininterval=2.0):
        q = queries[i]
        base = target_logprob(model, q, pad_id)
        cache: dict[tuple, tuple[float, float]] = {}
        for m, lists in proponents.items():
            deltas = []
            for ex in list(lists[i])[:kmax]:
                key = tuple(ex.input_ids)
                if key not in cache:
                    u = step_direction(model, ex, pad_id, v_hat, eps)
                    dl = patched_delta(model, q, u, lr, pad_id, base)
                    cache[key] = (dl, math.exp(base + dl) - math.exp(base))
                deltas.append(cache[key])
            for k in ks:
                top = deltas[:k]
                if top:
                    sums[m][k][0] += sum(d[0] for d in top) / len(top)
                    sums[m][k][1] += sum(d[1] for d in top) / len(top)
    n = max(1, len(queries))
    return {m: {**{f"tail_patch@{k}": sums[m][k][0] / n for k in ks},
                **{f"tail_patch_prob@{k}": sums[m][k][1] / n for k in ks}} for m in proponents}
