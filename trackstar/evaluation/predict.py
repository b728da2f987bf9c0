"""Per-query model predictions: the greedy continuation of each prompt and the target's probability.

The greedy continuation is as long as the target in tokens, so ``correct`` (it equals the target's
tokens) is the exact match that :func:`trackstar.train.accuracy` counts. ``target_prob`` is
p(target | prompt), the product of the target tokens' teacher-forced probabilities.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from trackstar.data.examples import collate, pad_token_id, query_example


@torch.no_grad()
def predict(model, tok, queries: Sequence[Any], max_length: int, batch_size: int = 64) -> list[dict[str, Any]]:
    """``[{"id", "prediction", "target_prob", "correct"}]`` per query (objects with id, prompt, target)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = pad_token_id(tok)
    out: list[dict[str, Any]] = []
    for s in range(0, len(queries), batch_size):
        qs = queries[s: s + batch_size]
        exs = [query_example(tok, q.prompt, q.target, max_length) for q in qs]
        b = collate(exs, pad)
        ids, att, mask = (b[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, :-1].double(), -1)
        tok_lp = logp.gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
        target_lp = tok_lp.sum(1)
        n_target = [int(sum(e.loss_mask)) for e in exs]
        prefixes = [e.input_ids[: len(e.input_ids) - n] for e, n in zip(exs, n_target)]
        generated = _greedy(model, prefixes, n_target, pad, device)
        for q, e, n, gen, lp in zip(qs, exs, n_target, generated, target_lp.tolist()):
            out.append({"id": q.id, "prediction": tok.decode(gen), "target_prob": float(torch.tensor(lp).exp()),
                        "correct": gen == e.input_ids[len(e.input_ids) - n:]})
    if was_training:
        model.train()
    return out


def _greedy(model, prefixes: list[list[int]], steps: list[int], pad: int, device) -> list[list[int]]:
    """Greedy continuations, ``steps[i]`` tokens for prefix i (right-padded batch, no cache: a few steps only)."""
    seqs = [list(p) for p in prefixes]
    for step in range(max(steps)):
        live = [i for i, n in enumerate(steps) if step < n]
        width = max(len(seqs[i]) for i in live)
        ids = torch.full((len(live), width), pad, dtype=torch.long)
        att = torch.zeros((len(live), width), dtype=torch.long)
        for r, i in enumerate(live):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            att[r, : len(seqs[i])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits
        last = torch.tensor([len(seqs[i]) - 1 for i in live], device=logits.device)
        nxt = logits[torch.arange(len(live), device=logits.device), last].argmax(-1).tolist()
        for i, t in zip(live, nxt):
            seqs[i].append(int(t))
    return [s[len(p):] for s, p in zip(seqs, prefixes)]
