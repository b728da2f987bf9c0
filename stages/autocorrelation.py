"""DVC stage `autocorrelation`: the diagonal blocks of R_train and R_eval, the Gauss-Newton Hessian statistics
(docs/method.md, step 4), in the structure the memory plan picks from hessian.structure / hessian.memory_gb (refused
before any work if none fits). Under torchrun (one node or many) each rank sums its own chunks and an all-reduce adds them up (nccl through
each rank's GPU when CUDA is present, else gloo).
With corpus shards, each shard's rows enter through its partial sums (`autocorrelation_shard@<name>`, computed
once per shard: `python stages/autocorrelation.py shard NAME`; `... shards` makes every missing one)."""

import json
import sys

from trackstar import layout
from trackstar.config import load_params
from trackstar.distributed import Ranks
from trackstar.hessian.gather import gather_stats, missing_partials, shard_partial
from trackstar.hessian.stats import save_stats
from trackstar.runner import run_main


def main() -> None:
    params = load_params()
    if sys.argv[1:2] == ["shard"]:
        print(json.dumps(shard_partial(sys.argv[2], params)))
        return
    if sys.argv[1:2] == ["shards"]:  # every listed shard without its partial, in one process (then `dvc commit`)
        for name in missing_partials(params):
            print(json.dumps(shard_partial(name, params)))
        return
    stats = gather_stats(params, Ranks.from_env("auto"))  # the sums travel through this rank's GPU when present
    if stats is not None:
        save_stats(layout.STATS, stats.r_train, stats.r_eval, stats.meta)
        print(json.dumps(stats.summary()))


if __name__ == "__main__":
    run_main(main)
