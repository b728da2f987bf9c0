"""DVC stage `precondition@{train,query}`: G = W_mix g (W^T W = R_mix^(-1); basis from `eigen`, update from
`hessian`), unit-normalized, into the final store (`trackstar.hessian.precondition`)."""

import json
import sys

from trackstar.config import load_params
from trackstar.hessian.precondition import precondition
from trackstar.runner import run_main


def main() -> None:
    raw = precondition(sys.argv[1], load_params().data.shards)
    print(json.dumps({"rows": raw.n, "d": raw.d}))


if __name__ == "__main__":
    run_main(main)
