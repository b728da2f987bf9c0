"""DVC stage `data`: the generated fact world, or the user's corpus/queries validated and copied: the corpus
to data/corpus.jsonl, each shard of `data.shards` to data/shards/<name>.jsonl (jsonl, parquet, arrow or a
`datasets` directory in; jsonl out), passage ids unique across all of them."""

import json

from trackstar.config import load_params
from trackstar.data.prepare import prepare_data
from trackstar.runner import run_main


def main() -> None:
    print(json.dumps(prepare_data(load_params().data)))


if __name__ == "__main__":
    run_main(main)
