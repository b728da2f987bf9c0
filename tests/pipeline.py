"""Helpers for end-to-end tests: a throwaway git+DVC copy of this repo with tiny params (on tests/harness.py)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests import harness
from tests.harness import ROOT, child_env, git, set_param  # noqa: F401 (the tests import them from here)

TINY = {
    "data": {"entities": 12, "relations": 2, "paraphrases": 2, "distractors_per_entity": 1, "contradicted": 0.0,
             "digests": 0.0, "query_wording": "held_out"},
    "model": {"hidden_size": 32, "layers": 2, "heads": 2, "intermediate_size": 64, "vocab_size": 300},
    "train": {"epochs": 2},
    "projection": {"k": 4},
    "hessian": {"mix_k": 5},
    "retrieve": {"k": 10},
    "bm25": {"k": 10},
    "eval": {"tail_patch_queries": 4},
}


def make_repo(dest: Path, overrides: dict | None = None) -> Path:
    """Copy the project's files into dest, apply tiny params (+ overrides), git init and commit."""
    return harness.make_repo(dest, {**TINY, **(overrides or {})})


# A command that runs longer than this is killed with its whole process group (stage scripts
# included) and the test fails with its output, instead of hanging CI until its time limit.
TIMEOUT_S = float(os.environ.get("TRACKSTAR_TEST_TIMEOUT", 900))


def run(repo: Path, *cmd: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run cmd in repo (this venv's bin first on PATH; env defaults to os.environ), stdin closed."""
    env = child_env(base=env)
    with subprocess.Popen(list(cmd), cwd=repo, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise AssertionError(f"{' '.join(cmd)} still running after {TIMEOUT_S:.0f} s, killed:\n"
                                 f"{out[-3000:]}\n{err[-3000:]}") from None
    proc = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(repo, sys.executable, "-m", "dvc", *args, check=check)


def repro(repo: Path, *args: str) -> list[str]:
    """Run `dvc repro` and return the stages it actually ran, in order."""
    out = dvc(repo, "repro", *args).stdout
    return re.findall(r"Running stage '([^']+)'", out)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (the OS picks it), so parallel or repeated runs do not collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
