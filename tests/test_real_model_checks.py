"""benchmarks/real_model.py's tail-patch checks (issue 27's targets) and projection-seed spread against hand
computations, and benchmarks/report.py rendering those sections only when measured. Fast: nothing runs."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.harness import ROOT


@pytest.fixture
def modules(monkeypatch):
    """(real_model, report) loaded from benchmarks/ as the scripts import them."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    out = []
    for name in ("report", "real_model"):
        spec = importlib.util.spec_from_file_location(name, ROOT / f"benchmarks/{name}.py")
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, mod)
        spec.loader.exec_module(mod)
        out.append(mod)
    return out[1], out[0]


def run_metrics(random: float, ts_se: float) -> dict:
    """metrics/*.json of an own-data run: TrackStar 0.30 at top-10, random `random`, TrackStar's SE `ts_se`."""
    rec = {"lr": 1e-6, "lr_param": "auto", "v": "estimated", "queries": 20, "queries_param": "auto",
           "trustworthy": True, "reasons": [], "probe": {"chosen": 1e-6, "dead": False, "tolerance": {"random": 0.2}},
           "guard": {"k": 10, "random": random, "random_se": 0.01, "fired": False}, "estimate_s": 12.0}
    return {"metrics/model.json": {"tail_patch": rec},
            "metrics/metrics.json": {"trackstar": {"tail_patch@10": 0.30, "tail_patch_se@10": ts_se},
                                     "random": {"tail_patch@10": random, "tail_patch_se@10": 0.01}}}


def test_targets_hold_and_fail_as_issue_27_states(modules):
    real_model, _ = modules
    run = {"seconds": 200.0, "stages": {"evaluate": {"seconds": 40.0}}}
    ok = real_model.tail_patch_checks(run_metrics(-0.02, 0.05), run)
    assert ok["targets"] == {"random_within": True, "trackstar_above_random": True, "evaluate_share": True}
    assert ok["all_targets"] and ok["evaluate_share"] == 0.2 and ok["trackstar_minus_random"] == pytest.approx(0.32)
    # |random| 0.06 > 0.05; 0.30 - 0.06 = 0.24 < 2 x 0.15; evaluate 60 of 200 s = 30 %
    bad = real_model.tail_patch_checks(run_metrics(0.06, 0.15), {**run, "stages": {"evaluate": {"seconds": 60.0}}})
    assert bad["targets"] == {"random_within": False, "trackstar_above_random": False, "evaluate_share": False}
    assert real_model.tail_patch_checks({"metrics/metrics.json": {}}, run) is None  # tail-patch skipped


def test_seed_spread_per_k(modules):
    real_model, _ = modules
    runs = [{"k": k, "seed": s, "d": k * k, "trackstar": {"mrr": m}, "encode_to_retrieve": {"seconds": 10.0 * k,
                                                                                             "peak_rss_mb": 100.0 + s}}
            for k, s, m in ((4, 0, 0.5), (4, 1, 0.6), (4, 2, 0.55), (8, 0, 0.7), (8, 1, 0.71))]
    runs.append({"k": 8, "seed": 2, "rc": 1, "encode_to_retrieve": {"seconds": 1.0, "peak_rss_mb": 1.0}})
    out = real_model.seed_spread(runs)
    assert out["4"]["spread"] == pytest.approx(0.1) and out["4"]["seeds"] == 3 and out["4"]["peak_rss_mb_max"] == 102
    assert out["8"]["spread"] == pytest.approx(0.01) and out["8"]["seeds"] == 2 and out["8"]["seconds_mean"] == 80


def test_report_renders_the_sections_only_when_measured(modules):
    real_model, report = modules
    assert report.tail_patch_checks(None) == [] and report.tailpatch_finetuned({}) == []
    assert report.projection_seeds({}) == []
    checks = real_model.tail_patch_checks(run_metrics(0.06, 0.05), {"seconds": 100.0,
                                                                    "stages": {"evaluate": {"seconds": 10.0}}})
    text = "\n".join(report.tail_patch_checks(checks))
    assert "| random | +0.0600 | 0.0100 |" in text and "≤ 0.05: **no** (+0.0600)" in text
