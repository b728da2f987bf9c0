"""Tail-patch: the batched torch.func path and the one-proponent-at-a-time path (large models) equal an
independent autograd reference (padding included), is in the linear regime at small lr (first-order prediction, doubles with lr), and
averages over the top-k proponents and the queries."""

import math

import pytest
import torch
from torch.func import functional_call

from tests.tiny import random_examples, random_moments, tiny_gpt2, tiny_llama
from trackstar.data.examples import collate, per_example_loss
from trackstar.evaluation.tailpatch import Step, batched_deltas, pair_key, tail_patch


def logprob(model, query, params=None) -> float:
    """log p(target | prompt) by a plain forward with the attention mask."""
    q = collate([query], 0)
    with torch.no_grad():
        logits = functional_call(model, params or dict(model.named_parameters()), args=(),
                                 kwargs={"input_ids": q["input_ids"], "attention_mask": q["attention_mask"]}).logits
    return -float(per_example_loss(logits, q["input_ids"], q["loss_mask"]).sum())


def reference_delta(model, query, passage, v, lr, eps=1e-8) -> float:
    """One step on one passage by plain autograd (attention mask on), then the query's log-prob change."""
    params = dict(model.named_parameters())
    b = collate([passage], 0)
    loss = per_example_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                            b["input_ids"], b["loss_mask"]).sum()
    grads = torch.autograd.grad(loss, list(params.values()))
    new = {n: (p - lr * (g / (v[n] + eps).sqrt() if v is not None else g)).detach()
           for (n, p), g in zip(params.items(), grads)}
    return logprob(model, query, new) - logprob(model, query)


@pytest.mark.parametrize("make", [tiny_llama, lambda: tiny_llama(tie=True), tiny_gpt2], ids=["llama", "tied", "gpt2"])
@pytest.mark.parametrize("with_v", [True, False])
@pytest.mark.parametrize("batch", [4, 1], ids=["vmapped", "one-at-a-time"])
def test_batched_deltas_equal_the_autograd_reference(make, with_v, batch):
    model = make().double()
    v = {n: t.double() for n, t in random_moments(model).items()} if with_v else None
    qs = random_examples(3, seed=1, query=True)
    ps = random_examples(5, seed=2)  # lengths 4..10: every batch is padded
    pairs = [(i, p) for i in range(3) for p in ps[i:i + 3]]
    got = batched_deltas(model, qs, pairs, Step(1e-3, v, 0, batch=batch, progress=False))
    want = [reference_delta(model, qs[i], p, v, 1e-3) for i, p in pairs]
    assert max(abs(w) for w in want) > 1e-4  # the steps move the targets
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-6, abs=1e-9)


def test_small_lr_matches_first_order_prediction_and_is_linear():
    model = tiny_llama().double()
    v = {n: t.double() for n, t in random_moments(model).items()}
    query = random_examples(3, seed=5, query=True)[2]
    passage = random_examples(3, seed=6)[1]
    params = dict(model.named_parameters())
    # independent first-order prediction: theta' = theta - lr u, u = grad(L_p) / sqrt(v + eps), so
    # d log p = -grad(L_q) . (theta' - theta) = lr grad(L_q) . u
    def grads(ex):
        b = collate([ex], 0)
        loss = per_example_loss(model(input_ids=b["input_ids"]).logits, b["input_ids"], b["loss_mask"]).sum()
        return torch.autograd.grad(loss, list(params.values()))
    u = [g / (v[n] + 1e-8).sqrt() for n, g in zip(params, grads(passage))]
    first_order = sum((gq * un).sum() for gq, un in zip(grads(query), u)).item()
    # (Llama's RMSNorm computes in float32 even in a float64 model: ~1e-9 absolute noise, so lr >= 1e-6)
    d1, d2, d3 = batched_deltas(model, [query], [(0, passage)] * 3, Step(0.0, v, 0, progress=False))
    assert d1 == d2 == d3 == 0.0
    for lr in (1e-6, 3e-6):
        (got,) = batched_deltas(model, [query], [(0, passage)], Step(lr, v, 0, progress=False))
        assert abs(got - lr * first_order) <= 1e-2 * abs(lr * first_order)
    (a,) = batched_deltas(model, [query], [(0, passage)], Step(1e-6, v, 0, progress=False))
    (b,) = batched_deltas(model, [query], [(0, passage)], Step(2e-6, v, 0, progress=False))
    assert abs(b / a - 2.0) < 2e-2


def test_tail_patch_averages_over_top_k_and_queries():
    model = tiny_llama().double()
    qs = random_examples(2, seed=1, query=True)
    ps = random_examples(3, seed=2)
    props = {"a": [[ps[0], ps[1]], [ps[2], ps[0]]], "b": [[ps[1], ps[0]], [ps[2], ps[1]]]}
    out = tail_patch(model, qs, props, Step(1e-4, None, 0, batch=3, progress=False), [1, 2])
    for m, lists in props.items():
        d = [[reference_delta(model, q, p, None, 1e-4) for p in lists[i]] for i, q in enumerate(qs)]
        base = [logprob(model, q) for q in qs]
        assert out[m]["tail_patch@1"] == pytest.approx((d[0][0] + d[1][0]) / 2, rel=1e-6)
        assert out[m]["tail_patch@2"] == pytest.approx((sum(d[0]) / 2 + sum(d[1]) / 2) / 2, rel=1e-6)
        prob = [sum(math.exp(base[i] + x) - math.exp(base[i]) for x in d[i]) / 2 for i in range(2)]
        assert out[m]["tail_patch_prob@2"] == pytest.approx(sum(prob) / 2, rel=1e-6)


def test_cache_reuses_known_pairs_and_adds_new_ones():
    model = tiny_llama().double()
    qs = random_examples(2, seed=1, query=True)
    ps = random_examples(4, seed=2)
    cache = {}
    first = tail_patch(model, qs, {"a": [[ps[0]], [ps[1]]]}, Step(1e-4, None, 0, progress=False), [1], cache)
    assert set(cache) == {pair_key(qs[0], ps[0]), pair_key(qs[1], ps[1])}
    assert pair_key(qs[0], ps[0]) != pair_key(qs[1], ps[0]) != pair_key(qs[0], ps[1])
    cache[pair_key(qs[0], ps[0])] = 1.0  # a known pair is read from the cache, not recomputed
    again = tail_patch(model, qs, {"a": [[ps[0]], [ps[1]]], "b": [[ps[2]], [ps[1]]]},
                       Step(1e-4, None, 0, progress=False), [1], cache)
    assert len(cache) == 3  # only (q0, p2) was new
    assert again["a"]["tail_patch@1"] == pytest.approx((1.0 + cache[pair_key(qs[1], ps[1])]) / 2)
    assert first["a"]["tail_patch@1"] == pytest.approx((reference_delta(model, qs[0], ps[0], None, 1e-4)
                                                        + reference_delta(model, qs[1], ps[1], None, 1e-4)) / 2, rel=1e-6)
    assert cache[pair_key(qs[0], ps[2])] == pytest.approx(reference_delta(model, qs[0], ps[2], None, 1e-4), rel=1e-6)


def test_grouped_by_passage_equals_the_per_pair_loop_and_leaves_the_model_untouched():
    """Passages shared by up to 18 queries (more than one re-score forward holds), chunks of 4 passages
    with uneven query counts (padded slots), repeated pairs: each pair equals the plain per-pair step."""
    model = tiny_llama().double()
    v = {n: t.double() for n, t in random_moments(model).items()}
    qs = random_examples(18, seed=3, query=True)
    ps = random_examples(7, seed=4)
    pairs = [(i, ps[0]) for i in range(18)] + [(i, ps[1 + i % 6]) for i in range(0, 18, 2)] + [(5, ps[3]), (5, ps[3])]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = batched_deltas(model, qs, pairs, Step(1e-3, v, 0, batch=4, progress=False))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    want = [reference_delta(model, qs[i], p, v, 1e-3) for i, p in pairs]
    assert len({round(w, 12) for w in want}) > 20  # the pairs differ
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-6, abs=1e-9)


def test_a_tokenizer_without_pad_token_gives_the_same_accuracy_and_tail_patch():
    """GPT-2-style tokenizers have no pad token: evaluate's accuracy and tail-patch pad with eos
    (examples.pad_token_id) and, padding being masked, give exactly what a pad token gives."""
    from trackstar.data.world import FactWorldConfig, generate_fact_world
    from trackstar.data.examples import pad_token_id, passage_example, query_example
    from trackstar.model.train import ModelConfig, accuracy, build_model, train_tokenizer

    passages, queries, _ = generate_fact_world(FactWorldConfig(seed=1, entities=4, relations=2, paraphrases=2, contradicted=0.0, query_wording="held_out"))
    tok = train_tokenizer([p.text for p in passages], 300)
    model = build_model(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), tok).double()
    qex = [query_example(tok, q.prompt, q.target, 48) for q in queries[:3]]
    props = {"m": [[passage_example(tok, passages[i].text, 48) for i in (j, j + 5)] for j in range(3)]}
    with_pad = (accuracy(model, tok, queries, 48), tail_patch(model, qex, props,
                                                              Step(1e-3, None, pad_token_id(tok), progress=False), [2]))
    tok.pad_token = None
    assert tok.pad_token_id is None and pad_token_id(tok) == tok.eos_token_id
    without = (accuracy(model, tok, queries, 48), tail_patch(model, qex, props,
                                                             Step(1e-3, None, pad_token_id(tok), progress=False), [2]))
    assert without[0] == with_pad[0]
    assert without[1]["m"]["tail_patch@2"] == pytest.approx(with_pad[1]["m"]["tail_patch@2"], rel=1e-9)
    assert abs(with_pad[1]["m"]["tail_patch@2"]) > 1e-6
