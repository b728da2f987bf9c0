"""Every figure the docs quote is the one in its results file (benchmarks/report.py --check), and every
benchmark writes its results file through tests/harness.py (so it records the commit, params and machine).
Fast: nothing is measured or rerun."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.harness import ROOT, write_results


def test_doc_figures_equal_their_results_files():
    proc = subprocess.run([sys.executable, "benchmarks/report.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"run `python benchmarks/report.py` or fix the doc:\n{proc.stderr}"


def test_the_check_fails_when_a_doc_figure_differs(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks/report.py")
    report = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "report", report)
    spec.loader.exec_module(report)
    doc = tmp_path / "docs/pipeline.md"
    doc.parent.mkdir()
    phrase = report.DOC_FIGURES[0].phrase()
    doc.write_text((ROOT / "docs/pipeline.md").read_text().replace(phrase, phrase.replace("minutes", "min")))
    shutil.copytree(ROOT / "docs", tmp_path / "docs", dirs_exist_ok=True, ignore=lambda d, names: ["pipeline.md"])
    shutil.copyfile(ROOT / "README.md", tmp_path / "README.md")  # README.md quotes figures too
    assert report.doc_problems(tmp_path) == [f"docs/pipeline.md: lacks {phrase!r}"]


def test_the_readme_trace_example_must_rank_its_fact_first_on_every_seed(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks/report.py")
    report = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "report", report)
    spec.loader.exec_module(report)
    seeds = report.current_seeds()
    if seeds is None:
        pytest.skip("benchmarks/results/seeds.json did not measure the current recipe")
    from trackstar.config import DataParams
    from trackstar.data.world import generate_fact_world, world_config

    data = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]
    queries = generate_fact_world(world_config(DataParams(**data)))[1]
    every = set(seeds["summary"]["trackstar_top1_relevant_every_seed"])
    good = next(q for q in queries if q.id in every)
    bad = next(q for q in queries if q.id not in every)
    readme = tmp_path / "README.md"
    for q, want in ((good, []), (bad, [f"README.md: the trace example ({bad.id}) does not have a relevant top "
                                       "proponent on every seed"])):
        readme.write_text(f'```\ntrackstar trace "{q.prompt}" --target "{q.target}" -k 3\n```\n')
        assert report.trace_example_problems(readme) == want
    readme.write_text('trackstar trace "Q: Who is nobody? A:" --target " x"\n')
    assert report.trace_example_problems(readme)[0].endswith("is not a query of the default world")


def test_every_benchmark_writes_its_results_through_the_harness():
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        text = script.read_text()
        if script.name != "report.py" and re.search(r"results[/\"]", text):
            assert re.search(r"from tests(\.harness)? import", text), \
                f"{script.name}: write results with tests.harness (commit, params, machine)"


def test_results_file_records_commit_params_and_machine(tmp_path):
    out = write_results(tmp_path / "r.json", {"k": 4}, {"seconds": 1.5})
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == out
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", saved["commit"])
    assert saved["params"] == {"k": 4} and saved["seconds"] == 1.5
    assert {"cpu", "cpus", "python", "platform"} <= set(saved["machine"])
