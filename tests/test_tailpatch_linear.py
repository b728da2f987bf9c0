"""Tail-patch's step size and guard: `auto` picks the largest grid lr at which the exact step (plain autograd,
computed here) agrees with its first-order prediction; the random-proponent guard fires when the lr is forced
far too large and not at the auto lr; a fixed lr still works; `auto` queries fit the budget; bad values refused."""

import dataclasses
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from tests.test_tailpatch import reference_delta
from tests.tiny import random_examples, random_moments, tiny_llama
from trackstar.config import EvalParams, load_params, parse_params
from trackstar.data.examples import Example, collate, per_example_loss
from trackstar.errors import ConfigError
from trackstar.evaluation.influence import MIN_QUERIES, auto_queries, plan_tail_patch, run_tail_patch
from trackstar.evaluation.tailpatch import (LR_GRID, TOLERANCE, Probe, Step, _skip_reason, pair_key, probe_linearity,
                                            random_guard, tail_patch)


def slope(model, query: Example, passage: Example, v, eps: float = 1e-8) -> float:
    """grad L_q . grad L_p / sqrt(v + eps) by plain autograd: d log p(target) / d lr at lr 0."""
    params = dict(model.named_parameters())

    def grads(ex):
        b = collate([ex], 0)
        loss = per_example_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                b["input_ids"], b["loss_mask"]).sum()
        return torch.autograd.grad(loss, list(params.values()))

    u = [g / (v[n] + eps).sqrt() if v is not None else g for n, g in zip(params, grads(passage))]
    return sum((gq * un).sum() for gq, un in zip(grads(query), u)).item()


def self_passage(q: Example) -> Example:
    """The query's own text as a training passage (loss on every token): a step on it raises the target."""
    return Example(q.input_ids, [0] + [1] * (len(q.input_ids) - 1))


@pytest.fixture(scope="module")
def world():
    model = tiny_llama().double()
    v = {n: t.double() for n, t in random_moments(model).items()}
    qs = random_examples(12, seed=21, query=True)
    rand = random_examples(12, seed=22)
    props = {"trackstar": [[self_passage(q)] for q in qs], "random": [[p] for p in rand]}
    return model, v, qs, props


def test_auto_lr_is_the_largest_grid_lr_where_the_exact_step_matches_its_first_order_prediction():
    model = tiny_llama().double()
    v = {n: t.double() for n, t in random_moments(model).items()}
    qs = random_examples(4, seed=1, query=True)
    ps = random_examples(8, seed=2)
    groups = {"random": [(i, ps[i]) for i in range(4)], "top": [(i, ps[4 + i]) for i in range(4)]}
    probe = probe_linearity(model, qs, groups, Step(math.nan, v, 0, batch=4, progress=False))
    # independently: each pair's exact change (one autograd step, attention mask on) against lr x its slope
    slopes = {g: [slope(model, qs[i], p, v) for i, p in ps_] for g, ps_ in groups.items()}
    errors = []
    for lr in LR_GRID:
        per_group = []
        for g, ps_ in groups.items():
            rel = [abs(reference_delta(model, qs[i], p, v, lr) - lr * a) / abs(lr * a) for (i, p), a in zip(ps_, slopes[g])]
            per_group.append(statistics.median(rel) / TOLERANCE[g])  # a share of the group's own tolerance
        errors.append(max(per_group))
    linear = [lr for lr, err in zip(LR_GRID, errors) if err <= 1.0]
    want = linear[0]
    assert want != LR_GRID[0]  # the grid's large end is outside the linear regime: the choice is not trivial
    assert probe.chosen == want == probe.lr
    assert errors[LR_GRID.index(want) - 1] > 1.0  # the next larger step is not linear
    for row, err in zip(probe.grid, errors):
        assert row["lr"] in LR_GRID
        if "skipped" in row:  # ruled out by the slopes alone: the independent step fails too, or is below the noise
            assert err > 1.0 or row["lr"] < want
        elif row["lr"] >= want:  # above the noise floor: the probe's measurement is the independent one
            assert row["error"] == pytest.approx(err, rel=1e-3)
    assert probe.reason() is None and not probe.dead
    assert probe.seconds_per_passage > 0 and probe.seconds_per_pair > 0


def test_lrs_ruled_out_by_first_order_alone():
    labels = ["random", "random", "top", "top", "top"]
    base = [-3.0, -3.0, -0.4, -0.4, -4.0]  # headroom to log p = 0: 0.4, 0.4 and 4 nats for the top pairs
    slopes = [1e3, -2e3, 1e5, 2e5, 1e5]
    # lr 1e-5: top gains 1, 2, 1 nats: two of three beyond headroom / (1 - 0.5) = 0.8: certain to miss the tolerance
    assert "headroom" in _skip_reason(1e-5, slopes, base, labels, noise=1e-6)
    # lr 1e-6: gains 0.1-0.2 nats, within headroom / (1 - 0.5): it must be stepped
    assert _skip_reason(1e-6, slopes, base, labels, noise=1e-6) is None
    # lr 1e-12: median |prediction| 1e-7 below the noise floor 1e-6
    assert "noise" in _skip_reason(1e-12, slopes, base, labels, noise=1e-6)
    # a decrease (negative slope) has no ceiling: log p may fall without bound
    assert _skip_reason(1e-2, [-1e5] * 3, [-0.1] * 3, ["top"] * 3, noise=1e-6) is None


def test_a_skipped_lr_fails_when_stepped_anyway_and_the_probe_keeps_its_steps():
    """A model that already predicts its targets (little headroom): the probe rules large lrs out by their
    first-order gain alone; stepping them anyway (a one-lr grid is never skipped) shows the rule was right.
    The probe's steps at the chosen lr are kept for tail-patch, equal to tail-patch's own."""
    model = tiny_llama().double()
    v = {n: t.double() for n, t in random_moments(model).items()}
    qs = random_examples(4, seed=1, query=True)
    groups = {"random": [(i, p) for i, p in enumerate(random_examples(4, seed=2))],
              "top": [(i, self_passage(q)) for i, q in enumerate(qs)]}
    step = Step(math.nan, v, 0, batch=4, progress=False)
    probe = probe_linearity(model, qs, groups, step)
    skipped = [r for r in probe.grid if "headroom" in r.get("skipped", "")]
    assert skipped, [r.get("skipped") for r in probe.grid]
    for r in skipped[:2]:
        alone = probe_linearity(model, qs, groups, step, grid=[r["lr"]])
        assert "skipped" not in alone.grid[0] and alone.grid[0]["error"] > 1.0
    assert probe.chosen is not None and len(probe.measured) == 8
    cache: dict[str, float] = {}
    tail_patch(model, qs, {"top": [[p] for _, p in groups["top"]]}, dataclasses.replace(step, lr=probe.lr), [1], cache)
    for i, p in groups["top"]:
        assert cache[pair_key(qs[i], p)] > 0  # a step on the query's own text raises its target
        assert probe.measured[pair_key(qs[i], p)] == pytest.approx(cache[pair_key(qs[i], p)], rel=1e-9, abs=1e-12)


def test_a_step_that_moves_nothing_is_reported_dead():
    model = tiny_llama().double()
    v = {n: torch.full_like(p, 1e30) for n, p in model.named_parameters()}  # steps of ~1e-15 lr: nothing moves
    qs = random_examples(2, seed=1, query=True)
    ps = random_examples(2, seed=2)
    probe = probe_linearity(model, qs, {"top": [(0, ps[0]), (1, ps[1])]}, Step(math.nan, v, 0, progress=False))
    assert probe.dead and probe.chosen is None and probe.lr == LR_GRID[0]
    assert "dead step" in probe.reason()


def test_guard_fires_at_a_forced_large_lr_and_not_at_the_auto_lr(world):
    model, v, qs, props = world
    groups = {"random": [(i, props["random"][i][0]) for i in range(8)],
              "top": [(i, props["trackstar"][i][0]) for i in range(8)]}
    auto = probe_linearity(model, qs, groups, Step(math.nan, v, 0, progress=False)).lr
    at_auto = tail_patch(model, qs, props, Step(auto, v, 0, progress=False), [1])
    # independently: per-query changes by plain autograd, their mean and standard error over the 12 queries
    for m in props:
        d = [reference_delta(model, q, props[m][i][0], v, auto) for i, q in enumerate(qs)]
        assert at_auto[m]["tail_patch@1"] == pytest.approx(statistics.mean(d), rel=1e-5)
        assert at_auto[m]["tail_patch_se@1"] == pytest.approx(statistics.stdev(d) / math.sqrt(len(d)), rel=1e-5)
    assert at_auto["trackstar"]["tail_patch@1"] > 2 * at_auto["trackstar"]["tail_patch_se@1"]
    assert random_guard(at_auto, 1) is None
    forced = tail_patch(model, qs, props, Step(1.0, v, 0, progress=False), [1])
    reason = random_guard(forced, 1)
    assert reason is not None and ("random proponents' mean tail_patch@1" in reason or "not finite" in reason)


def test_guard_definition():
    def tp(r, se, top=1.0):
        return {"trackstar": {"tail_patch@10": top}, "random": {"tail_patch@10": r, "tail_patch_se@10": se}}

    assert random_guard(tp(-0.2, 0.05), 10) is not None  # 0.2 > 0.1 x 1.0 and > 2 x 0.05
    assert random_guard(tp(-0.2, 0.15), 10) is None  # within 2 standard errors of 0
    assert random_guard(tp(-0.05, 0.001), 10) is None  # significant, but under a tenth of the largest method's
    assert random_guard(tp(-0.2, 0.05, top=-3.0), 10) is None  # the largest |mean| counts, whatever its sign
    assert "not finite" in random_guard(tp(float("nan"), 0.05), 10)
    assert random_guard({"trackstar": {"tail_patch@10": 1.0}}, 10) is None  # no random baseline: nothing to check


def test_plan_and_run_in_a_pipeline_auto_fixed_and_forced(world, tmp_path, capsys):
    model, v, qs, props = world
    tiny_llama().save_pretrained(tmp_path / "model")  # the checkpoint the memo key hashes (no optimizer state)
    plan = plan_tail_patch(model, qs, props, 0, EvalParams(), tmp_path)
    assert plan.v_source == "none" and plan.step.v_hat is None  # no Adam state, no estimate: a plain step
    assert plan.step.lr == plan.probe.chosen in LR_GRID and len(plan.queries) == 12
    assert len(plan.probe.measured) == 16 and plan.pairs == 24 - 16  # the probe's 8 queries x 2 pairs are reused
    assert plan.text().startswith(f"tail-patch plan: lr {plan.step.lr:.3g} (auto: the largest of 15 grid steps whose measured change is within its first-order prediction's tolerance (random 20%, top 50%; ")
    tp, record = run_tail_patch(model, plan)
    assert record["trustworthy"] is True and record["reasons"] == [] and record["lr_param"] == "auto"
    assert record["probe"]["chosen"] == plan.step.lr and len(record["probe"]["grid"]) == len(LR_GRID)
    json.dumps(record, allow_nan=False)  # strict JSON for metrics/model.json
    want = tail_patch(model, qs, props, Step(plan.step.lr, None, 0, progress=False), [1, 10])
    assert tp == want
    again = plan_tail_patch(model, qs, props, 0, EvalParams(), tmp_path)  # probe and pairs from the memo
    assert again.probe_memoized and again.step.lr == plan.step.lr and again.pairs == 0 and len(again.cache) == 24

    fixed = plan_tail_patch(model, qs, props, 0, EvalParams(tail_patch_lr=1e-4, tail_patch_queries=5), tmp_path)
    assert fixed.step.lr == 1e-4 and len(fixed.queries) == 5 and [r["lr"] for r in fixed.probe.grid] == [1e-4]
    tp_fixed, rec_fixed = run_tail_patch(model, fixed)
    five = {m: lists[:5] for m, lists in props.items()}
    assert tp_fixed == tail_patch(model, qs[:5], five, Step(1e-4, None, 0, progress=False), [1, 10])
    assert rec_fixed["lr"] == 1e-4 and rec_fixed["lr_param"] == 1e-4 and rec_fixed["queries"] == 5

    forced = plan_tail_patch(model, qs, props, 0, EvalParams(tail_patch_lr=1.0), tmp_path)
    assert "NOT LINEAR" in forced.text()
    _, rec_forced = run_tail_patch(model, forced)
    assert rec_forced["trustworthy"] is False and rec_forced["guard"]["fired"] is True
    assert any("median relative error" in r and "not linear" in r for r in rec_forced["reasons"])
    json.dumps(rec_forced, allow_nan=False)


def test_auto_queries_fit_the_budget():
    qs = random_examples(150, seed=3, query=True)
    ps = random_examples(300, seed=4)
    props = {"a": [[ps[2 * i]] for i in range(150)], "b": [[ps[2 * i + 1]] for i in range(150)]}
    probe = Probe([], None, TOLERANCE, 0.0, False, 0, seconds_per_passage=1.0, seconds_per_pair=0.5)
    # each query adds 2 distinct passages and 2 distinct pairs: 3 s per query
    assert auto_queries(qs, props, 1, probe, 3 * 23 + 1) == 23
    assert auto_queries(qs, props, 1, probe, 1.0) == MIN_QUERIES  # never fewer, budget or not
    assert auto_queries(qs, props, 1, probe, 1e9) == 100  # never more
    assert auto_queries(qs[:4], {m: lists[:4] for m, lists in props.items()}, 1, probe, 1.0) == 4


@pytest.mark.parametrize("key, value, needle", [
    ("tail_patch_lr", 0, "must be 'auto' or a number > 0"),
    ("tail_patch_lr", "fast", "must be 'auto' or a number > 0"),
    ("tail_patch_lr", True, "must be 'auto' or a number > 0"),
    ("tail_patch_queries", 2.5, "must be 'auto' or a whole number >= 0"),
    ("tail_patch_queries", -1, "must be 'auto' or a whole number >= 0"),
    ("tail_patch_budget_s", 0, "greater than 0"),
    ("tail_patch_ks", [], "at least 1 item"),
])
def test_bad_eval_values_are_refused(key, value, needle):
    with pytest.raises(ConfigError, match=f"field 'eval.{key}'.*{needle}"):
        parse_params({"eval": {key: value}})


def test_eval_values_accepted():
    assert parse_params({}).eval.tail_patch_lr == "auto" and parse_params({}).eval.tail_patch_queries == "auto"
    shipped = load_params(Path(__file__).resolve().parent.parent / "params.yaml").eval  # the project's own file
    assert (shipped.tail_patch_lr, shipped.tail_patch_queries, shipped.tail_patch_budget_s) == ("auto", "auto", 300.0)
    assert (shipped.seed, shipped.dev_fraction) == (0, 0.5)
    e = parse_params({"eval": {"tail_patch_lr": "1e-6", "tail_patch_queries": 40}}).eval  # YAML reads 1e-6 as a string
    assert e.tail_patch_lr == 1e-6 and e.tail_patch_queries == 40
