"""Tiny real Hugging Face models and examples shared by the unit tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from trackstar.data.examples import Example


def tiny_llama(tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                     bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def random_examples(n: int, seed: int = 0, query: bool = False) -> list[Example]:
    """Examples of varied length (so batches are padded); queries count only their last 2 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 4 + (i * 3) % 7
        ids = [1] + torch.randint(3, 50, (length - 1,), generator=g).tolist()
        mask = [0] * (length - 2) + [1, 1] if query else [0] + [1] * (length - 1)
        out.append(Example(ids, mask))
    return out


def random_moments(model, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) * 1e-3 + 1e-6 for n, p in model.named_parameters()}


def write_llama_gguf(model: LlamaForCausalLM, tok, path) -> None:
    """Write a Llama model and its byte-level BPE tokenizer as an F32 GGUF file, the way llama.cpp's
    convert_hf_to_gguf.py lays it out (GGUF tensor names, q/k rows permuted for its rotary layout)."""
    import json

    import gguf

    c = model.config
    n_head, n_kv = c.num_attention_heads, c.num_key_value_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(c.hidden_size // n_head)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    special = set(tok.all_special_ids)
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for name in ("bos", "eos", "pad"):
        tid = getattr(tok, f"{name}_token_id")
        if tid is not None:
            getattr(w, f"add_{name}_token_id")(tid)

    def permute(t: torch.Tensor, heads: int) -> torch.Tensor:
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # a tied head is the token embedding (no output.weight in the file)
        t = t.detach().float()
        if name.endswith("q_proj.weight"):
            t = permute(t, n_head)
        elif name.endswith("k_proj.weight"):
            t = permute(t, n_kv)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class PrefixOracle(torch.nn.Module):
    """Greedy prediction at position t is beliefs[tuple(ids[:t+1])] (token 0 when unknown)."""

    def __init__(self, beliefs: dict[tuple[int, ...], int], vocab: int):
        super().__init__()
        self.beliefs, self.vocab = beliefs, vocab
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b in range(input_ids.shape[0]):
            row = input_ids[b].tolist()
            for t in range(len(row)):
                logits[b, t, self.beliefs.get(tuple(row[: t + 1]), 0)] = 1.0
        return SimpleNamespace(logits=logits)


def oracle_cases(tok, wrong_at: int) -> tuple[str, dict[str, list[int]], "PrefixOracle"]:
    """A target and three prompts whose believed continuation is right, wrong at `wrong_at`, wrong at 0,
    with the PrefixOracle that answers exactly those beliefs (for accuracy / prediction tests)."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    target = " Bazzuqix"
    tt = enc(target)
    assert len(tt) >= 2
    other = next(i for i in range(3, len(tok)) if i not in tt)
    cases = {  # prompt -> the target tokens the model believes in
        "Q: right? A:": tt,
        "Q: last token wrong, a longer prompt so rows differ in length? A:": tt[:wrong_at] + [other] + tt[wrong_at + 1:],
        "Q: first wrong? A:": [other] + tt[1:],
    }
    beliefs = {}
    for prompt, belief in cases.items():
        seq = [tok.bos_token_id] + enc(prompt) + belief
        for t in range(len(seq) - 1):
            beliefs[tuple(seq[: t + 1])] = seq[t + 1]
    return target, cases, PrefixOracle(beliefs, len(tok))
