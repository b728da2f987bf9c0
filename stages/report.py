"""DVC stage `report`: the static viewer site (report/index.html + paginated data) from the retrievals and metrics."""

import json
import time

from trackstar import layout
from trackstar.data.records import read_queries
from trackstar.runner import run_main
from trackstar.viewer.report import Evaluated, build_report, method_files, read_predictions


def main() -> None:
    t0 = time.time()
    queries = read_queries(layout.QUERIES)
    metrics = json.loads((layout.METRICS / "metrics.json").read_text(encoding="utf-8"))
    model = json.loads((layout.METRICS / "model.json").read_text(encoding="utf-8"))
    counts = build_report(layout.REPORT, method_files(layout.RETRIEVALS), queries,
                          Evaluated(read_predictions(layout.PREDICTIONS), metrics, model.get("tail_patch") or {}))
    print(json.dumps({**counts, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    run_main(main)
