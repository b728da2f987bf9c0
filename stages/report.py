"""DVC stage `report`: the static viewer site (report/index.html + paginated data) from the retrievals and metrics."""

import json
import time

from trackstar.data.records import read_queries
from trackstar.viewer.report import build_report, method_files, read_predictions
from trackstar.runner import run_main


def main() -> None:
    t0 = time.time()
    queries = read_queries("data/queries.jsonl")
    metrics = json.loads(open("metrics/metrics.json", encoding="utf-8").read())
    counts = build_report("report", method_files("retrievals"), queries, read_predictions("eval/predictions.jsonl"),
                          metrics)
    print(json.dumps({**counts, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    run_main(main)
