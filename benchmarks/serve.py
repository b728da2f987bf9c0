"""Trace latency of `trackstar serve` against `trackstar trace` as a fresh process, on a built pipeline.

POST /api/trace for the pipeline's own queries from 1 client, then from 8 threads at once (p50 / p95, queueing
included, and throughput); the median time of each step from the Server-Timing header; the server's start-up
time and peak RSS (VmHWM); against --cli-runs runs of `trackstar trace ... --json` as a fresh process (wall and
CPU seconds, peak RSS). Writes results/serve.json under --label, keeping the other labels' figures (each label
records the commit and machine it ran on).
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.*
from tests import harness  # noqa: E402
from trackstar.data.records import corpus_files, count_lines, read_queries  # noqa: E402

HERE = harness.ROOT / "benchmarks"


def percentile(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation, as numpy's default."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def post(base: str, body: dict) -> tuple[float, dict[str, float]]:
    """(seconds, Server-Timing ms by step) of one trace; raises on any status but 200."""
    conn = http.client.HTTPConnection(base, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/api/trace", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    seconds = time.perf_counter() - t0
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {data[:300]!r}")
    steps = {"batch": 1.0}  # traces searched together with this one (the server says when more than one)
    for part in (r.getheader("Server-Timing") or "").split(","):
        if ";dur=" in part:
            name, dur = part.strip().split(";dur=")
            steps[name] = float(dur)
        elif part.strip().startswith("batch;desc="):
            steps["batch"] = float(part.strip().split("=", 1)[1])
    return seconds, steps


def latencies(base: str, bodies: list[dict], clients: int) -> dict:
    """p50 / p95 / mean latency (s), throughput and median step times of `bodies` sent from `clients` threads."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(lambda b: post(base, b), bodies))
    wall = time.perf_counter() - t0
    secs = [s for s, _ in done]
    steps = {k: round(statistics.median(t[k] for _, t in done if k in t), 2) for k in done[0][1] if k != "batch"}
    return {"clients": clients, "requests": len(bodies), "p50_s": round(percentile(secs, 0.5), 4),
            "p95_s": round(percentile(secs, 0.95), 4), "mean_s": round(statistics.mean(secs), 4),
            "traces_per_s": round(len(bodies) / wall, 2), "server_ms_median": steps,
            "batch_mean": round(statistics.mean(t["batch"] for _, t in done), 2)}


def peak_rss_mb(pid: int) -> float:
    """A live process's peak resident set (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def cli_baseline(root: Path, bodies: list[dict], runs: int) -> dict:
    """`trackstar trace ... --json` as a fresh process, `runs` times: wall / CPU seconds and peak RSS."""
    wall, cpu, rss = [], [], []
    for b in bodies[:runs]:
        m = harness.measured([sys.executable, "-m", "trackstar.cli", "trace", b["prompt"], "--target", b["target"],
                              "-k", str(b["k"]), "--json", "--root", str(root)], root, harness.child_env())
        if m.rc != 0:
            raise RuntimeError(f"trackstar trace failed ({m.rc}): {m.stderr[-2000:]}")
        wall.append(m.seconds)
        cpu.append(m.cpu_seconds)
        rss.append(m.peak_rss_mb)
    return {"runs": len(wall), "p50_s": round(statistics.median(wall), 3), "max_s": round(max(wall), 3),
            "cpu_s_median": round(statistics.median(cpu), 3), "peak_rss_mb": round(max(rss), 1)}


def screenshot(base: str, query, path: Path) -> None:
    """The viewer's "trace your own prompt" form filled with `query` and traced live, as a 1400 x 1000 PNG."""
    from tests.browser import Chromium

    with Chromium(width=1400, height=1000) as c:
        c.goto(f"http://{base}/report/index.html")
        if c.eval("TRACKSTAR.ready.then(() => TRACKSTAR.live)") is not True:
            raise RuntimeError("the viewer found no trace API (is report/ built with this version's viewer?)")
        for field, text in (("live-prompt", query.prompt), ("live-target", query.target),
                            ("live-entity", query.entity or "")):
            c.eval(f"document.getElementById('{field}').value = {json.dumps(text)}")
        c.eval("document.getElementById('live-go').click()")
        if c.eval("TRACKSTAR.traced") is not True:
            status = c.eval("document.getElementById('live-status').textContent")
            raise RuntimeError(f"the live trace failed: {status}")
        c.screenshot(path, 1400, 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=harness.ROOT, help="a built pipeline (default: this repo)")
    ap.add_argument("--label", help="the key of these figures in serve.json (default: the root's folder name)")
    ap.add_argument("--requests", type=int, default=100, help="traces per client setting")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--cli-runs", type=int, default=3, help="fresh `trackstar trace` processes")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serve.json")
    ap.add_argument("--screenshot", type=Path, metavar="PNG", help="also save the viewer with a live trace here")
    args = ap.parse_args()
    root = args.root.resolve()
    label = args.label or root.name
    queries = read_queries(root / "data/queries.jsonl")
    bodies = [{"prompt": q.prompt, "target": q.target, "k": args.k, "method": "trackstar"}
              for q in (queries * (args.requests // len(queries) + 1))[:args.requests]]

    t0 = time.perf_counter()
    log = tempfile.TemporaryFile("w+")
    server = subprocess.Popen([sys.executable, "-m", "trackstar.cli", "serve", "--root", str(root), "--port", "0",
                               "--no-browser"], cwd=root, env=harness.child_env(), stdout=subprocess.PIPE,
                              stderr=log, text=True, start_new_session=True)
    try:
        line = server.stdout.readline()
        while line and " at http://" not in line:  # a library's own output before the address
            line = server.stdout.readline()
        if " at http://" not in line:
            log.seek(0)
            raise RuntimeError(f"trackstar serve did not start (exit {server.poll()}): {line!r}\n{log.read()[-3000:]}")
        startup = time.perf_counter() - t0
        base = line.split(" at http://")[1].split("/")[0]
        for b in bodies[:3]:  # warm-up: first-call allocations, page cache
            post(base, b)
        one = latencies(base, bodies, 1)
        print("1 client:", json.dumps(one), flush=True)
        eight = latencies(base, bodies, 8)
        print("8 clients:", json.dumps(eight), flush=True)
        rss = peak_rss_mb(server.pid)
        if args.screenshot:
            screenshot(base, queries[0], args.screenshot)
            print("screenshot:", args.screenshot, flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    cli = cli_baseline(root, bodies, args.cli_runs)
    print("trackstar trace (fresh process):", json.dumps(cli), flush=True)
    figures = {"commit": harness.commit(), "machine": harness.machine(), "passages": sum(count_lines(f) for f in corpus_files(root / "data")), "queries": len(queries),
               "server": {"startup_s": round(startup, 2), "peak_rss_mb": round(rss, 1), "1_client": one,
                          "8_clients": eight},
               "trace_cli": cli, "cli_over_server_p50": round(cli["p50_s"] / one["p50_s"], 1)}
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    kept = {k: v for k, v in old.get("worlds", {}).items() if k != label}
    harness.write_results(args.out, {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                          {"worlds": {**kept, label: figures}})
    print(f"wrote {args.out} ({label})")


if __name__ == "__main__":
    main()
