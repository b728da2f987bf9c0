"""Every stage lists as DVC dependencies exactly the library modules it imports (transitively), so editing
library code reruns the stages whose behaviour it can change, and no others. The lines are generated
(`python -m tests.dvc_deps`); this test fails when someone edits the code but not dvc.yaml."""

from pathlib import Path

import yaml

from tests.dvc_deps import ROOT, direct_imports, expected, main


def test_stage_code_deps_are_the_import_closure():
    want = expected()
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages, "no stages in dvc.yaml"
    for name, stage in stages.items():
        body = stage.get("do", stage)
        listed = {d for d in body["deps"] if isinstance(d, str) and d.startswith("trackstar/") and d.endswith(".py")}
        assert listed == set(want[name]), (f"stage {name}: missing {sorted(set(want[name]) - listed)}, extra "
                                           f"{sorted(listed - set(want[name]))}; run `python -m tests.dvc_deps`")
        assert body["cmd"].split()[1] in body["deps"], f"stage {name} does not depend on its script"
    assert main(["--check"]) == 0


def test_closure_follows_relative_and_package_imports(tmp_path):
    """A relative import inside a subpackage resolves to the sibling module (the generator's own logic)."""
    got = {str(p.relative_to(ROOT)) for p in direct_imports(ROOT / "trackstar" / "data" / "world.py")}
    assert "trackstar/data/records.py" in got
