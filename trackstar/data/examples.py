"""Tokenization of training passages and queries into (input_ids, loss mask) pairs.

One convention everywhere (training, encoding, tail-patch, evaluation):
passage = [bos] + tokens(text) + [eos], loss on every token after bos;
query   = [bos] + tokens(prompt) + tokens(target), loss on the target tokens only.
Prompt and target are tokenized separately so the target boundary is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token at this position is predicted and counted in the loss
    truncated: bool = False


def _special(tok, name: str) -> list[int]:
    tid = getattr(tok, f"{name}_token_id", None)
    return [tid] if tid is not None else []


def passage_example(tok, text: str, max_length: int) -> Example:
    """Summed next-token loss over every token of a training passage (truncated at the right)."""
    ids = _special(tok, "bos") + tok(text, add_special_tokens=False)["input_ids"] + _special(tok, "eos")
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    n_prefix = 1 if _special(tok, "bos") else 0
    mask = [0] * n_prefix + [1] * (len(ids) - n_prefix)
    mask[0] = 0  # the first token has no context to be predicted from
    return Example(ids, mask, truncated)


def query_example(tok, prompt: str, target: str, max_length: int) -> Example:
    """Loss on the target tokens only, given the prompt (prompt truncated at the left)."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    t = tok(target, add_special_tokens=False)["input_ids"]
    if not t:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    bos = _special(tok, "bos")
    room = max_length - len(bos) - len(t)
    if room < 1:
        raise ValueError(f"target {target!r} does not fit in max_length={max_length}")
    truncated = len(p) > room
    p = p[-room:] if truncated else p
    ids = bos + p + t
    mask = [0] * (len(ids) - len(t)) + [1] * len(t)
    return Example(ids, mask, truncated)


def pad_token_id(tok) -> int:
    """The one padding rule: the tokenizer's pad token, else its eos token, else 0. Padded positions
    carry attention 0 and loss 0, so any valid id works; GPT-2-style tokenizers have no pad token."""
    for tid in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and loss mask 0."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), n), dtype=torch.long)
    lm = torch.zeros((len(examples), n), dtype=torch.float32)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        att[i, : len(e.input_ids)] = 1
        lm[i, : len(e.loss_mask)] = torch.tensor(e.loss_mask, dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": att, "loss_mask": lm}


def per_example_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy per example: position t's logits predict token t+1."""
    x = logits[:, :-1]
    lp = torch.log_softmax(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=-1)
    tgt = input_ids[:, 1:]
    nll = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return (nll * loss_mask[:, 1:]).sum(dim=1)
