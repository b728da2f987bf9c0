"""DVC stage `moments`: the estimated second moments (correction.kind: estimated), computed once
per checkpoint and corpus sample, batched on the model's device; encode@* and trace read them.
For any other correction kind it writes a file with no tensors (nothing to estimate)."""

import json

from trackstar.config import load_params
from trackstar.encode.moments import estimate_moments
from trackstar.runner import run_main


def main() -> None:
    print(json.dumps(estimate_moments(load_params())))


if __name__ == "__main__":
    run_main(main)
