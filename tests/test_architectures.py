"""Architectures beyond the pipeline's own Llama: tiny random configs (nothing from the hub) of Llama
with grouped-query attention and tied embeddings, Qwen2, GPT-NeoX, OLMo-2 and GPT-2 (Conv1D, a
tokenizer without pad token). For each, the hook path equals the dense projection of exact autograd
per-example gradients, with and without the rank-1 correction, and the batched estimated moments
equal the mean squared per-example gradient computed one example at a time. The GPT-2 one also
runs the whole pipeline from a saved checkpoint with a real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.pipeline import make_repo, repro
from tests.tiny import random_examples, random_moments
from trackstar.encode.correction import build_correction
from trackstar.data.examples import collate
from trackstar.encode.gradients import HookProjector, estimate_second_moments, per_example_grads, reference_encode
from trackstar.encode.layers import find_layers
from trackstar.encode.projection import Projection

V = 50  # vocabulary of the random examples (ids 1..49)


def llama_gqa_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        bos_token_id=1, eos_token_id=2))


def gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                            num_attention_heads=2, max_position_embeddings=32, bos_token_id=1,
                                            eos_token_id=2))


def olmo2():
    from transformers import Olmo2Config, Olmo2ForCausalLM

    return Olmo2ForCausalLM(Olmo2Config(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                      bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


ARCHS = {"llama_gqa_tied": llama_gqa_tied, "qwen2": qwen2, "gpt_neox": gpt_neox, "olmo2": olmo2, "gpt2": gpt2}
PAD = 2  # a tokenizer without pad token pads with eos (trackstar.examples.pad_token_id)


def build(name: str):
    torch.manual_seed(0)
    return ARCHS[name]().eval()


def hook_encode(model, layers, examples, correction, batch_size):
    proj = HookProjector(model, Projection(layers, 4, 3), correction, plain=True)
    rows, plain = [], []
    with proj.attached():
        for i in range(0, len(examples), batch_size):
            c, p = proj.encode_batch(collate(examples[i:i + batch_size], PAD))
            rows.append(c)
            plain.append(p)
    return torch.cat(rows), torch.cat(plain)


@pytest.mark.parametrize("kind", ["none", "adam_rank1"])
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_hook_path_equals_dense_reference(name, kind):
    model = build(name)
    layers = find_layers(model, include_lm_head=True)
    assert ({l.kind for l in layers} == {"conv1d", "linear"}) == (name == "gpt2")  # the head is an nn.Linear
    corr = build_correction(kind, layers, random_moments(model), 1e-8)
    ex = random_examples(5) + random_examples(2, seed=1, query=True)
    ref_c, ref_p = reference_encode(model, Projection(layers, 4, 3), ex, PAD, corr)
    assert ref_c.abs().max() > 0
    for bs in (1, 3):  # padded batches too
        got_c, got_p = hook_encode(model, layers, ex, corr, bs)
        torch.testing.assert_close(got_c, ref_c, rtol=1e-4, atol=1e-5 * ref_c.abs().max().item())
        torch.testing.assert_close(got_p, ref_p, rtol=1e-4, atol=1e-5 * ref_p.abs().max().item())
    if kind == "none":
        torch.testing.assert_close(ref_c, ref_p)


def test_gqa_and_tied_head_are_what_the_test_covers():
    model = build("llama_gqa_tied")
    layers = {l.name: l for l in find_layers(model, include_lm_head=True)}
    assert layers["model.layers.0.self_attn.k_proj"].n_out == 8  # 2 kv heads x head_dim 4, q has 16
    assert layers["lm_head"].param_name == "model.embed_tokens.weight"


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_batched_estimated_moments_equal_one_at_a_time(name):
    model = build(name)
    layers = find_layers(model, include_lm_head=True)
    ex = random_examples(7)
    want = {l.name: torch.zeros(l.n_out, l.n_in, dtype=torch.float64) for l in layers}
    for g in per_example_grads(model, layers, ex, PAD):  # plain autograd, one example at a time
        for l in layers:
            want[l.name] += g[l.name].double() ** 2
    got = estimate_second_moments(model, layers, ex, PAD, batch_size=3)
    got_big = estimate_second_moments(model, layers, ex, PAD, batch_size=7)
    assert sorted(got) == sorted({l.param_name for l in layers})
    for l in layers:
        v = want[l.name] / len(ex)  # (out, in)
        tol = dict(rtol=1e-4, atol=1e-7 * v.abs().max().item())
        for est in (got, got_big):
            row, col = est[l.param_name]
            assert row.shape == (l.n_out,) and col.shape == (l.n_in,)
            torch.testing.assert_close(row.double(), v.mean(1), **tol)
            torch.testing.assert_close(col.double(), v.mean(0), **tol)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # no weight gradients made


# --------------------------------------------------------------------------- GPT-2 end to end


def gpt2_checkpoint(dest: Path, texts: list[str]) -> None:
    """A random tiny GPT-2 with a byte-level BPE trained on `texts`, wrapped as GPT2TokenizerFast
    (no pad token, bos = eos = <|endoftext|>), saved as a checkpoint directory without optimizer state."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from trackstar.model.checkpoint import save_checkpoint

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok = GPT2TokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>")
    assert tok.pad_token is None
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    save_checkpoint(model.eval(), tok, None, dest)


def test_gpt2_checkpoint_through_the_whole_pipeline(tmp_path):
    from tests.pipeline import TINY, git
    from trackstar.data.world import FactWorldConfig, generate_fact_world

    data = {**TINY["data"], "entities": 8}
    passages, _, _ = generate_fact_world(FactWorldConfig(**data))
    repo = make_repo(tmp_path / "repo", {
        "data": data,
        "model": {"source": "checkpoint", "checkpoint": "inputs/checkpoint"},
        "correction": {"kind": "estimated", "estimate_samples": 16},  # no optimizer state: the moments stage
        "hessian": {"mix_k": 3},
        "index": {"nlist": 4, "nprobe": 2},
        "eval": {"tail_patch_queries": 1, "tail_patch_ks": [1]},
    })
    gpt2_checkpoint(repo / "inputs/checkpoint", [p.text for p in passages])
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "gpt2 checkpoint")
    ran = repro(repo)
    assert {"train", "moments", "encode@train", "encode@query", "retrieve", "evaluate"} <= set(ran)
    from safetensors import safe_open

    with safe_open(str(repo / "model_moments/second_moments.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["kind"]) == "estimated"
        row = f.get_tensor("transformer.h.0.attn.c_attn.weight@row")
        col = f.get_tensor("transformer.h.0.attn.c_attn.weight@col")
    n = json.loads((repo / "model/config.json").read_text())["n_embd"]
    assert row.shape == (3 * n,) and col.shape == (n,)  # a Conv1D weight (stored in, out): means in (out, in)
    metrics = json.loads((repo / "metrics/metrics.json").read_text())
    assert metrics  # evaluate ran to the end on a tokenizer without pad token
    # no optimizer state: tail-patch stepped with the moments stage's estimate, not a plain step
    assert json.loads((repo / "metrics/model.json").read_text())["tail_patch_v"] == "estimated"
    first = json.loads((repo / "retrievals/trackstar.jsonl").read_text().splitlines()[0])
    assert first
