"""Content hashes recorded in artifact attrs, so consumers can refuse mismatched artifacts."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """sha256 of a file, read in blocks (never whole into memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def config_hash(config: dict) -> str:
    """Short stable hash of a JSON-able config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process when TRACKSTAR_KILL_AT names this point (crash-resume tests)."""
    if os.environ.get("TRACKSTAR_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
