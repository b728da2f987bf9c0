"""Tail-patch at small lr is in the linear regime: it matches the first-order prediction and
doubles when lr doubles."""

import torch

from tests.tiny import random_examples, random_moments, tiny_llama
from trackstar.examples import collate, per_example_loss
from trackstar.tailpatch import patched_delta, step_direction, tail_patch, target_logprob


def test_small_lr_matches_first_order_prediction_and_is_linear():
    model = tiny_llama().double()
    v = {n: t.double() for n, t in random_moments(model).items()}
    query = random_examples(3, seed=5, query=True)[2]
    passage = random_examples(3, seed=6)[1]
    eps = 1e-8
    u = step_direction(model, passage, 0, v, eps)
    # independent first-order prediction: d log p = -lr * grad(L_q) . u  ->  lr * grad(log p) . (-u)
    b = collate([query], 0)
    params = dict(model.named_parameters())
    logp = -per_example_loss(model(input_ids=b["input_ids"]).logits, b["input_ids"], b["loss_mask"]).sum()
    grads = torch.autograd.grad(logp, list(params.values()))
    first_order = sum(-(g * u[n]).sum() for (n, _), g in zip(params.items(), grads)).item()
    base = target_logprob(model, query, 0)
    # (Llama's RMSNorm computes in float32 even in a float64 model: ~1e-9 absolute noise, so lr >= 1e-6)
    for lr in (1e-6, 3e-6):
        got = patched_delta(model, query, u, lr, 0, base)
        assert abs(got - lr * first_order) <= 1e-2 * abs(lr * first_order)
    d1 = patched_delta(model, query, u, 1e-6, 0, base)
    d2 = patched_delta(model, query, u, 2e-6, 0, base)
    assert abs(d2 / d1 - 2.0) < 2e-2


def test_u_is_gradient_over_sqrt_v():
    model = tiny_llama().double()
    v = {n: t.double() for n, t in random_moments(model).items()}
    ex = random_examples(2)[0]
    u = step_direction(model, ex, 0, v, 1e-8)
    plain = step_direction(model, ex, 0, None, 1e-8)
    for n in u:
        torch.testing.assert_close(u[n], plain[n] / (v[n] + 1e-8).sqrt())


def test_tail_patch_averages_over_top_k_and_queries():
    model = tiny_llama().double()
    qs = random_examples(2, seed=1, query=True)
    ps = random_examples(3, seed=2)
    props = {"a": [[ps[0], ps[1]], [ps[2], ps[0]]]}
    out = tail_patch(model, qs, props, 0, None, 1e-4, [1, 2], progress=False)["a"]
    d = [[patched_delta(model, q, step_direction(model, p, 0, None, 1e-8), 1e-4, 0, target_logprob(model, q, 0))
          for p in props["a"][i]] for i, q in enumerate(qs)]
    assert abs(out["tail_patch@1"] - (d[0][0] + d[1][0]) / 2) < 1e-12
    assert abs(out["tail_patch@2"] - (sum(d[0]) / 2 + sum(d[1]) / 2) / 2) < 1e-12
