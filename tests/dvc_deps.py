"""dvc.yaml's library dependencies, generated: each stage depends on exactly the library modules its script
imports, transitively, so editing library code reruns the stages whose behaviour it can change, and no others.

    python -m tests.dvc_deps          # rewrite the generated lines of dvc.yaml in place
    python -m tests.dvc_deps --check  # exit 1 when dvc.yaml's lines differ from the import closure

Only the `trackstar/...py` lines of each stage's `deps:` are generated; every other line of dvc.yaml
(comments, data deps, params, outs) is left as written.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "trackstar"


def _module_file(dotted: str) -> Path | None:
    """trackstar.a.b -> trackstar/a/b.py (or its package's __init__.py), None when it is not library code."""
    rel = Path(*dotted.split("."))
    for cand in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
        if cand.exists():
            return cand
    return None


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1]) if parts[-1] != "__init__" else ".".join(parts[:-1])


def direct_imports(path: Path) -> set[Path]:
    """Library files a Python file imports (absolute `trackstar.x.y` or relative), with the packages on the way."""
    out: set[Path] = set()
    pkg = _package_of(path) if path.is_relative_to(PKG) else ""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        mods: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base_mod = ".".join(base + ([node.module] if node.module else []))
            else:
                base_mod = node.module or ""
            mods = [base_mod] + [f"{base_mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        for m in mods:
            if m.split(".")[0] != "trackstar":
                continue
            parts = m.split(".")
            for i in range(2, len(parts) + 1):  # the module and every package between it and trackstar/
                f = _module_file(".".join(parts[:i]))
                if f is not None:
                    out.add(f)
    return out


def module_closure(script: Path) -> set[str]:
    """The library files `script` imports, transitively, as repo-relative paths."""
    seen: set[Path] = set()
    todo = list(direct_imports(script))
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += direct_imports(f)
    return {str(f.relative_to(ROOT)) for f in seen if f.stat().st_size > 0}  # empty __init__.py files change nothing


def _stage_script(body: dict) -> Path:
    return ROOT / body["cmd"].split()[1]


def expected(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, list[str]]:
    """stage name -> the sorted library files its script imports."""
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    return {name: sorted(module_closure(_stage_script(s.get("do", s)))) for name, s in stages.items()}


_LIB_LINE = re.compile(r"^(\s*)- trackstar/\S+\.py\s*(#.*)?$")


def regenerate(text: str, want: dict[str, list[str]]) -> str:
    """dvc.yaml text with each stage's `- trackstar/...py` dep lines replaced by its import closure, placed
    right after the stage's script line."""
    out, stage = [], None
    for line in text.splitlines():
        m = re.match(r"^  ([A-Za-z_][\w-]*):\s*$", line)
        if m:
            stage = m.group(1)
        if _LIB_LINE.match(line):
            continue
        out.append(line)
        s = re.match(r"^(\s*)- stages/\S+\.py\s*$", line)
        if s and stage in want:
            out += [f"{s.group(1)}- {f}" for f in want[stage]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="fail when dvc.yaml differs from the import closure")
    args = ap.parse_args(argv)
    path = ROOT / "dvc.yaml"
    text = path.read_text(encoding="utf-8")
    new = regenerate(text, expected(path))
    if args.check:
        if new != text:
            print("dvc.yaml's library deps differ from the import closure: run `python -m tests.dvc_deps`",
                  file=sys.stderr)
            return 1
        return 0
    if new != text:
        path.write_text(new, encoding="utf-8")
        print("dvc.yaml: library deps regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
