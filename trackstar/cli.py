"""`trackstar trace PROMPT --target TEXT`: top proponents/opponents for any prompt, from the
pipeline's artifacts, encoded exactly as encode@query + precondition@query would (`--html` writes
the viewer's panel for it). `trackstar view`: serve or open the report the `report` stage built.
`trackstar serve`: the report plus a live trace API, with everything loaded once (docs/serve.md).
`trackstar plan`: d, the Hessian structure and the memory each stage needs, before any long stage runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trackstar.methods import RUNGS
from trackstar.runner import run_main


def _trace(args: argparse.Namespace) -> None:
    from trackstar.serve.tracer import TraceRequest, Tracer

    tracer = Tracer(args.root, methods=[args.method])
    r = tracer.trace(TraceRequest(args.prompt, args.target, args.k, args.method)).record
    top = list(zip(r["proponent_ids"], r["proponent_scores"], r["proponents"]))
    bottom = list(zip(r["opponent_ids"], r["opponent_scores"], r["opponents"]))
    if args.html:
        from trackstar.data.records import Query
        from trackstar.retrieval.results import Hits, make_result
        from trackstar.viewer.report import write_single_page
        texts = {i: t for i, _, t in top + bottom}
        record = make_result(Query("trace", args.prompt, args.target), Hits([i for i, _, _ in top], [s for _, s, _ in top]),
                             texts, Hits([i for i, _, _ in bottom], [s for _, s, _ in bottom]))
        write_single_page(args.html, record, args.method, args.entity)
        print(f"wrote {args.html}")
    if args.json:
        print(json.dumps({k: r[k] for k in ("inputs_plaintext", "targets_plaintext", "method", "proponent_ids",
                                            "proponent_scores", "proponents", "opponent_ids", "opponent_scores",
                                            "opponents")}, ensure_ascii=False))
        return
    print(f"{args.method} proponents for {args.prompt!r} -> {args.target!r}:")
    for rank, (i, s, t) in enumerate(top, 1):
        print(f"{rank:3d}. {s:+.4f}  [{i}] {t}")
    if bottom:
        print("opponents:")
        for rank, (i, s, t) in enumerate(bottom, 1):
            print(f"{rank:3d}. {s:+.4f}  [{i}] {t}")


def _report_page(root: Path) -> Path:
    """report/index.html of the pipeline at `root`, or an error saying how to build it."""
    from trackstar import layout
    from trackstar.errors import TrackStarError

    page = layout.at(layout.REPORT, root) / "index.html"
    if not page.exists():
        raise TrackStarError(f"{page} does not exist: build it with `dvc repro report`")
    return page


def _view(args: argparse.Namespace) -> None:
    import webbrowser

    from trackstar.serve.app import Access, create_app, hosts_for, run_server

    root = Path(args.root).resolve()
    page = _report_page(root)
    if args.file:
        print(page.as_uri())
        if not args.no_browser:
            webbrowser.open(page.as_uri())
        return
    # only report/ and the retrieval files (?jsonl_path=../retrievals/bm25.jsonl): never the repository
    app = create_app(root, access=Access(hosts=hosts_for(args.host)))
    run_server(app, args.host, args.port, not args.no_browser, f"{root / 'report'}")


def _serve(args: argparse.Namespace) -> None:
    import os

    from trackstar.serve.app import access_for, create_app, run_server
    from trackstar.serve.tracer import Tracer

    root = Path(args.root).resolve()
    _report_page(root)
    access = access_for(args.host, args.token or os.environ.get("TRACKSTAR_TOKEN"))
    print(f"loading the tracer from {root} ...", file=sys.stderr, flush=True)
    tracer = Tracer(root)
    app = create_app(root, tracer, access)
    run_server(app, args.host, args.port, not args.no_browser, f"{root / 'report'} and the trace API "
               f"({', '.join(tracer.methods)})")


def _plan(args: argparse.Namespace) -> None:
    """Print the memory plan for the current params.yaml, model and data (exit 2 if no structure fits)."""
    from trackstar.config import load_params
    from trackstar.data.records import corpus_files, count_lines
    from trackstar.errors import TrackStarError
    from trackstar.hessian.plan import plan

    root = Path(args.root)
    params = load_params(root / "params.yaml")
    model = root / "model"
    if not model.is_dir() and params.model.source == "checkpoint":
        model = root / params.model.checkpoint
    corpus, queries = root / "data/corpus.jsonl", root / "data/queries.jsonl"
    if not model.is_dir() or not corpus.exists() or not queries.exists():
        raise TrackStarError(f"{root}: the plan needs the model and the data: run `dvc repro train` first")
    from trackstar.model.checkpoint import load_checkpoint
    from trackstar.encode.layers import find_layers, layout

    g = params.gradients
    layers = find_layers(load_checkpoint(model)[0], g.include, g.exclude, g.include_lm_head)
    p = plan(layout(layers, params.projection.k_for(len(layers))),
             sum(count_lines(f) for f in corpus_files(root / "data")), count_lines(queries),
             params.hessian, params.encode)
    print(p.text())
    p.require(str(root / "params.yaml"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="trackstar", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trace", help="top proponents and opponents for a prompt and target")
    t.add_argument("prompt")
    t.add_argument("--target", required=True, help="the continuation whose loss is traced (include its leading space)")
    t.add_argument("-k", type=int, default=10)
    t.add_argument("--method", choices=["trackstar", "bm25", *RUNGS], default="trackstar",
                   help="TrackStar, BM25 or a ladder rung of retrieve.methods")
    t.add_argument("--json", action="store_true", help="one JSON object in the TDA-viewer field names")
    t.add_argument("--root", default=".", help="the pipeline repository (default: current directory)")
    t.add_argument("--html", metavar="PATH", help="also write the viewer's panel for this query as one HTML file")
    t.add_argument("--entity", help="the query's entity, highlighted in the --html panel")
    v = sub.add_parser("view", help="serve report/ (built by the report stage) and the retrieval files, and open it")
    v.add_argument("--root", default=".", help="the pipeline repository (default: current directory)")
    v.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--file", action="store_true", help="open report/index.html from the file system instead of serving it")
    v.add_argument("--no-browser", action="store_true", help="only print the address")
    s = sub.add_parser("serve", help="the report site plus a live trace API (the viewer's \"trace your own prompt\")")
    s.add_argument("--root", default=".", help="the pipeline repository (default: current directory)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--host", default="127.0.0.1", help="anything but loopback needs --token")
    s.add_argument("--token", help="required on every API request (Authorization: Bearer ...); default: $TRACKSTAR_TOKEN")
    s.add_argument("--no-browser", action="store_true", help="only print the address")
    pl = sub.add_parser("plan", help="d, the Hessian structure and the memory each stage needs")
    pl.add_argument("--root", default=".", help="the pipeline repository (default: current directory)")
    args = ap.parse_args(argv)
    run_main(lambda: {"trace": _trace, "view": _view, "serve": _serve, "plan": _plan}[args.cmd](args))


if __name__ == "__main__":
    main(sys.argv[1:])
