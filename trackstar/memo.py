"""An on-disk memo for a stage's expensive intermediates (tail-patch results per (query, passage)
pair), keyed by a hash of everything they depend on.

It lives outside the stage's DVC outputs (in `.work/`), so editing a parameter that acts only
downstream of an intermediate does not recompute it. Entries are written
atomically; an unreadable entry is a miss; only the newest `keep` entries per
name are kept, which bounds the disk it takes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from trackstar.atomic import atomic_write_text


def memo_key(**parts) -> str:
    """A stable hash of JSON-able parts (configs, file hashes, parameter values)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def code_hash(*modules) -> str:
    """sha256 of the source files of the given modules: a memo entry is stale once the code changes."""
    h = hashlib.sha256()
    for m in modules:
        h.update(Path(m.__file__).read_bytes())
    return h.hexdigest()[:16]


class Memo:
    """JSON values per (name, key) under `root`."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def _path(self, name: str, key: str, ext: str) -> Path:
        return self.root / f"{name}-{key}.{ext}"

    def load_json(self, name: str, key: str):
        path = self._path(name, key, "json")
        try:
            return json.loads(path.read_text())
        except Exception:
            return None

    def save_json(self, name: str, key: str, value) -> None:
        path = self._path(name, key, "json")
        self._prune(name, reserve=1)
        atomic_write_text(path, json.dumps(value))

    def _prune(self, name: str, reserve: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        entries = sorted(self.root.glob(f"{name}-*"),
                         key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
        for p in entries[max(0, self.keep - reserve):]:
            p.unlink(missing_ok=True)
