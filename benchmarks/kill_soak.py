"""Randomized kill soak: SIGKILL `dvc repro` (its whole process group) at random moments while it
builds `encode@*`, `autocorrelation`, `precondition@*` or `index`, then `dvc repro` to completion,
and check the artifacts against an uninterrupted build byte for byte.

Not part of the test suite (it takes tens of minutes). On the tiny params of tests/pipeline.py (plus
`encode.chunk_mb` small enough that the training store spans several chunks, so kills land between
and inside chunk writes):

1. the soak repo runs `dvc repro` uninterrupted; its artifacts and dvc.lock are the expectation
   (kept as a pristine copy to restart from after a failure);
2. each round picks a stage S and makes S a fresh build: S's outputs, its dvc.lock entry, its objects in `.dvc/cache` and the run-cache are
   removed, as before S's first run. `dvc repro` then runs S's command and commits its outputs;
3. the round kills that `dvc repro` with SIGKILL to its process group at one of three kinds of moment:
   `command` (uniform over the stage script's run), `commit` (after the script exited, while DVC
   hashes, caches and links the outputs and writes dvc.lock) or `any` (uniform from the launch);
   what was running at the kill is recorded from the process tree (a kill that lands after DVC
   exited is a miss and is not counted);
4. plain `dvc repro` runs to completion; then every artifact file must equal the reference's bytes
   (the wall-clock fields of metrics/hessian.json and metrics/model.json aside: a stage that DVC
   reruns writes new timings), dvc.lock must equal the reference's (as YAML: DVC may order its
   entries differently; those two files' hashes masked), `dvc status` must be clean (every 6th round
   and at the end) and every output in dvc.lock must be in the DVC cache with the right bytes (what
   `dvc push` would send). The stages the rerun ran are recorded.

A truncated `.dvc/tmp/rwlock` (DVC rewrites it in place) is recovered as docs/pipeline.md says and
counted as a failure with its recovery; any other failure is counted, its repo kept for a
post-mortem (WORK-failed-N) and the soak goes on from the uninterrupted build.

    nice -n 10 python benchmarks/kill_soak.py --kills 56     # writes benchmarks/results/kill_soak.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.pipeline import dvc, make_repo  # noqa: E402

STAGES = {  # stage -> (its script's argv tail, its outputs)
    "encode@train": ("stages/encode.py train", ["encodings/raw/train.zarr"]),
    "encode@query": ("stages/encode.py query", ["encodings/raw/query.zarr"]),
    "autocorrelation": ("stages/autocorrelation.py", ["hessian/stats.safetensors"]),
    "precondition@train": ("stages/precondition.py train", ["encodings/final/train.zarr"]),
    "precondition@query": ("stages/precondition.py query", ["encodings/final/query.zarr"]),
    "index": ("stages/index.py", ["index"]),
}
ARTIFACTS = ["model", "encodings", "hessian", "index", "retrievals", "metrics", "data"]
OVERRIDES = {"encode": {"chunk_mb": 0.015}}  # 5 chunks of training rows (as tests/test_resume.py)


# wall-clock fields of git-tracked metrics: a stage that reruns writes new values (everything else must match)
TIMING = {"metrics/hessian.json": "seconds", "metrics/model.json": "eval_seconds"}


def _content(repo: Path, rel: str) -> bytes:
    """A file's bytes; for the metrics in TIMING, the JSON without its wall-clock field."""
    data = (repo / rel).read_bytes()
    if rel in TIMING:
        obj = json.loads(data)
        obj.pop(TIMING[rel], None)
        data = json.dumps(obj, sort_keys=True).encode()
    return data


def tree_digest(repo: Path) -> dict[str, str]:
    """sha256 of every artifact file (relative path -> digest)."""
    out = {}
    for top in ARTIFACTS:
        for p in sorted((repo / top).rglob("*")):
            if p.is_file():
                rel = str(p.relative_to(repo))
                out[rel] = hashlib.sha256(_content(repo, rel)).hexdigest()
    return out


def lock_view(repo: Path) -> dict:
    """dvc.lock parsed, with the hashes of the TIMING files masked."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for entry in lock["stages"].values():
        for out in entry.get("outs", []):
            if out["path"] in TIMING:
                out["md5"] = out["size"] = None
    return lock


def _procs_in_group(pgid: int) -> dict[int, str]:
    """pid -> command line of the live processes in a process group (from /proc)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] == "Z" or int(fields[2]) != pgid:
                continue
            out[int(d)] = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
    return out


def _cache_path(repo: Path, md5: str) -> Path:
    return repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]


def stage_outs(lock: dict, stage: str) -> list[dict]:
    return lock["stages"].get(stage, {}).get("outs", [])


def _objects(repo: Path, out: dict) -> set[str]:
    """The cache objects of one output in dvc.lock: its md5 and, for a directory, its entries'."""
    objs = {out["md5"]}
    p = _cache_path(repo, out["md5"])
    if out["md5"].endswith(".dir") and p.exists():
        objs |= {e["md5"] for e in json.loads(p.read_text())}
    return objs


def make_fresh(repo: Path, stage: str) -> None:
    """Put `stage` back to before its first run: outputs, lock entry, cache objects and run-cache gone.
    Objects that another stage's outputs share (e.g. identical zarr.json of raw and final stores) stay."""
    lock_path = repo / "dvc.lock"
    lock = yaml.safe_load(lock_path.read_text())
    shared = set().union(*(_objects(repo, o) for s, e in lock["stages"].items() if s != stage for o in e.get("outs", [])))
    for out in stage_outs(lock, stage):
        for md5 in _objects(repo, out) - shared:
            _cache_path(repo, md5).unlink(missing_ok=True)
    lock["stages"].pop(stage, None)
    lock_path.write_text(yaml.safe_dump(lock, sort_keys=False))
    for out in STAGES[stage][1]:
        p = repo / out
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    shutil.rmtree(repo / ".dvc/cache/runs", ignore_errors=True)


def launch(repo: Path) -> subprocess.Popen:
    # PYTHONPATH: the stages import the repo's own trackstar/, not an editable install of another checkout
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(repo)}
    env.pop("TRACKSTAR_KILL_AT", None)
    return subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repo, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def watch(proc: subprocess.Popen, script: str, kill: callable | None) -> dict:
    """Poll the process group every few ms; `kill(phase, t, t_script_start, t_script_end)` -> True kills now.
    Returns the timeline (seconds from launch) and, if killed, the phase at the kill."""
    t0 = time.monotonic()
    start = end = None
    while True:
        t = time.monotonic() - t0
        if proc.poll() is not None:
            return {"killed": False, "script_start": start, "script_end": end, "exit": t, "rc": proc.returncode}
        running = any(script in cmd and "-m dvc" not in cmd for cmd in _procs_in_group(proc.pid).values())
        if running and start is None:
            start = t
        if start is not None and not running and end is None:
            end = t
        phase = "startup" if start is None else ("command" if end is None else "commit")
        if kill is not None and kill(phase, t, start, end):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            if proc.returncode != -signal.SIGKILL:  # it exited by itself just before the signal
                return {"killed": False, "script_start": start, "script_end": end, "exit": t, "rc": proc.returncode}
            return {"killed": True, "phase": phase, "at": round(t, 3), "script_start": start, "script_end": end}
        time.sleep(0.004)


RWLOCK_CORRUPT = "Unable to read RWLock-file"


def repro_to_completion(repo: Path) -> tuple[int, str]:
    """A plain `dvc repro`, not killed: (returncode, output)."""
    proc = launch(repo)
    out = proc.communicate()[0].decode(errors="replace")
    return proc.returncode, out


def check_cache(repo: Path) -> list[str]:
    """Outputs in dvc.lock whose objects are missing from the cache or hold other bytes."""
    bad = []
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for stage, entry in lock["stages"].items():
        for out in entry.get("outs", []):
            objs = [out["md5"]]
            if out["md5"].endswith(".dir"):
                p = _cache_path(repo, out["md5"])
                objs = [e["md5"] for e in json.loads(p.read_text())] if p.exists() else objs
                if not p.exists():
                    bad.append(f"{stage}: {out['path']} .dir object missing")
                    continue
            for md5 in objs:
                p = _cache_path(repo, md5)
                if not p.exists() or hashlib.md5(p.read_bytes()).hexdigest() != md5:
                    bad.append(f"{stage}: {out['path']} object {md5} missing or corrupt")
    return bad


def verify(repo: Path, ref: dict[str, str], ref_lock: dict, status: bool = True) -> list[str]:
    """Every way the repo differs from the uninterrupted build (empty: identical); `dvc status` if `status`."""
    problems = []
    got = tree_digest(repo)
    for f in sorted(set(ref) | set(got)):
        if ref.get(f) != got.get(f):
            problems.append(f"artifact differs: {f}")
    if lock_view(repo) != ref_lock:
        problems.append("dvc.lock differs")
    st = dvc(repo, "status", "--json", check=False) if status else None
    if st is not None and (st.returncode != 0 or json.loads(st.stdout or "{}")):
        problems.append(f"dvc status not clean: {st.stdout.strip()[:500]} {st.stderr.strip()[-500:]}")
    problems += check_cache(repo)
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=56, help="SIGKILLs that must land (misses are retried)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/trackstar-kill-soak")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/kill_soak.json"))
    ap.add_argument("--calibration", help="take the stage timelines from an earlier result JSON (skips calibrating)")
    ap.add_argument("--stages", default=",".join(STAGES), help="the stages to kill, in turn (comma-separated)")
    ap.add_argument("--reuse", action="store_true", help="start from WORK/pristine of an earlier soak (skips the build)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.work)
    pristine, repo = work / "pristine", work / "soak"
    t_start = time.time()
    if args.reuse and pristine.is_dir():
        shutil.rmtree(repo, ignore_errors=True)
        shutil.copytree(pristine, repo, symlinks=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
        make_repo(repo, OVERRIDES)
        dvc(repo, "repro")
        shutil.copytree(repo, pristine, symlinks=True)
    ref, ref_lock = tree_digest(repo), lock_view(repo)
    assert not verify(repo, ref, ref_lock), verify(repo, ref, ref_lock)
    print(f"uninterrupted build done: {len(ref)} artifact files", flush=True)

    # calibration: one uninterrupted fresh build per stage gives its timeline (command, commit)
    timeline = json.loads(Path(args.calibration).read_text())["calibration_s"] if args.calibration else {}
    for stage, (script, _) in STAGES.items():
        if stage not in args.stages.split(",") or stage in timeline:
            continue
        make_fresh(repo, stage)
        tl = watch(launch(repo), script, None)
        assert tl["rc"] == 0 and tl["script_start"] is not None and tl["script_end"] is not None, (stage, tl)
        problems = verify(repo, ref, ref_lock, status=False)
        assert not problems, (stage, problems)
        timeline[stage] = {k: round(v, 3) for k, v in tl.items() if k in ("script_start", "script_end", "exit")}
        print(f"calibrated {stage}: {timeline[stage]}", flush=True)

    kills, failures, rounds, misses = [], [], 0, 0
    names = args.stages.split(",")
    assert set(names) <= set(STAGES), f"--stages: choose from {list(STAGES)}"
    while len(kills) < args.kills:
        stage = names[len(kills) % len(names)]  # every stage equally often, in turn
        script = STAGES[stage][0]
        kind = rng.choice(["command", "commit", "any"])
        tl = timeline[stage]
        if kind == "command":
            frac = rng.random()
            rule = lambda ph, t, s, e: ph == "command" and t >= s + frac * (tl["script_end"] - tl["script_start"])
        elif kind == "commit":
            delay = rng.random() * 0.7 * max(tl["exit"] - tl["script_end"], 0.05)  # DVC's tail varies under load
            rule = lambda ph, t, s, e: ph == "commit" and t >= e + delay
        else:
            at = rng.random() * tl["exit"]
            rule = lambda ph, t, s, e: t >= at
        rounds += 1
        make_fresh(repo, stage)
        hit = watch(launch(repo), script, rule)
        if not hit["killed"]:
            misses += 1
            print(f"round {rounds}: {stage} {kind}: missed (dvc exited first)", flush=True)
        else:
            print(f"kill {len(kills) + 1}: {stage} {kind} -> {hit['phase']} at {hit['at']:.2f} s", flush=True)
        rc, out = repro_to_completion(repo)
        ran = re.findall(r"Running stage '([^']+)'", out)
        problems = [] if rc == 0 else [f"dvc repro after the kill failed ({rc}): {out[-1500:]}"]
        recovery = None
        if rc != 0 and RWLOCK_CORRUPT in out:
            # DVC rewrites .dvc/tmp/rwlock in place (truncate, then write), so a kill between the two leaves
            # it empty and every later dvc command refuses to run (upstream: treeverse/dvc#7615). Its
            # content only names live DVC processes, so deleting it is safe when none runs.
            (repo / ".dvc/tmp/rwlock").unlink()
            recovery = "rm .dvc/tmp/rwlock"
            rc, out = repro_to_completion(repo)
            if rc != 0:
                problems.append(f"dvc repro after `{recovery}` failed ({rc}): {out[-1500:]}")
        # `dvc status` (slow to start) every 6th round; the bytes, the lock and the cache every round
        after = verify(repo, ref, ref_lock, status=rounds % 6 == 0) if rc == 0 else []
        problems += after
        record = {"stage": stage, "kind": kind, **{k: hit.get(k) for k in ("phase", "at")}, "ok": not problems,
                  "rerun": ran}
        if hit["killed"]:
            kills.append(record)
        if problems:
            failures.append({**record, "problems": problems, "recovery": recovery,
                             "identical_after_recovery": recovery is not None and rc == 0 and not after})
            print(f"  FAILED: {problems}" + (f"; after `{recovery}`: identical={not after}" if recovery else ""),
                  flush=True)
            if recovery is None or after or rc != 0:
                # keep the failed repo for a post-mortem; back to the uninterrupted build for the next rounds
                shutil.move(repo, f"{work}-failed-{len(failures)}")
                shutil.copytree(pristine, repo, symlinks=True)

        write_result(args.out, args.seed, kills, rounds, misses, failures, None, len(ref), timeline, t_start)

    final = verify(repo, ref, ref_lock)
    result = write_result(args.out, args.seed, kills, rounds, misses, failures, final, len(ref), timeline, t_start)
    print(json.dumps({k: v for k, v in result.items() if k != "kill_log"}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failures or final else 0)


def write_result(out: str, seed: int, kills: list, rounds: int, misses: int, failures: list, final: list | None,
                 n_files: int, timeline: dict, t_start: float) -> dict:
    """The soak's figures as JSON (rewritten after every round, so a stopped soak leaves its tally)."""
    by_stage = {s: sum(k["stage"] == s for k in kills) for s in STAGES if any(k["stage"] == s for k in kills)}
    by_phase = {p: sum(k["phase"] == p for k in kills) for p in ("startup", "command", "commit")}
    result = {
        "params": "tests/pipeline.py TINY + " + json.dumps(OVERRIDES),
        "seed": seed,
        "complete": final is not None,
        "kills": len(kills),
        "rounds": rounds,
        "misses": misses,
        "kills_by_stage": by_stage,
        "kills_by_phase": by_phase,
        "failures": failures,
        "final_identical": None if final is None else not final,
        "final_problems": final,
        "artifact_files_compared": n_files,
        "calibration_s": timeline,
        "wall_s": round(time.time() - t_start, 1),
        "kill_log": kills,
    }
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    return result


if __name__ == "__main__":
    main()
