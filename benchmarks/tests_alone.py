"""Every test passes when run alone: each collected test id in its own `python -m pytest <id>` process.

Not part of CI (one process per test repeats every module fixture: hours on 2 cores). The non-first tests of
modules with module- or session-scoped fixtures run first (the likeliest to depend on an earlier test). Writes
results/tests_alone.json after every test; --resume skips the ids that already passed there.

    nice -n 10 python benchmarks/tests_alone.py [--resume] [-k SUBSTRING] [--timeout 1800]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from tests.harness import write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def collect(pattern: str | None) -> list[str]:
    """Test ids in collection order (`pytest --collect-only -q`)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"collection failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    ids = [line.strip() for line in proc.stdout.splitlines() if "::" in line]
    return [i for i in ids if pattern is None or pattern in i]


def shares_state(module: str) -> bool:
    """Whether the module has a module- or session-scoped fixture (state that one test can leave to the next)."""
    text = (REPO / module).read_text()
    return 'scope="module"' in text or "built_repo" in text or "copy_built" in text


def ordered(ids: list[str]) -> list[str]:
    """Non-first tests of modules that share fixtures first, then the other non-first tests, then the first test
    of each module (it already runs alone whenever its module runs alone: the least likely to fail)."""
    seen: set[str] = set()
    first, shared, rest = [], [], []
    for i in ids:
        module = i.split("::")[0]
        (first if module not in seen else shared if shares_state(module) else rest).append(i)
        seen.add(module)
    return shared + rest + first


def run_one(test_id: str, timeout: float) -> dict:
    """One test in a fresh interpreter: outcome, seconds, and the output's tail when it did not pass."""
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_id], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = None, f"timed out after {timeout:.0f} s\n{(e.stdout or b'')[-3000:]!r}"
    s = time.perf_counter() - t
    outcome = "passed" if rc == 0 else "timeout" if rc is None else "skipped" if rc == 5 else "failed"
    if rc == 0 and " skipped" in out and " passed" not in out:
        outcome = "skipped"
    rec = {"outcome": outcome, "seconds": round(s, 1), "returncode": rc}
    if outcome not in ("passed",):
        rec["output_tail"] = out[-4000:]
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "results/tests_alone.json"))
    ap.add_argument("--resume", action="store_true", help="skip ids that already passed in --out")
    ap.add_argument("-k", dest="pattern", help="only ids containing this substring")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per test")
    args = ap.parse_args()
    out = Path(args.out)
    old = json.loads(out.read_text()).get("tests", {}) if args.resume and out.exists() else {}
    ids = ordered(collect(args.pattern))
    res = {"command": "python benchmarks/tests_alone.py", "collected": len(ids), "tests": dict(old)}
    for n, test_id in enumerate(ids, 1):
        if old.get(test_id, {}).get("outcome") == "passed":
            continue
        rec = run_one(test_id, args.timeout)
        res["tests"][test_id] = rec
        done = res["tests"].values()
        res["summary"] = {o: sum(r["outcome"] == o for r in done) for o in ("passed", "failed", "timeout", "skipped")}
        res["summary"]["run"] = len(res["tests"])
        res["summary"]["seconds"] = round(sum(r["seconds"] for r in done), 1)
        res["not_passed"] = sorted(k for k, r in res["tests"].items() if r["outcome"] not in ("passed", "skipped"))
        write_results(out, vars(args), res)
        print(f"[{n}/{len(ids)}] {rec['outcome']:7s} {rec['seconds']:7.1f} s  {test_id}", flush=True)
    print(json.dumps(res.get("summary", {})), json.dumps(res.get("not_passed", [])))


if __name__ == "__main__":
    main()
