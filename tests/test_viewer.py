"""The viewer site the `report` stage builds, opened in headless Chromium (Debian's `chromium` package).

A missing browser fails these tests (it never skips them): install it with
`apt-get install -y chromium`.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

from tests.pipeline import run
from tests.browser import Chromium, find_chromium
from tests.test_serve import serving
from trackstar.data.records import iter_corpus, read_queries
from trackstar.errors import InputError
from trackstar.viewer.report import build_report, method_files
from trackstar.retrieval.results import Hits, make_result, read_results, write_results
from trackstar.serve.app import create_app

METHODS = ["trackstar", "bm25", "dot", "cosine", "optimizer", "r_train"]


@pytest.fixture(scope="module")
def browser():
    with Chromium() as c:
        yield c


@pytest.fixture(scope="module")
def served(built_repo):
    """The report and the retrieval files over http as `trackstar view` serves them, on a free port."""
    with serving(create_app(built_repo)) as base:
        yield base


def _words(s: str) -> list[str]:
    return re.findall(r"\w+", s.lower())


def _contains(text: str, phrase: str | None) -> bool:
    """Reference for the breakdown's mention test: the phrase's words appear consecutively in the text's words."""
    p, t = _words(phrase or ""), _words(text)
    return bool(p) and any(t[i: i + len(p)] == p for i in range(len(t) - len(p) + 1))


def _open(browser: Chromium, url: str) -> None:
    mark = len(browser.events)
    browser.goto(url)
    assert browser.eval("TRACKSTAR.ready.then(() => true)") is True
    assert browser.errors_since(mark) == [], f"console errors on {url}: {browser.errors_since(mark)}"


def test_chromium_is_installed():
    """Never skipped: the browser tests need Debian's chromium (apt-get install -y chromium)."""
    assert Path(find_chromium()).exists()


def test_report_stage_writes_paginated_data_with_only_the_shown_passages(built_repo):
    rep = built_repo / "report"
    queries = read_queries(built_repo / "data/queries.jsonl")
    assert (rep / "index.html").exists() and (rep / "viewer.js").exists() and (rep / "viewer.css").exists()
    pages = sorted((rep / "data").glob("page-*.js"))
    assert len(pages) == math.ceil(len(queries) / 25)
    files = method_files(built_repo / "retrievals")
    assert list(files) == METHODS
    shown = set()
    for path in files.values():
        for r in read_results(path):
            shown |= set(r.proponent_ids[:10]) | set(r.opponent_ids[:10])
    written = {}
    for p in pages:
        text = p.read_text()
        assert text.startswith("TRACKSTAR.page(") and text.rstrip().endswith(");")
        written.update(json.loads(text[text.index("{"): text.rstrip().rindex(")")])["passages"])
    assert set(written) == shown  # exactly the passages a panel shows, not the corpus
    corpus = {p.id: p.text for p in iter_corpus(built_repo / "data/corpus.jsonl")}
    assert all(corpus[i] == t for i, t in written.items())
    html = (rep / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # no CDN: opens offline


def test_evaluate_writes_the_breakdown_and_predictions(built_repo):
    metrics = json.loads((built_repo / "metrics/metrics.json").read_text())
    queries = read_queries(built_repo / "data/queries.jsonl")
    corpus = {p.id: p.text for p in iter_corpus(built_repo / "data/corpus.jsonl")}
    for m, path in method_files(built_repo / "retrievals").items():
        by_id = {r.example_id: r.proponent_ids[:10] for r in read_results(path)}
        shares = {"relevant": 0.0, "both": 0.0, "one": 0.0, "neither": 0.0}
        for q in queries:
            for pid in by_id[q.id]:
                n = _contains(corpus[pid], q.target) + _contains(corpus[pid], q.entity)
                cat = "relevant" if pid in q.relevant_ids else ("neither", "one", "both")[n]
                shares[cat] += 1 / len(by_id[q.id]) / len(queries)
        for c, v in shares.items():
            assert metrics[m][f"top10_{c}"] == pytest.approx(v, abs=1e-12), (m, c)
    assert metrics["trackstar"]["top10_relevant"] > 0
    preds = [json.loads(line) for line in (built_repo / "eval/predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [q.id for q in queries]
    model = json.loads((built_repo / "metrics/model.json").read_text())
    assert sum(p["correct"] for p in preds) / len(preds) == model["accuracy"]
    assert all(p["correct"] == (p["prediction"] == q.target) for p, q in zip(preds, queries))
    assert all(0.0 < p["target_prob"] <= 1.0 for p in preds)


def test_every_query_panel_renders_search_filters_and_no_console_errors(built_repo, browser):
    queries = read_queries(built_repo / "data/queries.jsonl")
    results = {m: {r.example_id: r for r in read_results(p)} for m, p in method_files(built_repo / "retrievals").items()}
    preds = {p["id"]: p for p in map(json.loads, (built_repo / "eval/predictions.jsonl").read_text().splitlines())}
    _open(browser, (built_repo / "report/index.html").as_uri())
    # the landing page: metrics table, ladder and breakdown charts, and the first query's panel
    assert browser.eval("document.querySelectorAll('#metrics tbody tr').length") == 7
    assert browser.eval("document.querySelectorAll('#ladder svg').length") == 3
    # the tail-patch record next to its figures: a flag (with the reasons) when they are not trustworthy
    tp = json.loads((built_repo / "metrics/model.json").read_text())["tail_patch"]
    note = browser.eval("document.getElementById('tail-patch-flag').textContent")
    assert note.startswith("Tail-patch: one step at lr" if tp["trustworthy"] else "\u26a0 Tail-patch figures are not trustworthy")
    assert all(r in note for r in tp["reasons"])
    assert browser.eval("document.querySelectorAll('#breakdown svg rect').length") == 7 * 4
    assert browser.eval("document.getElementById('panel').dataset.qid") == queries[0].id
    assert browser.eval("TRACKSTAR.api.ids()") == [q.id for q in queries]
    panels = browser.eval("""(async () => {
        const out = {};
        for (const id of TRACKSTAR.api.ids()) {
            await TRACKSTAR.api.show(id);
            const panel = document.getElementById('panel');
            const cols = {};
            for (const col of panel.querySelectorAll('.method')) {
                cols[col.dataset.method] = {
                    p: Array.from(col.querySelectorAll('li.proponent'), li => li.dataset.pid),
                    o: Array.from(col.querySelectorAll('li.opponent'), li => li.dataset.pid),
                    rel: Array.from(col.querySelectorAll('li.proponent.rel'), li => li.dataset.pid),
                    marks: col.querySelectorAll('mark.tgt').length};
            }
            out[id] = {qid: panel.dataset.qid, prompt: panel.querySelector('.prompt').textContent, cols: cols,
                       pred: panel.querySelector('.qhead').textContent};
        }
        return out;
    })()""")
    for q in queries:
        got = panels[q.id]
        assert got["qid"] == q.id and got["prompt"] == q.prompt + q.target
        assert list(got["cols"]) == METHODS
        assert json.dumps(preds[q.id]["prediction"], ensure_ascii=False) in got["pred"]
        for m, col in got["cols"].items():
            r = results[m][q.id]
            assert col["p"] == r.proponent_ids[:10] and col["o"] == r.opponent_ids[:10], (q.id, m)
            assert col["rel"] == [i for i in r.proponent_ids[:10] if i in q.relevant_ids]
        assert got["cols"]["trackstar"]["marks"] >= sum(_contains(t, q.target) for t in results["trackstar"][q.id].proponents[:10])
    # search and filters select exactly the queries a reference computation selects
    word = queries[1].entity
    want = [q.id for q in queries if word.lower() in " ".join([q.id, q.prompt, q.target, q.entity,
                                                                preds[q.id]["prediction"]]).lower()]
    assert browser.eval(f"TRACKSTAR.api.filter({{text: {json.dumps(word)}}})") == want
    assert browser.eval("document.querySelectorAll('#qlist li').length") == len(want) < len(queries)
    assert browser.eval("TRACKSTAR.api.filter({text: 'no such query anywhere'})") == []
    right = [q.id for q in queries if preds[q.id]["correct"]]
    assert browser.eval("TRACKSTAR.api.filter({text: '', correct: '1'})") == right
    assert browser.eval("TRACKSTAR.api.filter({correct: '0'})") == [q.id for q in queries if q.id not in right]
    hit = [q.id for q in queries if set(results["trackstar"][q.id].proponent_ids[:10]) & set(q.relevant_ids)]
    assert browser.eval("TRACKSTAR.api.filter({correct: '', hit: '1'})") == hit
    assert browser.eval("TRACKSTAR.api.filter({hit: '0'})") == [q.id for q in queries if q.id not in hit]
    browser.eval("TRACKSTAR.api.filter({hit: ''})")
    assert browser.errors == [], browser.errors


def test_tda_viewer_url_parameters_open_result_files_side_by_side(built_repo, served, browser):
    queries = read_queries(built_repo / "data/queries.jsonl")
    bm25 = {r.example_id: r for r in read_results(built_repo / "retrievals/bm25.jsonl")}
    ts = {r.example_id: r for r in read_results(built_repo / "retrievals/trackstar.jsonl")}
    q = queries[3]
    _open(browser, f"{served}/report/index.html?jsonl_path=../retrievals/bm25.jsonl"
                   f"&sxs_jsonl_path=../retrievals/trackstar.jsonl&example_id={q.id}")
    assert browser.eval("document.getElementById('panel').dataset.qid") == q.id
    assert browser.eval("TRACKSTAR.api.methods()") == ["bm25", "trackstar"]
    cols = browser.eval("Array.from(document.querySelectorAll('#panel .method'), c => "
                        "Array.from(c.querySelectorAll('li.proponent'), li => li.dataset.pid))")
    assert cols == [bm25[q.id].proponent_ids[:10], ts[q.id].proponent_ids[:10]]
    # the PAIR viewer's example_id is a row number: that works too
    _open(browser, f"{served}/report/index.html?jsonl_path=../retrievals/trackstar.jsonl&example_id=2")
    assert browser.eval("document.getElementById('panel').dataset.qid") == queries[2].id
    assert browser.eval("TRACKSTAR.api.filter({text: " + json.dumps(queries[5].prompt) + "})") == [queries[5].id]
    assert browser.errors == [], browser.errors


def test_trace_html_writes_the_same_panel_for_an_ad_hoc_query(built_repo, browser, tmp_path):
    q = read_queries(built_repo / "data/queries.jsonl")[0]
    out = tmp_path / "trace.html"
    printed = run(built_repo, sys.executable, "-m", "trackstar.cli", "trace", q.prompt, "--target", q.target,
                  "-k", "5", "--json", "--html", str(out), "--entity", q.entity).stdout
    traced = json.loads(printed.splitlines()[-1])
    _open(browser, out.as_uri())
    col = browser.eval("Array.from(document.querySelectorAll('#panel .method li.proponent'), li => li.dataset.pid)")
    assert col == traced["proponent_ids"] and len(col) == 5
    assert browser.eval("document.querySelectorAll('#panel .method li.opponent').length") == 5
    assert browser.eval("document.querySelector('#panel .prompt mark.ent').textContent") == q.entity
    assert browser.errors == [], browser.errors


def test_report_refuses_results_for_unknown_queries(tmp_path):
    from trackstar.data.records import Query

    qs = [Query("a", "Q: x? A:", " y", ["p1"])]
    write_results(tmp_path / "m.jsonl", [make_result(Query("b", "Q: x? A:", " y"), Hits(["p1"], [1.0]), {"p1": "y"})])
    with pytest.raises(InputError, match=r"m.jsonl: field 'example_id': 'b' is not a query"):
        build_report(tmp_path / "report", {"m": tmp_path / "m.jsonl"}, qs)
    assert not (tmp_path / "report").exists()


def test_view_serves_the_report_and_retrievals_only_and_refuses_a_missing_report(built_repo, tmp_path):
    import os
    import signal
    import subprocess
    import urllib.request

    out = run(built_repo, sys.executable, "-m", "trackstar.cli", "view", "--file", "--no-browser").stdout
    assert out.strip() == (built_repo / "report/index.html").as_uri()
    bad = run(tmp_path, sys.executable, "-m", "trackstar.cli", "view", "--no-browser", check=False)
    assert bad.returncode == 2 and "report/index.html does not exist: build it with `dvc repro report`" in bad.stderr
    p = subprocess.Popen([sys.executable, "-m", "trackstar.cli", "view", "--root", str(built_repo), "--port", "0",
                          "--no-browser"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = p.stdout.readline().split(" at ")[1].split()[0]
        assert url.endswith("/report/index.html")
        assert b"TRACKSTAR.start()" in urllib.request.urlopen(url, timeout=10).read()
        jsonl = urllib.request.urlopen(url.replace("report/index.html", "retrievals/bm25.jsonl"), timeout=10).read()
        assert jsonl == (built_repo / "retrievals/bm25.jsonl").read_bytes()
        for path in ("params.yaml", ".dvc/config", ".git/config", "data/corpus.jsonl", "report/../params.yaml"):
            with pytest.raises(urllib.error.HTTPError, match="404"):  # tests/test_serve.py tries every trick
                urllib.request.urlopen(url.replace("report/index.html", path), timeout=10)
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(10)
