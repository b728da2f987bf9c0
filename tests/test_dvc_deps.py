"""Every stage lists as DVC dependencies exactly the library modules it imports (transitively), so
editing library code reruns the stages whose behaviour it can change, and no others."""

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _direct_imports(path: Path) -> set[str]:
    """trackstar modules imported by a file (absolute `trackstar.x` or relative `.x`)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.split(".")[0] == "trackstar":
                parts = node.module.split(".")
                out |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
            elif node.level == 1:
                out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("trackstar.")}
    return {m for m in out if (ROOT / "trackstar" / f"{m}.py").exists()}


def module_closure(script: Path) -> set[str]:
    seen, todo = set(), list(_direct_imports(script))
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += _direct_imports(ROOT / "trackstar" / f"{m}.py")
    return {f"trackstar/{m}.py" for m in seen}


def test_stage_code_deps_are_the_import_closure():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages, "no stages in dvc.yaml"
    for name, stage in stages.items():
        body = stage.get("do", stage)
        script = ROOT / body["cmd"].split()[1]
        # modules only: the report stage also lists its page assets (trackstar/viewer/)
        listed = {d for d in body["deps"] if isinstance(d, str) and d.startswith("trackstar/") and d.endswith(".py")}
        want = module_closure(script)
        assert listed == want, f"stage {name}: missing {sorted(want - listed)}, extra {sorted(listed - want)}"
        assert str(script.relative_to(ROOT)) in body["deps"], f"stage {name} does not depend on its script"
