"""The only files `trackstar view` and `trackstar serve` hand out: the report site (report/) and the
retrieval files (retrievals/**/*.jsonl) the viewer opens with ?jsonl_path=. Never the repository.

A URL path is mapped to a file only when every segment is a plain name (no empty, `.`/`..` or dot-led
segment, so no dotfiles, `.git` or `.dvc`; no backslash, colon or NUL), the file's real path (symlinks
resolved) lies inside the real path of its folder, and it is a regular file of an allowed kind. Anything
else is answered 404, the same as a missing file, so a probe learns nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trackstar import layout

REPORT_SUFFIXES = (".html", ".js", ".css", ".png", ".svg", ".json")
RETRIEVAL_SUFFIXES = (".jsonl",)


@dataclass(frozen=True)
class Shelf:
    """One served folder: URL prefix, the folder, and the file suffixes it may hand out."""

    prefix: str  # "report" -> /report/...
    folder: Path
    suffixes: tuple[str, ...]


def shelves(root: str | Path) -> list[Shelf]:
    """The report site and the retrieval files of the pipeline at `root`."""
    root = Path(root)
    return [Shelf(layout.REPORT.as_posix(), layout.at(layout.REPORT, root), REPORT_SUFFIXES),
            Shelf(layout.RETRIEVALS.as_posix(), layout.at(layout.RETRIEVALS, root), RETRIEVAL_SUFFIXES)]


def safe_segments(path: str) -> list[str] | None:
    """The segments of a decoded URL path below a shelf, or None when any could step outside or hide."""
    parts = path.split("/")
    for p in parts:
        if not p or p.startswith(".") or any(c in p for c in "\\:\x00"):
            return None
    return parts


def resolve(shelf: Shelf, path: str) -> Path | None:
    """The file a URL path names on a shelf, or None (missing, hidden, outside, not a regular file, other kind)."""
    parts = safe_segments(path)
    if parts is None or not parts[-1].endswith(shelf.suffixes):
        return None
    try:
        base = shelf.folder.resolve(strict=True)
        target = base.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return None
    if not target.is_relative_to(base) or not target.is_file():
        return None
    return target
