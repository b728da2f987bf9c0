"""The viewer's size and load time: the paginated report site against loading whole result files.

Corpora: `default`, the default pipeline's report/ and retrievals/ in the repo root (after `dvc repro`), and
`synthetic`, a generated world of ~100k passages (--entities) with --queries queries and six methods of --k random
hits each (a relevant one at a random rank in half of the queries), built by the `report` stage's function. Each
in headless Chromium, cache off, served by `trackstar view` on localhost, median of --repeats loads: the report (first panel
drawn, then a query on another data page) against the same page reading the TrackStar and BM25 result files whole
(`?jsonl_path=...&sxs_jsonl_path=...`, as the paper's viewer does); and their bytes. Writes results/viewer.json.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trackstar.data.world import FactWorldConfig, generate_fact_world
from trackstar.viewer.report import build_report, method_files
from trackstar.retrieval.results import Hits, make_result, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.*
from tests import harness  # noqa: E402
from tests.browser import Chromium  # noqa: E402

ROOT = harness.ROOT
HERE = ROOT / "benchmarks"
METHODS = ["trackstar", "bm25", "dot", "cosine", "optimizer", "r_train"]


class View:
    """`trackstar view --root root` on a free localhost port (what a user runs), as a child process."""

    def __init__(self, root: Path):
        exe = Path(sys.executable).parent / "trackstar"
        self.proc = subprocess.Popen([str(exe), "view", "--root", str(root), "--port", "0", "--no-browser"],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        found = re.search(r"(http://[^/\s]+)/report/index.html", line)
        if not found:
            self.shutdown()
            raise RuntimeError(f"trackstar view --root {root} printed no address: {line!r}")
        self.base = found.group(1)

    def shutdown(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def serve(root: Path) -> tuple[View, str]:
    """`trackstar view` of root, and its base address."""
    view = View(root)
    return view, view.base


def synthetic(root: Path, entities: int, n_queries: int, k: int, seed: int = 0) -> dict[str, int]:
    """A ~100k-passage world and six methods' result files (and queries) under root/retrievals."""
    passages, queries, _ = generate_fact_world(FactWorldConfig(seed=seed, entities=entities, contradicted=0.0))
    rng = random.Random(seed)
    queries = rng.sample(queries, min(n_queries, len(queries)))
    text = {p.id: p.text for p in passages}
    ids = list(text)
    corpus = root / "data" / "corpus.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    with open(corpus, "w", encoding="utf-8") as f:
        for p in passages:
            f.write(json.dumps({"id": p.id, "text": p.text}) + "\n")
    for m in METHODS:
        res = []
        for q in queries:
            top = rng.sample(ids, k)
            if rng.random() < 0.5:
                top[rng.randrange(k)] = rng.choice(q.relevant_ids)
            top = list(dict.fromkeys(top))
            scores = sorted((rng.random() for _ in top), reverse=True)
            bottom = [] if m == "bm25" else rng.sample(ids, k)
            res.append(make_result(q, Hits(top, scores), text, Hits(bottom, sorted(-rng.random() for _ in bottom)),
                                   query_set=m))
        path = root / "retrievals" / ("ladder/" if m not in ("trackstar", "bm25") else "") / f"{m}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_results(path, res)
    t0 = time.perf_counter()
    build_report(root / "report", method_files(root / "retrievals"), queries)
    return {"passages": len(passages), "queries": len(queries), "build_s": round(time.perf_counter() - t0, 2)}


def sizes(root: Path) -> dict[str, int]:
    """Bytes of the report, of what its landing page loads, of the result files and the corpus."""
    rep = root / "report"
    files = [p for p in rep.rglob("*") if p.is_file()]
    pages = sorted((rep / "data").glob("page-*.js"))
    landing = ["index.html", "viewer.js", "viewer.css", "data/index.js"]
    return {"report_bytes": sum(p.stat().st_size for p in files), "report_files": len(files),
            "data_pages": len(pages), "largest_page_bytes": max(p.stat().st_size for p in pages),
            "landing_bytes": sum((rep / f).stat().st_size for f in landing) + pages[0].stat().st_size,
            "result_files_bytes": sum(p.stat().st_size for p in method_files(root / "retrievals").values()),
            "two_result_files_bytes": sum((root / "retrievals" / f).stat().st_size
                                          for f in ("trackstar.jsonl", "bm25.jsonl")),
            "corpus_bytes": (root / "data" / "corpus.jsonl").stat().st_size}


def time_loads(c: Chromium, url: str, repeats: int, switch_to: str | None = None) -> dict[str, float]:
    """Median ms from navigation start to the first panel drawn (and to a switch to another query)."""
    first, switch = [], []
    for _ in range(repeats):
        c.goto("about:blank")
        c.goto(url)
        first.append(c.eval("TRACKSTAR.ready.then(() => TRACKSTAR.readyAt)"))
        if switch_to:
            switch.append(c.eval(f"(async () => {{ const t = performance.now(); await TRACKSTAR.api.show({json.dumps(switch_to)});"
                                 " return performance.now() - t; })()"))
    if c.errors:
        raise RuntimeError(f"console errors on {url}: {c.errors[:3]}")
    out = {"first_panel_ms": round(statistics.median(first), 1)}
    if switch:
        out["switch_page_ms"] = round(statistics.median(switch), 1)
    return out


def measure(root: Path, repeats: int) -> dict[str, object]:
    """Sizes, and load times of the report (file:// and http) and of the two whole result files (http)."""
    ix = (root / "report" / "data" / "index.js").read_text()
    index = json.loads(ix[ix.index("{"): ix.rstrip().rindex(")")])
    last = index["queries"][-1][0]
    out: dict[str, object] = sizes(root)
    httpd, base = serve(root)
    try:
        with Chromium(timeout=300) as c:
            c.send("Network.enable")
            c.send("Network.setCacheDisabled", cacheDisabled=True)
            out["report_http"] = time_loads(c, f"{base}/report/index.html", repeats, last)
            out["report_file"] = time_loads(c, (root / "report" / "index.html").as_uri(), repeats, last)
            out["whole_files_http"] = time_loads(
                c, f"{base}/report/index.html?jsonl_path=../retrievals/trackstar.jsonl"
                   f"&sxs_jsonl_path=../retrievals/bm25.jsonl", repeats)
    finally:
        httpd.shutdown()
    out["speedup_first_panel"] = round(out["whole_files_http"]["first_panel_ms"] / out["report_http"]["first_panel_ms"], 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entities", type=int, default=6250, help="fact-world entities (6250 -> 100k passages)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=100, help="hits per method and query in the synthetic result files")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=["default", "synthetic"],
                    help="measure one corpus and keep the other's figures in the JSON")
    ap.add_argument("--screenshot", metavar="PNG", help="also save the default report's landing page (1400 x 1000) here")
    args = ap.parse_args()
    out = HERE / "results" / "viewer.json"
    old = json.loads(out.read_text()) if args.only and out.exists() else {}
    results = {k: v for k, v in old.items() if k not in ("commit", "params", "machine")}
    results["repeats"] = args.repeats
    if args.only != "synthetic":
        if not (ROOT / "report" / "index.html").exists():
            raise SystemExit("no report/index.html in the repo root: run `dvc repro` first (or --only synthetic)")
        results["default"] = {"queries": len(json.loads((ROOT / "report/data/index.js").read_text()
                                                     .split("(", 1)[1].rsplit(")", 1)[0])["queries"]),
                              **measure(ROOT, args.repeats)}
        print("default:", json.dumps(results["default"]))
        if args.screenshot:
            with Chromium(width=1400, height=1000) as c:
                c.goto((ROOT / "report" / "index.html").resolve().as_uri())
                c.eval("TRACKSTAR.ready.then(() => true)")
                c.screenshot(args.screenshot, 1400, 1000)
            print("screenshot:", args.screenshot)
    if args.only != "default":
        tmp = Path(tempfile.mkdtemp(prefix="viewer-bench-"))
        try:
            info = synthetic(tmp, args.entities, args.queries, args.k)
            results["synthetic"] = {**info, "k": args.k, **measure(tmp, args.repeats)}
            print("synthetic:", json.dumps(results["synthetic"]))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    harness.write_results(out, vars(args), results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
