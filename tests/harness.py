"""What the tests and the benchmarks share: a throwaway copy of this repo, git, params edits, a measured
child process and the results file that records the commit, the params and the machine."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from trackstar.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def git(repo: Path, *args: str) -> str:
    """`git args` in repo with a fixed identity; its stdout (raises on failure)."""
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True,
                          env={**os.environ, **GIT_IDENTITY}).stdout


def tracked_files() -> list[str]:
    """This checkout's files: tracked and untracked-but-not-ignored."""
    out = git(ROOT, "ls-files", "-co", "--exclude-standard").split()
    return [f for f in out if (ROOT / f).is_file()]


def make_repo(dest: Path, params: dict | None = None) -> Path:
    """Copy the project's files (no metrics, no results) into dest, merge params into params.yaml, git init and
    commit."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in tracked_files():
        if f.startswith(("metrics/", "benchmarks/results/")):
            continue
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((ROOT / f).read_bytes())
    set_params(dest, params or {})
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "init")
    return dest


def set_params(repo: Path, overrides: dict[str, dict]) -> None:
    """Merge {section: {key: value}} into repo/params.yaml (each section's keys updated, others kept)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def set_param(repo: Path, dotted: str, value) -> None:
    """Set one dotted key (`hessian.mix_k`) of repo/params.yaml."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    node = params
    *path, last = dotted.split(".")
    for p in path:
        node = node[p]
    node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def child_env(repo: Path | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """base (default os.environ) with this venv's bin first on PATH and, given a repo, its own trackstar first on
    sys.path (not an editable install of another checkout)."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if repo is not None:
        env["PYTHONPATH"] = str(repo)
    return env


@dataclass
class Measured:
    """A finished child process: exit code, wall and CPU seconds, peak RSS (its own ru_maxrss), its output."""

    rc: int
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    stdout: str
    stderr: str

    def figures(self) -> dict[str, float]:
        return {"seconds": round(self.seconds, 2), "cpu_seconds": round(self.cpu_seconds, 2),
                "peak_rss_mb": round(self.peak_rss_mb, 1)}


# A child's ru_maxrss starts at its parent's peak RSS when it execs (Linux keeps the replaced address space's
# high-water mark), so cmd runs under this small Python, which waits for it and writes its figures to argv[1].
_WAIT = ("import os, subprocess, sys\n"
         "p = subprocess.Popen(sys.argv[2:])\n"
         "_, status, u = os.wait4(p.pid, 0)\n"
         "open(sys.argv[1], 'w').write(f'{u.ru_maxrss} {u.ru_utime + u.ru_stime}')\n"
         "code = os.waitstatus_to_exitcode(status)\n"
         "sys.exit(code if code >= 0 else 128 - code)\n")


def measured(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, capture: bool = True) -> Measured:
    """Run cmd to its end (output to temp files, no pipe to fill; capture=False: to this process's own); wall time,
    CPU time (user + system, steadier than wall time on a shared machine) and peak RSS of that process and the
    descendants it waited for (the largest of them), from os.wait4 (ru_maxrss: KiB on Linux); a signal's death
    is rc 128 + signal."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r") as figures:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _WAIT, figures.name, *cmd], cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, stdout=out if capture else None,
                                stderr=err if capture else None, text=True)
        rc = proc.wait()
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr, got = out.read(), err.read(), figures.read().split()
        if not got:  # cmd did not start (no such program)
            raise OSError(f"{cmd[0]}: could not be run (rc {rc}): {stderr[-2000:]}")
        return Measured(rc, seconds, float(got[1]), int(got[0]) / 1024, stdout, stderr)


def peak_rss_mb() -> float:
    """This process's own peak RSS so far (MB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def commit(root: Path = ROOT) -> str:
    """The checkout's HEAD, with `+dirty` when tracked files differ from it."""
    head = git(root, "rev-parse", "HEAD").strip()
    dirty = git(root, "status", "--porcelain", "--untracked-files=no").strip()
    return head + ("+dirty" if dirty else "")


def machine() -> dict:
    """CPU model, cores, platform and the versions that move timings."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    out = {"cpu": cpu, "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
           "platform": platform.platform(), "python": platform.python_version(), "load_avg_at_start": list(os.getloadavg())}
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        pass
    return out


def write_results(path: Path, params: dict, figures: dict, at_start: str | None = None) -> dict:
    """path <- {commit, params, machine, **figures} as JSON, atomically (temp file, then rename). `at_start`: the
    commit the run's copy of the code was taken from (a long run's HEAD may move on while it runs)."""
    result = {"commit": at_start or commit(), "params": params, "machine": machine(), **figures}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return result
