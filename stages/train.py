"""DVC stage `train`: pretrain the small Llama + BPE tokenizer with AdamW, or adopt a user's checkpoint."""

import json
import os
import shutil
import time
from pathlib import Path

from trackstar.checkpoint import load_checkpoint, load_second_moments
from trackstar.config import load_params
from trackstar.data import corpus_files, iter_corpus
from trackstar.runner import run_main

OUT = Path("model")


def main() -> None:
    params = load_params()
    m, t = params.model, params.train
    if m.source == "checkpoint":
        load_checkpoint(m.checkpoint)  # refuses a directory that is not a loadable HF checkpoint
        has_state = load_second_moments(m.checkpoint) is not None  # refuses broken state before writing
        tmp = OUT.with_name(".model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(m.checkpoint, tmp)
        shutil.rmtree(OUT, ignore_errors=True)
        os.replace(tmp, OUT)
        print(json.dumps({"checkpoint": m.checkpoint, "optimizer_state": has_state}))
        return
    from trackstar.checkpoint import save_checkpoint
    from trackstar.train import ModelConfig, TrainConfig, build_model, pretrain, train_tokenizer

    texts = [x.text for x in iter_corpus(corpus_files())]
    t0 = time.time()
    tok = train_tokenizer(texts, m.vocab_size)
    model = build_model(ModelConfig(hidden_size=m.hidden_size, num_layers=m.layers, num_heads=m.heads,
                                    intermediate_size=m.intermediate_size, max_position_embeddings=m.max_length,
                                    tie_word_embeddings=m.tie_embeddings, seed=t.seed), tok)
    opt = pretrain(model, tok, texts, TrainConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                                                  weight_decay=t.weight_decay, beta1=t.betas[0], beta2=t.betas[1],
                                                  eps=t.eps, grad_clip=t.grad_clip, max_length=m.max_length,
                                                  seed=t.seed))
    save_checkpoint(model, tok, opt, OUT)
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"params": n_params, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    run_main(main)
