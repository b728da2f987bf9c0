"""Tokenizer training, a small Llama, and CPU-deterministic pretraining with AdamW + one-cycle.

Training uses the one example convention of `trackstar.examples` (passage_example /
collate / per_example_loss); the batch loss is the summed token loss divided by the
number of loss tokens in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from trackstar.data.examples import collate, pad_token_id, passage_example, per_example_loss, query_example

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")


@dataclass
class ModelConfig:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 128
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    seed: int = 0  # initialisation seed


@dataclass
class TrainConfig:
    epochs: int = 54  # the default world's schedule (params.yaml train.epochs; docs/world.md)
    batch_size: int = 32
    lr: float = 3e-3  # one-cycle peak
    warmup_fraction: float = 0.1  # OneCycleLR pct_start
    weight_decay: float = 0.1  # AdamW's decoupled decay: every seed learns the question form (docs/world.md)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    max_length: int = 64
    seed: int = 0


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on `texts`, wrapped as a transformers fast tokenizer.

    The ByteLevel pre-tokenizer (add_prefix_space=False) makes a leading-space word one
    pretoken, so " Ostrand" tokenizes identically alone and inside a sentence.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", add_bos_token=False
    )


def build_model(cfg: ModelConfig, tokenizer):
    """A freshly initialised LlamaForCausalLM sized from `cfg` (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_theta=cfg.rope_theta,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(conf)
    return model


def _batch_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per = per_example_loss(logits, batch["input_ids"], batch["loss_mask"])
    return per.sum() / batch["loss_mask"][:, 1:].sum().clamp_min(1.0)


def pretrain(model, tokenizer, texts: Sequence[str], cfg: TrainConfig, progress: bool = True,
             on_epoch: Callable[[int], None] | None = None):
    """Train `model` on `texts` (each a passage) and return the AdamW optimizer (its state is kept).
    `on_epoch(epoch)` (1-based) runs after each epoch, e.g. to trace held-out accuracy during training."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    examples = [passage_example(tokenizer, t, cfg.max_length) for t in texts]
    if not examples:
        raise ValueError("no training texts")
    n = len(examples)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs

    # Tiny Adam moments / gradients (e.g. lm_head rows of rare tokens) become subnormal
    # floats, which are ~20x slower on x86 CPUs; flushing them to zero keeps steps fast.
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    if total == 0:
        return opt
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=total, pct_start=cfg.warmup_fraction, anneal_strategy="cos"
    )
    model.train()
    bar = tqdm(total=total, disable=None if progress else True, mininterval=10.0, desc="train", unit="step")
    ema = None
    try:
        for _epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=gen).tolist()
            for s in range(0, n, cfg.batch_size):
                batch = collate([examples[i] for i in order[s : s + cfg.batch_size]], pad_token_id(tokenizer))
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = _batch_loss(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip and cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                # keep the lr actually used by the last step available to the checkpoint
                last_lr = opt.param_groups[0]["lr"]
                sched.step()
                lv = float(loss.detach())
                ema = lv if ema is None else 0.98 * ema + 0.02 * lv
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
            if on_epoch is not None:
                on_epoch(_epoch + 1)
                model.train()
    finally:
        bar.close()
    # OneCycleLR has already moved the group lr past the last step; record the used one
    for g in opt.param_groups:
        g["last_used_lr"] = last_lr
    model.eval()
    return opt


@torch.no_grad()
def accuracy(model, tokenizer, queries, max_length: int, batch_size: int = 64) -> float:
    """Exact match: the teacher-forced argmax prediction equals every target token."""
    qs = list(queries)
    if not qs:
        return float("nan")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for s in range(0, len(qs), batch_size):
        exs = [query_example(tokenizer, q.prompt, q.target, max_length) for q in qs[s : s + batch_size]]
        b = collate(exs, pad_token_id(tokenizer))
        ids = b["input_ids"].to(device)
        logits = model(input_ids=ids, attention_mask=b["attention_mask"].to(device)).logits
        pred = logits[:, :-1].argmax(-1)
        m = b["loss_mask"][:, 1:].to(device) > 0
        ok = ((pred == ids[:, 1:]) | ~m).all(dim=1)
        correct += int(ok.sum())
    if was_training:
        model.train()
    return correct / len(qs)
