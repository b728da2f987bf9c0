"""The repository stays lean and self-contained: no tracked file over 1 MB (binaries and generated bulk
belong in DVC, not git) unless listed here on purpose, a README a user can read, and no pointer to
documents that are not in the repository."""

from __future__ import annotations

import subprocess

import pytest

from tests.pipeline import ROOT

MAX_BYTES = 1 << 20
# path -> why it is tracked although larger than MAX_BYTES (none today)
ALLOWED_LARGE: dict[str, str] = {}


def tracked() -> list[str]:
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in proc.stdout.decode().split("\0") if f and (ROOT / f).is_file()]


def test_no_tracked_file_over_1_mb():
    big = {f: (ROOT / f).stat().st_size for f in tracked() if (ROOT / f).stat().st_size > MAX_BYTES}
    unexpected = {f: n for f, n in big.items() if f not in ALLOWED_LARGE}
    assert not unexpected, f"tracked files over 1 MB (put them in DVC or list them in ALLOWED_LARGE): {unexpected}"


def test_readme_is_a_page_not_a_book():
    assert (ROOT / "README.md").stat().st_size < 15_000, "README.md over 15 KB: move details into docs/"


def test_no_reference_to_files_outside_the_repository():
    """Docs and code stand alone: nothing points at the maintainers' working notes (their file name is
    stored hex-encoded, so this test does not point at them itself) or at the folder beside the checkout."""
    outside = [bytes.fromhex("44455349474e2e6d64").decode(), "../" + "shared"]
    hits = [(f, s) for f in tracked() if f.endswith((".py", ".md", ".yaml", ".toml", ".txt", ".cfg"))
            for s in outside if s in (ROOT / f).read_text(encoding="utf-8", errors="replace")]
    assert not hits, f"these files point outside the repository: {hits}"
