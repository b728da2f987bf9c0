"""DVC stage `train`: pretrain the small Llama + BPE tokenizer with AdamW, adopt a user's
checkpoint (a directory, or a GGUF file converted to one), or fine-tune a user's checkpoint on
the corpus with AdamW (its second moments saved for the correction)."""

import json
import shutil
import time
from pathlib import Path

from trackstar import layout
from trackstar.atomic import atomic_dir
from trackstar.model.checkpoint import context_length, load_checkpoint, load_second_moments, load_source, save_checkpoint
from trackstar.config import TrainParams, load_params, param_error
from trackstar.data.records import corpus_files, iter_corpus
from trackstar.runner import run_main

OUT = layout.MODEL


def train_config(t: TrainParams, max_length: int):
    """The AdamW/one-cycle settings of params.yaml's `train` section."""
    from trackstar.model.train import TrainConfig

    return TrainConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
                       beta1=t.betas[0], beta2=t.betas[1], eps=t.eps, grad_clip=t.grad_clip,
                       max_length=max_length, seed=t.seed)


def main() -> None:
    params = load_params()
    m, t = params.model, params.train
    if m.source in ("checkpoint", "finetune") and not Path(m.checkpoint).exists():
        raise param_error("model.checkpoint", f"{m.checkpoint} does not exist "
                          f"(model.source: {m.source} needs a checkpoint directory or a .gguf file)")
    if m.source == "checkpoint" and Path(m.checkpoint).is_dir():
        load_checkpoint(m.checkpoint)  # refuses a directory that is not a loadable HF checkpoint
        has_state = load_second_moments(m.checkpoint) is not None  # refuses broken state before writing
        with atomic_dir(OUT) as tmp:
            shutil.copytree(m.checkpoint, tmp, dirs_exist_ok=True)
        print(json.dumps({"checkpoint": m.checkpoint, "optimizer_state": has_state}))
        return
    if m.source == "checkpoint":  # a GGUF file: dequantized to fp32 and written as a checkpoint directory
        model, tok = load_source(m.checkpoint)
        save_checkpoint(model, tok, None, OUT)
        print(json.dumps({"checkpoint": m.checkpoint, "converted_from": "gguf", "optimizer_state": False}))
        return

    from trackstar.model.train import ModelConfig, build_model, pretrain, train_tokenizer

    texts = [x.text for x in iter_corpus(corpus_files())]
    t0 = time.time()
    if m.source == "finetune":
        model, tok = load_source(m.checkpoint)
        ctx = context_length(model)
        if ctx is not None and m.max_length > ctx:
            raise param_error("model.max_length", f"{m.max_length} exceeds the context of {m.checkpoint} "
                              f"({ctx} positions)")
    else:
        tok = train_tokenizer(texts, m.vocab_size)
        model = build_model(ModelConfig(hidden_size=m.hidden_size, num_layers=m.layers, num_heads=m.heads,
                                        intermediate_size=m.intermediate_size, max_position_embeddings=m.max_length,
                                        tie_word_embeddings=m.tie_embeddings, seed=t.seed), tok)
    opt = pretrain(model, tok, texts, train_config(t, m.max_length))
    save_checkpoint(model, tok, opt, OUT)
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"params": n_params, "seconds": round(time.time() - t0, 1),
                      **({"finetuned": m.checkpoint} if m.source == "finetune" else {})}))


if __name__ == "__main__":
    run_main(main)
