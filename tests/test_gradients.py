"""The hook-based projected gradients equal the dense projection of exact autograd gradients."""

import pytest
import torch

from tests.tiny import random_examples, random_moments, tiny_gpt2, tiny_llama
from trackstar.encode.correction import apply_exact, build_correction, rank1_scales
from trackstar.data.examples import collate
from trackstar.encode.gradients import HookProjector, reference_encode
from trackstar.encode.layers import find_layers
from trackstar.encode.projection import Projection, projection_matrix


def hook_encode(model, layers, examples, k, seed, correction, batch_size):
    proj = HookProjector(model, Projection(layers, k, seed), correction, plain=True)
    rows, plain = [], []
    with proj.attached():
        for i in range(0, len(examples), batch_size):
            c, p = proj.encode_batch(collate(examples[i:i + batch_size], pad_id=0))
            rows.append(c)
            plain.append(p)
    return torch.cat(rows), torch.cat(plain)


MODELS = {
    "llama": lambda: tiny_llama(),
    "llama_tied": lambda: tiny_llama(tie=True),
    "gpt2_conv1d": lambda: tiny_gpt2(),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("kind", ["none", "adam_rank1"])
@pytest.mark.parametrize("query", [False, True])
def test_hook_path_equals_dense_reference(name, kind, query):
    model = MODELS[name]()
    layers = find_layers(model, include_lm_head=True)
    kinds = {l.kind for l in layers}
    assert ("conv1d" in kinds) == (name == "gpt2_conv1d")
    corr = build_correction(kind, layers, random_moments(model), 1e-8)
    ex = random_examples(7, query=query)
    ref_c, ref_p = reference_encode(model, Projection(layers, 4, 3), ex, 0, corr)
    for bs in (1, 3, 7):  # batch-size invariance, padding included
        got_c, got_p = hook_encode(model, layers, ex, 4, 3, corr, bs)
        torch.testing.assert_close(got_c, ref_c, rtol=1e-4, atol=1e-5 * ref_c.abs().max().item())
        torch.testing.assert_close(got_p, ref_p, rtol=1e-4, atol=1e-5 * ref_p.abs().max().item())
    assert ref_c.shape == (7, 16 * len(layers))


def test_tied_head_block_is_the_head_usage_only():
    """With tied embeddings the head block must not include the embedding-lookup gradient."""
    model = tiny_llama(tie=True)
    layers = find_layers(model, include_lm_head=True)
    head = [l for l in layers if l.name == "lm_head"][0]
    assert head.param_name == "model.embed_tokens.weight"
    ex = random_examples(2)
    b = collate(ex[:1], 0)
    hidden = model.model(input_ids=b["input_ids"]).last_hidden_state.detach().requires_grad_(False)
    logits = hidden @ model.lm_head.weight.detach().T
    logits.requires_grad_(True)
    from trackstar.data.examples import per_example_loss
    per_example_loss(logits, b["input_ids"], b["loss_mask"]).sum().backward()
    G = logits.grad[0].T @ hidden[0]  # sum_t delta_t h_t^T
    P_out = projection_matrix(3, "lm_head", "out", 4, head.n_out)
    P_in = projection_matrix(3, "lm_head", "in", 4, head.n_in)
    want = (P_out @ G @ P_in.T).reshape(-1)
    got, _ = hook_encode(model, layers, ex[:1], 4, 3, None, 1)
    i = layers.index(head)
    torch.testing.assert_close(got[0, i * 16:(i + 1) * 16], want, rtol=1e-4, atol=1e-6)


def test_rank1_scales_fit_a_rank1_matrix_exactly():
    r, c = torch.rand(5) + 0.1, torch.rand(3) + 0.1
    v = torch.outer(r, c)
    s_out, s_in = rank1_scales(v, eps=0.0)
    torch.testing.assert_close(torch.outer(s_out, s_in), v.rsqrt(), rtol=1e-5, atol=0)


def test_apply_exact_is_elementwise_division_by_the_root():
    grad = torch.tensor([[3.0, -4.0], [2.0, 0.5]])
    v = torch.tensor([[8.0, 15.0], [3.0, 0.0]])  # v + eps = 9, 16, 4, 1
    torch.testing.assert_close(apply_exact(grad, v, eps=1.0), torch.tensor([[1.0, -1.0], [1.0, 0.5]]), rtol=0, atol=0)


def test_exact_correction_matches_elementwise_division():
    """reference_encode's `adam` rows against a hand computation: each example's own autograd gradient
    (no batching, no padding), divided element-wise by sqrt(v + eps), projected P_out G P_in^T."""
    model = tiny_llama()
    layers = find_layers(model)
    mom = random_moments(model)
    eps, k, seed = 1e-8, 4, 3
    corr = build_correction("adam", layers, mom, eps)
    ex = random_examples(3)
    exact, plain = reference_encode(model, Projection(layers, k, seed), ex, 0, corr)
    params = dict(model.named_parameters())
    for row, e in enumerate(ex):
        ids = torch.tensor([e.input_ids])
        logits = model(input_ids=ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        loss = (nll * torch.tensor(e.loss_mask[1:], dtype=torch.float32)).sum()
        grads = torch.autograd.grad(loss, [params[l.param_name] for l in layers])
        want, want_plain = [], []
        for l, g in zip(layers, grads):
            p_out, p_in = projection_matrix(seed, l.name, "out", k, l.n_out), projection_matrix(seed, l.name, "in", k, l.n_in)
            gc = g / torch.sqrt(mom[l.param_name] + eps)
            want.append((p_out @ gc @ p_in.T).reshape(-1))
            want_plain.append((p_out @ g @ p_in.T).reshape(-1))
        torch.testing.assert_close(exact[row], torch.cat(want), rtol=1e-4, atol=1e-5 * torch.cat(want).abs().max().item())
        torch.testing.assert_close(plain[row], torch.cat(want_plain), rtol=1e-4,
                                   atol=1e-5 * torch.cat(want_plain).abs().max().item())
    assert not torch.allclose(exact, plain, rtol=0.1)  # the correction changes the rows


def test_projection_seed_depends_on_layer_name_only():
    a = projection_matrix(0, "model.layers.0.mlp.up_proj", "in", 8, 32)
    b = projection_matrix(0, "model.layers.0.mlp.up_proj", "in", 8, 32)
    c = projection_matrix(0, "model.layers.1.mlp.up_proj", "in", 8, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.var().item() - 1 / 8) < 0.05


def test_adam_without_state_is_refused_with_advice():
    model = tiny_llama()
    with pytest.raises(Exception, match="estimated"):
        build_correction("adam_rank1", find_layers(model), None, 1e-8)
