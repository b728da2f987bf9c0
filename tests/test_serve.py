"""`trackstar serve` on the tiny built pipeline: the trace API (good and bad requests, the same answers as
`trackstar trace --json`), artifacts refused at start, the security of what is served, a bounded load test
on 127.0.0.1 and the viewer's "trace your own prompt" form in headless Chromium."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.browser import Chromium
from tests.pipeline import run, set_param
from trackstar.data.records import read_queries
from trackstar.errors import ArtifactMismatch, InputError, TrackStarError
from trackstar.serve.app import Limits, access_for, create_app, listen, uvicorn_server
from trackstar.serve.tracer import Traced, TraceRequest, Tracer

TOKEN = "s3cret-token"


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """The app under uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def call(base: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
         method: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with the path sent exactly as given (no client-side normalization); (status, headers, body)."""
    host = base.split("//")[1]
    conn = http.client.HTTPConnection(host, timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    conn.request(method or ("POST" if data is not None else "GET"), path, body=data, headers=hdrs)
    r = conn.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    conn.close()
    return out


def trace_api(base: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    status, _, data = call(base, "/api/trace", body, headers)
    return status, json.loads(data)


def cli_trace(repo: Path, prompt: str, target: str, k: int, method: str) -> dict[str, Any]:
    out = run(repo, sys.executable, "-m", "trackstar.cli", "trace", prompt, "--target", target, "-k", str(k),
              "--method", method, "--json").stdout
    return json.loads(out.splitlines()[-1])


def same_answer(api: dict[str, Any], cli: dict[str, Any]) -> None:
    for side in ("proponent", "opponent"):
        assert api[f"{side}_ids"] == cli[f"{side}_ids"]
        assert api[f"{side}s"] == cli[f"{side}s"]
        assert api[f"{side}_scores"] == pytest.approx(cli[f"{side}_scores"], rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def tracer(built_repo) -> Tracer:
    return Tracer(built_repo)


@pytest.fixture(scope="module")
def server(built_repo, tracer) -> Iterator[str]:
    with serving(create_app(built_repo, tracer, access_for("127.0.0.1", None))) as base:
        yield base


@pytest.fixture(scope="module")
def queries(built_repo):
    return read_queries(built_repo / "data/queries.jsonl")


@pytest.fixture(scope="module")
def references(built_repo, queries) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(request, `trackstar trace --json` answer) for TrackStar, BM25 and a ladder rung: one process each."""
    reqs = [{"prompt": queries[0].prompt, "target": queries[0].target, "k": 10, "method": "trackstar"},
            {"prompt": queries[1].prompt, "target": queries[1].target, "k": 5, "method": "trackstar"},
            {"prompt": queries[2].prompt, "target": queries[2].target, "k": 10, "method": "bm25"},
            {"prompt": queries[3].prompt, "target": queries[3].target, "k": 7, "method": "r_train"}]
    return [(r, cli_trace(built_repo, r["prompt"], r["target"], r["k"], r["method"])) for r in reqs]


# ---------------------------------------------------------------------------------------------- the API


def test_info_names_the_methods_and_limits(server, tracer):
    status, headers, data = call(server, "/api/info")
    info = json.loads(data)
    assert status == 200 and info["trace"] is True
    assert info["methods"] == ["trackstar", "bm25", "dot", "cosine", "optimizer", "r_train"]
    assert info["max_k"] == Limits().k and info["max_length"] == tracer.max_length
    assert info["passages"] == len(tracer.passages)
    assert headers["cache-control"] == "no-store" and headers["x-content-type-options"] == "nosniff"


def test_trace_answers_as_the_trace_cli_does(server, references):
    for req, cli in references:
        status, rec = trace_api(server, req)
        assert status == 200, rec
        assert rec["example_id"] == "trace" and rec["method"] == req["method"]
        assert rec["inputs_plaintext"] == req["prompt"] and rec["targets_plaintext"] == req["target"]
        assert len(rec["proponent_ids"]) == req["k"]
        assert len(rec["opponent_ids"]) == (0 if req["method"] == "bm25" else req["k"])
        same_answer(rec, cli)


def test_the_pipeline_query_traced_live_matches_its_retrieval_file(server, built_repo, queries):
    """A query of the pipeline, traced live, gets the top hits `retrieve` wrote for it."""
    from trackstar.retrieval.results import read_results

    stored = {r.example_id: r for r in read_results(built_repo / "retrievals/trackstar.jsonl")}
    q = queries[4]
    status, rec = trace_api(server, {"prompt": q.prompt, "target": q.target, "k": 10})
    assert status == 200
    assert rec["proponent_ids"] == stored[q.id].proponent_ids[:10]
    assert rec["proponent_scores"] == pytest.approx(stored[q.id].proponent_scores[:10], rel=1e-4, abs=1e-5)


def test_no_target_traces_the_models_greedy_answer(server, built_repo, queries):
    preds = {p["id"]: p for p in map(json.loads, (built_repo / "eval/predictions.jsonl").read_text().splitlines())}
    q = queries[0]
    status, rec = trace_api(server, {"prompt": q.prompt, "k": 3})
    assert status == 200, rec
    answer = rec["prediction"]
    assert rec["targets_plaintext"] == answer and answer.strip()
    # the same greedy decoding as the evaluate stage's (which stops after the target's length)
    fixed = preds[q.id]["prediction"]
    assert answer.startswith(fixed) or fixed.startswith(answer)
    status, again = trace_api(server, {"prompt": q.prompt, "target": answer, "k": 3})
    assert again["proponent_ids"] == rec["proponent_ids"]


@pytest.mark.parametrize("body, status, field", [
    (b"{not json", 400, "body"),
    (b"[1, 2]", 400, "body"),
    ({"target": " x"}, 422, "prompt"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": "   "}, 422, "prompt"),
    ({"prompt": "Q: a? A:", "target": ""}, 422, "target"),
    ({"prompt": "Q: a? A:", "target": 7}, 422, "target"),
    ({"prompt": "Q: a? A:", "target": " x", "k": 0}, 422, "k"),
    ({"prompt": "Q: a? A:", "target": " x", "k": 101}, 422, "k"),
    ({"prompt": "Q: a? A:", "target": " x", "k": "3"}, 422, "k"),
    ({"prompt": "Q: a? A:", "target": " x", "k": True}, 422, "k"),
    ({"prompt": "Q: a? A:", "target": " x", "method": "gecko"}, 422, "method"),
    ({"prompt": "Q: a? A:", "target": " x", "temperature": 0}, 422, "temperature"),
    ({"prompt": "x" * 9000, "target": " x"}, 422, "prompt"),
    ({"prompt": "Q: \ud800 A:", "target": " x"}, 422, "prompt"),
])
def test_bad_requests_get_a_4xx_naming_the_field(server, body, status, field):
    got, headers, data = call(server, "/api/trace", body)
    err = json.loads(data)
    assert (got, err["field"]) == (status, field), err
    assert err["error"] and headers["content-type"] == "application/json"


def test_prompts_and_targets_beyond_max_length_are_refused_not_cut(server, tracer):
    n = tracer.max_length
    status, err = trace_api(server, {"prompt": "Q: where " * n + "A:", "target": " Paris"})
    assert status == 422 and err["field"] == "prompt" and f"gradients.max_length={n}" in err["error"]
    status, err = trace_api(server, {"prompt": "Q: a? A:", "target": " Paris" * n})
    assert status == 422 and err["field"] == "target" and f"gradients.max_length={n}" in err["error"]
    status, err = trace_api(server, {"prompt": "Q: where " * n + "A:"})  # no room for a greedy answer either
    assert status == 422 and err["field"] == "prompt"


def test_body_size_content_type_and_methods_are_bounded(server):
    status, _, data = call(server, "/api/trace", b'{"prompt": "' + b"x" * (Limits().body_bytes + 1) + b'"}')
    assert status == 413 and json.loads(data)["field"] == "body"
    status, _, data = call(server, "/api/trace", b'{"prompt": "Q: a? A:"}', {"Content-Type": "text/plain"})
    assert status == 415 and json.loads(data)["field"] == "body"
    status, _, data = call(server, "/api/trace", method="GET")
    assert status == 405 and "error" in json.loads(data)
    status, _, _ = call(server, "/api/nothing")
    assert status == 404


def test_an_exception_inside_the_model_is_a_500_and_the_server_lives_on(server, tracer, queries, monkeypatch):
    def broken(examples):
        raise RuntimeError("CUDA out of memory (simulated)")

    q = queries[0]
    monkeypatch.setattr(tracer.enc, "encode", broken)
    status, err = trace_api(server, {"prompt": q.prompt, "target": q.target})
    assert status == 500 and "RuntimeError: CUDA out of memory (simulated)" in err["error"]
    monkeypatch.undo()
    status, rec = trace_api(server, {"prompt": q.prompt, "target": q.target})
    assert status == 200 and rec["proponent_ids"]


def test_traces_searched_together_answer_as_each_alone(tracer, queries):
    """trace_many: TrackStar requests of the same k share one search, with each one's own answer (same ids,
    scores to float rounding); a bad request in the batch gets its own error and the rest are answered."""
    reqs = [TraceRequest(q.prompt, q.target, k, m) for q, k, m in
            zip(queries[:6], [10, 10, 5, 10, 10, 5], ["trackstar", "trackstar", "trackstar", "bm25", "trackstar", "trackstar"])]
    bad = TraceRequest(queries[6].prompt, queries[6].target, 10, "nope")
    got = tracer.trace_many([*reqs[:3], bad, *reqs[3:]])
    assert isinstance(got[3], InputError) and got[3].field == "method"
    for req, done in zip(reqs, got[:3] + got[4:]):
        alone = tracer.trace(req)
        assert done.record["proponent_ids"] == alone.record["proponent_ids"]
        assert done.record["opponent_ids"] == alone.record["opponent_ids"]
        assert done.record["proponent_scores"] == pytest.approx(alone.record["proponent_scores"], abs=1e-5)
        assert done.seconds.get("batch", 1) == {"trackstar": 3 if req.k == 10 else 2}.get(req.method, 1)


class _SlowTracer:
    """A stand-in tracer whose traces wait for a gate: the queue bound is what is tested."""

    methods = ["trackstar"]

    def __init__(self):
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)

    def trace_many(self, reqs: list[TraceRequest]) -> list[Traced]:
        self.started.release()
        assert self.gate.wait(30)
        return [Traced({"example_id": "trace", "proponent_ids": []}, {"search": 0.0}) for _ in reqs]

    def info(self) -> dict[str, Any]:
        return {"methods": self.methods}


def test_excess_concurrent_traces_get_503_not_threads(tmp_path):
    slow = _SlowTracer()
    app = create_app(tmp_path, slow, access_for("127.0.0.1", None), Limits(queue=2))
    with serving(app) as base, ThreadPoolExecutor(4) as pool:
        body = {"prompt": "Q: a? A:", "target": " x"}
        first = [pool.submit(trace_api, base, body) for _ in range(2)]
        assert slow.started.acquire(timeout=30)  # one runs on the single worker, one waits in the queue
        deadline = time.time() + 30
        while app.state.api.pending < 2:
            assert time.time() < deadline
            time.sleep(0.01)
        for _ in range(2):
            status, err = trace_api(base, body)
            assert status == 503 and err["error"].startswith("busy")
        slow.gate.set()
        assert [f.result(30)[0] for f in first] == [200, 200]
        assert trace_api(base, body)[0] == 200  # the queue drained


# ---------------------------------------------------------------------------------------------- access


def test_a_token_guards_every_api_request(built_repo, tracer):
    with serving(create_app(built_repo, tracer, access_for("127.0.0.1", TOKEN))) as base:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            status, hdrs, data = call(base, "/api/info", headers=headers)
            assert status == 401 and json.loads(data)["field"] == "token" and hdrs["www-authenticate"] == "Bearer"
            status, err = trace_api(base, {"prompt": "Q: a? A:", "target": " x"}, headers)
            assert status == 401 and err["field"] == "token"
        assert call(base, "/api/info", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert call(base, "/report/index.html")[0] == 200  # the report site itself is public


def test_non_loopback_hosts_need_a_token_and_loopback_refuses_foreign_host_names(built_repo, server):
    with pytest.raises(TrackStarError, match="--host 0.0.0.0 is reachable from other machines: set --token"):
        access_for("0.0.0.0", None)
    assert access_for("0.0.0.0", TOKEN).hosts == ("*",)
    bad = run(built_repo, sys.executable, "-m", "trackstar.cli", "serve", "--host", "0.0.0.0", "--port", "0",
              "--no-browser", check=False, env={k: v for k, v in os.environ.items() if k != "TRACKSTAR_TOKEN"})
    assert bad.returncode == 2 and "set --token or TRACKSTAR_TOKEN" in bad.stderr
    # DNS rebinding: a page of another site resolving its name to 127.0.0.1 is refused
    status, _, _ = call(server, "/api/info", headers={"Host": "evil.example"})
    assert status == 400


# ---------------------------------------------------------------------------------------------- what is served

SECRET = "AKIA-NOT-A-REAL-KEY"
REFUSED = ["/.dvc/config", "/.dvc/config.local", "/.git/config", "/.git/HEAD", "/params.yaml", "/dvc.lock",
           "/../params.yaml", "/report/../params.yaml", "/report/../.dvc/config.local",
           "/report/%2e%2e/params.yaml", "/report/%2E%2E/.dvc/config.local", "/report/..%2fparams.yaml",
           "/report/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/report/%252e%252e/params.yaml", "/report/..%5cparams.yaml",
           "/report/..\\params.yaml", "/report/.hidden.js", "/report/data/.hidden.js", "/report/leak.js",
           "/report/leakdir/config.local", "/report//etc/passwd", "/report/%00index.html", "/report/index.html%00.js",
           "/retrievals/../params.yaml", "/retrievals/%2e%2e/.dvc/config.local", "/retrievals/leak.jsonl",
           "/retrievals/../data/corpus.jsonl", "/retrievals/bm25.jsonl/..", "/data/corpus.jsonl", "/inputs/",
           "/model/config.json", "/encodings/final/train.zarr/zarr.json", "/hessian/w_mix.safetensors",
           "/report", "/report/", "/retrievals/", "/report/data", "/report/viewer.js/"]


@pytest.fixture(scope="module")
def booby_trapped(copy_built) -> Path:
    """A copy of the built repo with a secret in .dvc/config.local and symlinks and dotfiles in report/."""
    repo = copy_built("serve-security")
    (repo / ".dvc/config.local").write_text(f"['remote \"s3\"']\n    secret_access_key = {SECRET}\n")
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text() + f"# {SECRET}\n")
    (repo / "report/leak.js").symlink_to(repo / ".dvc/config.local")
    (repo / "report/leakdir").symlink_to(repo / ".dvc", target_is_directory=True)
    (repo / "retrievals/leak.jsonl").symlink_to(repo / ".dvc/config.local")
    (repo / "report/.hidden.js").write_text(SECRET)
    (repo / "report/data/.hidden.js").write_text(SECRET)
    (repo / "report/inside.js").symlink_to(repo / "report/viewer.js")  # a link within report/ is fine
    return repo


def _refuses_everything_outside(base: str, repo: Path) -> None:
    for path in REFUSED:
        status, _, data = call(base, path)
        assert status in (307, 400, 404, 405), (path, status)  # 307: /report -> /report/, itself a 404
        assert SECRET.encode() not in data and b"[core]" not in data and b"root:" not in data, path
    status, _, data = call(base, "/report/index.html")
    assert status == 200 and b"TRACKSTAR.start()" in data
    assert call(base, "/report/inside.js")[2] == (repo / "report/viewer.js").read_bytes()
    assert call(base, "/report/data/index.js")[0] == 200
    for f in ("retrievals/bm25.jsonl", "retrievals/trackstar.jsonl", "retrievals/ladder/dot.jsonl"):
        assert call(base, "/" + f)[2] == (repo / f).read_bytes()
    assert call(base, "/report/index.html", method="HEAD")[0] == 200
    status, headers, _ = call(base, "/")
    assert status in (302, 307) and headers["location"] == "/report/index.html"


def test_serve_hands_out_only_the_report_and_the_retrieval_files(booby_trapped, tracer):
    with serving(create_app(booby_trapped, tracer, access_for("127.0.0.1", None))) as base:
        _refuses_everything_outside(base, booby_trapped)


def test_view_hands_out_only_the_report_and_the_retrieval_files(booby_trapped):
    p = subprocess.Popen([sys.executable, "-m", "trackstar.cli", "view", "--root", str(booby_trapped), "--port", "0",
                          "--no-browser"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = p.stdout.readline().split(" at ")[1].split()[0]
        base = url.removesuffix("/report/index.html")
        _refuses_everything_outside(base, booby_trapped)
        status, _, data = call(base, "/api/info")
        assert status == 200 and json.loads(data)["trace"] is False
        assert call(base, "/api/trace", {"prompt": "Q: a? A:"})[0] == 404
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(10)


# ---------------------------------------------------------------------------------------------- start-up


def test_serve_prints_its_address_and_answers(built_repo, queries):
    p = subprocess.Popen([sys.executable, "-m", "trackstar.cli", "serve", "--root", str(built_repo), "--port", "0",
                          "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         start_new_session=True)
    try:
        line = p.stdout.readline()
        assert line.startswith(f"serving {built_repo / 'report'} and the trace API") and "(Ctrl-C stops)" in line
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/report/index.html")
        base = url.removesuffix("/report/index.html")
        status, rec = trace_api(base, {"prompt": queries[0].prompt, "target": queries[0].target, "k": 3})
        assert status == 200 and len(rec["proponent_ids"]) == 3
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(10)


def test_mismatched_artifacts_are_refused_at_start(copy_built):
    repo = copy_built("serve-mismatch")
    set_param(repo, "projection.seed", 1)  # the stores were encoded with seed 0
    with pytest.raises(ArtifactMismatch, match=r"encodings/final/train.zarr: 'config' differs .* run `dvc repro`"):
        Tracer(repo)
    bad = run(repo, sys.executable, "-m", "trackstar.cli", "serve", "--root", str(repo), "--port", "0", "--no-browser",
              check=False)
    assert bad.returncode == 2 and "'config' differs from the current params.yaml/model" in bad.stderr
    assert "serving" not in bad.stdout
    set_param(repo, "projection.seed", 0)
    with open(repo / "data/corpus.jsonl", "a") as f:
        f.write('{"id": "extra", "text": "A passage added after the pipeline ran."}\n')
    with pytest.raises(ArtifactMismatch, match=r"rows but the corpus .* has 97 passages"):
        Tracer(repo)


# ---------------------------------------------------------------------------------------------- load


def test_200_requests_from_8_clients_all_answered_as_the_cli_does(server, references):
    jobs = [references[i % len(references)] for i in range(200)]

    def one(job):
        req, _ = job
        return trace_api(server, req)

    t0 = time.time()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, jobs))
    seconds = time.time() - t0
    assert [s for s, _ in answers] == [200] * len(jobs)
    for (req, cli), (_, rec) in zip(jobs, answers):
        same_answer(rec, cli)
    print(f"200 traces from 8 clients in {seconds:.1f} s")


# ---------------------------------------------------------------------------------------------- the viewer


@pytest.fixture(scope="module")
def browser():
    with Chromium() as c:
        yield c


def _type(browser: Chromium, selector: str, text: str) -> None:
    """Focus a field, clear it and type into it as a user would (DevTools Input.insertText)."""
    browser.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.focus(); e.select(); }})()")
    browser.send("Input.insertText", text=text)


def test_the_viewer_form_traces_a_typed_prompt(server, browser, tracer, queries):
    q = queries[0]
    want = tracer.trace(TraceRequest(q.prompt, q.target, 10, "trackstar")).record
    bm25 = tracer.trace(TraceRequest(q.prompt, q.target, 10, "bm25")).record
    mark = len(browser.events)
    browser.goto(f"{server}/report/index.html")
    assert browser.eval("TRACKSTAR.ready.then(() => TRACKSTAR.live)") is True
    assert browser.eval("document.getElementById('live').open") is True
    _type(browser, "#live-prompt", q.prompt)
    _type(browser, "#live-target", q.target)
    _type(browser, "#live-entity", q.entity)
    browser.eval("document.getElementById('live-go').click()")
    assert browser.eval("TRACKSTAR.traced") is True
    panel = browser.eval("""(() => {
        const p = document.getElementById('panel');
        return {qid: p.dataset.qid, prompt: p.querySelector('.prompt').textContent,
                cols: Array.from(p.querySelectorAll('.method'), c => c.dataset.method),
                top: Array.from(p.querySelectorAll('.method')[0].querySelectorAll('li.proponent'), li => li.dataset.pid),
                bm25: Array.from(p.querySelectorAll('.method')[1].querySelectorAll('li.proponent'), li => li.dataset.pid),
                opp: p.querySelectorAll('.method')[0].querySelectorAll('li.opponent').length,
                ent: p.querySelectorAll('mark.ent').length};
    })()""")
    assert panel["qid"] == "live-1" and panel["prompt"] == q.prompt + q.target
    assert panel["cols"] == ["trackstar", "bm25"]
    assert panel["top"][0] == want["proponent_ids"][0] and panel["top"] == want["proponent_ids"]
    assert panel["bm25"] == bm25["proponent_ids"] and panel["opp"] == 10 and panel["ent"] > 0
    # a bad k is reported next to the form, naming the field
    _type(browser, "#live-k", "500")
    browser.eval("document.getElementById('live-go').click()")
    assert browser.eval("TRACKSTAR.traced") is False
    assert browser.eval("document.getElementById('live-status').textContent").startswith("k: ")
    assert [e for e in browser.errors_since(mark) if "422" not in e] == []


def test_the_form_opened_from_a_file_says_how_to_start_a_server(built_repo, browser):
    browser.goto((built_repo / "report/index.html").as_uri())
    assert browser.eval("TRACKSTAR.ready.then(() => TRACKSTAR.live)") is False
    assert "trackstar serve" in browser.eval("document.getElementById('live-status').textContent")
    assert browser.eval("document.getElementById('live-go').disabled") is True
