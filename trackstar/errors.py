"""Error types whose messages name the file, line and field at fault."""

from __future__ import annotations


class TrackStarError(Exception):
    """Base class: a user-facing error printed without a traceback by the stages and CLI."""


class InputError(TrackStarError):
    """Bad input data (jsonl, checkpoint directory)."""

    def __init__(self, path: str, message: str, line: int | None = None, field: str | None = None):
        where = f"{path}:{line}" if line is not None else str(path)
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")
        self.path, self.line, self.field = path, line, field


class ConfigError(TrackStarError):
    """Bad params.yaml (unknown key, wrong type, out of range)."""


class ArtifactMismatch(TrackStarError):
    """A stored artifact (Zarr store, index, Hessian) was made with a different config or checkpoint."""
