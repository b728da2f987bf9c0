"""Randomized kill soak: SIGKILL `dvc repro` (its whole process group) at random moments while it
builds `encode@*`, `autocorrelation`, `precondition@*` or `index`, then `dvc repro` to completion,
and check the artifacts against an uninterrupted build byte for byte (benchmarks/README.md, "Kill soak").

Each round makes one stage a fresh build (outputs, dvc.lock entry, cache objects, run-cache removed) and
kills at a moment of one kind: `command` (inside the stage script), `commit` (DVC hashing, caching and
writing dvc.lock after the script exited) or `any`. A refusal of DVC's own bookkeeping files left cut short
(`.dvc/tmp/rwlock`, treeverse/dvc#7615; `dvc.lock`) is recovered as docs/pipeline.md says and counted apart
(`dvc_own_failures`); any other problem is a failure, its repo kept as WORK-failed-N. Exit status 0 when no
stage failed and the final state is identical; `complete: true` once --kills kills landed.

    nice -n 10 python benchmarks/kill_soak.py --kills 56     # ~45 min on 2 quiet cores
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
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness import child_env, write_results  # noqa: E402
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
    env = child_env(repo)  # the stages import the repo's own trackstar/, not an editable install elsewhere
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


# DVC's own bookkeeping files, which it rewrites in place (truncate, then write): a kill between the two leaves
# them cut short and every later dvc command refuses to run. Counted apart from the stages' own crash safety.
DVC_OWN = {  # message of the refusal -> (file, upstream issue)
    "Unable to read RWLock-file": (".dvc/tmp/rwlock", "treeverse/dvc#7615"),
    "dvc.lock' validation failed": ("dvc.lock", "DVC writes dvc.lock in place"),
    "dvc.lock' is invalid": ("dvc.lock", "DVC writes dvc.lock in place"),  # cut inside a YAML key: a parse error
}


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


@dataclass
class Tally:
    """The soak so far: kills that landed, rounds, misses, the stages' own failures and DVC's own."""

    seed: int
    timeline: dict
    ref: dict  # the uninterrupted build: artifact digests
    ref_lock: dict  # and its dvc.lock
    t_start: float = field(default_factory=time.time)
    kills: list = field(default_factory=list)
    rounds: int = 0
    misses: int = 0
    failures: list = field(default_factory=list)
    dvc_own: list = field(default_factory=list)

    def result(self, final: list | None) -> dict:
        """The soak's figures (final: the last check's problems, None while the soak runs)."""
        by_stage = {s: n for s in STAGES if (n := sum(k["stage"] == s for k in self.kills))}
        return {
            "seed": self.seed,
            "complete": final is not None,
            "kills": len(self.kills),
            "rounds": self.rounds,
            "misses": self.misses,
            "kills_by_stage": by_stage,
            "kills_by_phase": {p: sum(k["phase"] == p for k in self.kills) for p in ("startup", "command", "commit")},
            "failures": self.failures,
            "dvc_own_failures": self.dvc_own,
            "dvc_own_failures_by_file": {f: sum(x["file"] == f for x in self.dvc_own) for f, _ in DVC_OWN.values()},
            "final_identical": None if final is None else not final,
            "final_problems": final,
            "artifact_files_compared": len(self.ref),
            "calibration_s": self.timeline,
            "wall_s": round(time.time() - self.t_start, 1),
            "kill_log": self.kills,
        }


def recover(repo: Path, pristine: Path, out: str) -> dict | None:
    """If `out` (a failed `dvc repro`'s output) is DVC refusing a bookkeeping file it left cut short, put the file
    right as docs/pipeline.md says (delete the rwlock: it only names live DVC processes; dvc.lock: the last good
    one, the uninterrupted build's) and return what was done; else None."""
    for message, (name, upstream) in DVC_OWN.items():
        if message in out:
            if name == "dvc.lock":
                shutil.copy(pristine / "dvc.lock", repo / "dvc.lock")
            else:
                (repo / name).unlink()
            return {"file": name, "upstream": upstream, "message": message}
    return None


def soak_round(repo: Path, pristine: Path, tally: Tally, rng: random.Random, names: list[str]) -> dict:
    """Make one stage fresh, kill `dvc repro` at a random moment, rerun to completion (recovering DVC's own
    bookkeeping if it refuses) and compare; returns the round's record with its problems."""
    stage = names[len(tally.kills) % len(names)]  # every stage equally often, in turn
    script = STAGES[stage][0]
    kind = rng.choice(["command", "commit", "any"])
    tl = tally.timeline[stage]
    if kind == "command":
        frac = rng.random()
        rule = lambda ph, t, s, e: ph == "command" and t >= s + frac * (tl["script_end"] - tl["script_start"])
    elif kind == "commit":
        delay = rng.random() * 0.7 * max(tl["exit"] - tl["script_end"], 0.05)  # DVC's tail varies under load
        rule = lambda ph, t, s, e: ph == "commit" and t >= e + delay
    else:
        at = rng.random() * tl["exit"]
        rule = lambda ph, t, s, e: t >= at
    tally.rounds += 1
    make_fresh(repo, stage)
    hit = watch(launch(repo), script, rule)
    rc, out = repro_to_completion(repo)
    recovery = recover(repo, pristine, out) if rc != 0 else None
    if recovery:
        rc, out = repro_to_completion(repo)
    ran = re.findall(r"Running stage '([^']+)'", out)
    problems = [] if rc == 0 else [f"dvc repro after the kill failed ({rc}): {out[-1500:]}"]
    # `dvc status` (slow to start) every 6th round; the bytes, the lock and the cache every round
    if rc == 0:
        problems += verify(repo, tally.ref, tally.ref_lock, status=tally.rounds % 6 == 0)
    return {"stage": stage, "kind": kind, "killed": hit["killed"], **{k: hit.get(k) for k in ("phase", "at")},
            "ok": not problems, "rerun": ran, "recovery": recovery, "problems": problems}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=56, help="SIGKILLs that must land (misses are retried)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/trackstar-kill-soak")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/kill_soak.json"))
    ap.add_argument("--stages", default=",".join(STAGES), help="the stages to kill, in turn (comma-separated)")
    args = ap.parse_args()
    names = args.stages.split(",")
    if not set(names) <= set(STAGES):
        sys.exit(f"--stages: choose from {list(STAGES)}")
    rng = random.Random(args.seed)
    work = Path(args.work)
    pristine, repo = work / "pristine", work / "soak"
    shutil.rmtree(work, ignore_errors=True)
    make_repo(repo, OVERRIDES)
    dvc(repo, "repro")
    shutil.copytree(repo, pristine, symlinks=True)
    ref, ref_lock = tree_digest(repo), lock_view(repo)
    assert not verify(repo, ref, ref_lock), verify(repo, ref, ref_lock)
    print(f"uninterrupted build done: {len(ref)} artifact files", flush=True)
    tally = Tally(args.seed, calibrate(repo, names, ref, ref_lock), ref, ref_lock)
    params = {**vars(args), "pipeline": "tests/pipeline.py TINY + " + json.dumps(OVERRIDES)}
    out = Path(args.out)

    while len(tally.kills) < args.kills:
        rec = soak_round(repo, pristine, tally, rng, names)
        if not rec["killed"]:
            tally.misses += 1
            print(f"round {tally.rounds}: {rec['stage']} {rec['kind']}: missed (dvc exited first)", flush=True)
        else:
            tally.kills.append({k: rec[k] for k in ("stage", "kind", "phase", "at", "ok", "rerun", "recovery")})
            print(f"kill {len(tally.kills)}: {rec['stage']} {rec['kind']} -> {rec['phase']} at {rec['at']:.2f} s"
                  + (f"; DVC left {rec['recovery']['file']} cut short, recovered" if rec["recovery"] else ""),
                  flush=True)
        if rec["recovery"]:
            tally.dvc_own.append({**rec["recovery"], "stage": rec["stage"], "identical_after_recovery": rec["ok"]})
        if rec["problems"]:
            tally.failures.append(rec)
            print(f"  FAILED: {rec['problems']}", flush=True)
            # keep the failed repo for a post-mortem; back to the uninterrupted build for the next rounds
            shutil.move(repo, f"{work}-failed-{len(tally.failures)}")
            shutil.copytree(pristine, repo, symlinks=True)
        write_results(out, params, tally.result(None))

    final = verify(repo, ref, ref_lock)
    result = write_results(out, params, tally.result(final))
    print(json.dumps({k: v for k, v in result.items() if k != "kill_log"}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if tally.failures or final else 0)


def calibrate(repo: Path, names: list[str], ref: dict, ref_lock: dict) -> dict:
    """One uninterrupted fresh build per stage: its timeline (script start and end, DVC's exit), seconds."""
    timeline = {}
    for stage in names:
        make_fresh(repo, stage)
        tl = watch(launch(repo), STAGES[stage][0], None)
        assert tl["rc"] == 0 and tl["script_start"] is not None and tl["script_end"] is not None, (stage, tl)
        problems = verify(repo, ref, ref_lock, status=False)
        assert not problems, (stage, problems)
        timeline[stage] = {k: round(v, 3) for k, v in tl.items() if k in ("script_start", "script_end", "exit")}
        print(f"calibrated {stage}: {timeline[stage]}", flush=True)
    return timeline


if __name__ == "__main__":
    main()
