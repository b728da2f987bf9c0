#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): the encoder on CUDA in fp32 and bf16 against the CPU (TrackStar scores
# and MRR), its tokens/s against a training step, exact search on the GPU against FAISS's CPU flat index; writes
# benchmarks/results/gpu.json with the commit. Stopped after 5 minutes (the budget on one H100).
# usage: benchmarks/gpu_check.sh [--device cuda|cpu] [--world default|tiny] [--repo PATH] [--passages N] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout --kill-after 10 300 python benchmarks/gpu_check.py "$@"
