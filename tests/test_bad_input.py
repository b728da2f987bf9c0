"""Bad input through the real stage scripts (and once through `dvc repro`).

Every case must exit non-zero with one clean `error: <file>:<line>: field '<name>': ...` message
(no traceback) and leave no output behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline import dvc, make_repo, repro, run

CORPUS = "inputs/data/corpus.jsonl"
QUERIES = "inputs/data/queries.jsonl"

GOOD_CORPUS = [
    '{"id": "p1", "text": "Alice was born in Kesh."}',
    '{"id": "p2", "text": "Bob works for Acme."}',
    '{"id": "p3", "text": "Carol plays the flute."}',
]
GOOD_QUERIES = [
    '{"id": "q1", "prompt": "Q: Where was Alice born? A:", "target": " Kesh", "relevant_ids": ["p1"]}',
    '{"id": "q2", "prompt": "Q: Who employs Bob? A:", "target": " Acme"}',
]


def jsonl(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


def with_line(lines: list[str], i: int, new: str) -> bytes:
    """The good lines with line i (1-based) replaced by `new`."""
    out = list(lines)
    out[i - 1] = new
    return jsonl(out)


# (case id, corpus bytes, queries bytes, expected error message after "error: ")
DATA_CASES = [
    # corpus.jsonl
    ("corpus-malformed-json", with_line(GOOD_CORPUS, 2, '{"id": "p2", "text": "Bob"'), None,
     f"{CORPUS}:2: malformed JSON"),
    ("corpus-not-an-object", with_line(GOOD_CORPUS, 2, '["p2", "Bob"]'), None,
     f"{CORPUS}:2: expected a JSON object, got list"),
    ("corpus-missing-text", with_line(GOOD_CORPUS, 2, '{"id": "p2"}'), None, f"{CORPUS}:2: field 'text': missing"),
    ("corpus-empty-text", with_line(GOOD_CORPUS, 3, '{"id": "p3", "text": ""}'), None,
     f"{CORPUS}:3: field 'text': must not be empty"),
    ("corpus-blank-text", with_line(GOOD_CORPUS, 3, '{"id": "p3", "text": "  \\t "}'), None,
     f"{CORPUS}:3: field 'text': must not be empty"),
    ("corpus-text-not-string", with_line(GOOD_CORPUS, 2, '{"id": "p2", "text": 42}'), None,
     f"{CORPUS}:2: field 'text': must be a string, got int"),
    ("corpus-missing-id", with_line(GOOD_CORPUS, 2, '{"text": "Bob works for Acme."}'), None,
     f"{CORPUS}:2: field 'id': missing"),
    ("corpus-duplicate-id", with_line(GOOD_CORPUS, 3, '{"id": "p1", "text": "Carol plays the flute."}'), None,
     f"{CORPUS}:3: field 'id': duplicate id 'p1' (first on line 1)"),
    ("corpus-invalid-utf8", jsonl(GOOD_CORPUS[:1]) + b'{"id": "p2", "text": "Bob \xff\xfe"}\n', None,
     f"{CORPUS}:2: invalid UTF-8"),
    ("corpus-unpaired-surrogate", with_line(GOOD_CORPUS, 2, '{"id": "p2", "text": "Bob \\ud800 x"}'), None,
     f"{CORPUS}:2: field 'text': not valid Unicode"),
    ("corpus-empty-file", b"", None, f"{CORPUS}: file is empty"),
    ("corpus-blank-line", jsonl(GOOD_CORPUS[:1] + [""] + GOOD_CORPUS[1:]), None, f"{CORPUS}:2: blank line"),
    ("corpus-trailing-blank-line", jsonl(GOOD_CORPUS) + b"\n", None, f"{CORPUS}:4: blank line"),
    ("corpus-missing-file", None, None, f"{CORPUS}: file does not exist"),
    # queries.jsonl
    ("queries-malformed-json", None, with_line(GOOD_QUERIES, 2, '{"id": "q2", "prompt": "x" "target": " y"}'),
     f"{QUERIES}:2: malformed JSON"),
    ("queries-missing-prompt", None, with_line(GOOD_QUERIES, 2, '{"id": "q2", "target": " Acme"}'),
     f"{QUERIES}:2: field 'prompt': missing"),
    ("queries-empty-prompt", None, with_line(GOOD_QUERIES, 2, '{"id": "q2", "prompt": " ", "target": " Acme"}'),
     f"{QUERIES}:2: field 'prompt': must not be empty"),
    ("queries-missing-target", None, with_line(GOOD_QUERIES, 1, '{"id": "q1", "prompt": "Q: Where? A:"}'),
     f"{QUERIES}:1: field 'target': missing"),
    ("queries-empty-target", None, with_line(GOOD_QUERIES, 2, '{"id": "q2", "prompt": "Q: A:", "target": ""}'),
     f"{QUERIES}:2: field 'target': must not be empty"),
    ("queries-target-not-string", None, with_line(GOOD_QUERIES, 2, '{"id": "q2", "prompt": "Q: A:", "target": null}'),
     f"{QUERIES}:2: field 'target': must be a string, got NoneType"),
    ("queries-duplicate-id", None, with_line(GOOD_QUERIES, 2, '{"id": "q1", "prompt": "Q: A:", "target": " x"}'),
     f"{QUERIES}:2: field 'id': duplicate id 'q1' (first on line 1)"),
    ("queries-relevant-not-in-corpus", None,
     with_line(GOOD_QUERIES, 2, '{"id": "q2", "prompt": "Q: A:", "target": " x", "relevant_ids": ["p2", "p9"]}'),
     f"{QUERIES}:2: field 'relevant_ids': 1 id(s) not in the corpus, e.g. 'p9'"),
    ("queries-relevant-not-a-list", None,
     with_line(GOOD_QUERIES, 1, '{"id": "q1", "prompt": "Q: A:", "target": " x", "relevant_ids": "p1"}'),
     f"{QUERIES}:1: field 'relevant_ids': must be a list of strings"),
    ("queries-invalid-utf8", None, jsonl(GOOD_QUERIES[:1]) + b'{"id": "q2", "prompt": "\xc3(", "target": " x"}\n',
     f"{QUERIES}:2: invalid UTF-8"),
    ("queries-empty-file", None, b"", f"{QUERIES}: file is empty"),
    ("queries-blank-line", None, jsonl(GOOD_QUERIES[:1] + ["   "] + GOOD_QUERIES[1:]), f"{QUERIES}:2: blank line"),
]


def run_py(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run(repo, sys.executable, *args, check=False)


def assert_clean_error(proc: subprocess.CompletedProcess, expected: str) -> str:
    """Exit code 2, no traceback, and an `error: ` line starting with the expected text."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: {expected}"), (errors[0], expected)
    return proc.stderr


def no_leftovers(repo: Path, *outputs: str) -> None:
    for out in outputs:
        assert not (repo / out).exists(), f"{out} left behind"
        parent = repo / out
        stem = parent.name
        if parent.parent.exists():  # no temporary siblings (.corpus.jsonl.xxxx, .model.tmp, ...)
            assert not [p.name for p in parent.parent.iterdir() if p.name.startswith(f".{stem}")], out


# --------------------------------------------------------------------------- user files (stage data)


@pytest.fixture(scope="module")
def files_repo(tmp_path_factory):
    """data.source: files; the data stage is light (no torch), so every case runs the real script."""
    return make_repo(tmp_path_factory.mktemp("badinput") / "files", {"data": {"source": "files"}})


def write_inputs(repo: Path, corpus: bytes | None, queries: bytes | None) -> None:
    for rel, content in ((CORPUS, corpus), (QUERIES, queries)):
        p = repo / rel
        p.unlink(missing_ok=True)
        if content is not None:
            p.write_bytes(content)


def clear_data(repo: Path) -> None:
    for name in ("corpus.jsonl", "queries.jsonl"):
        (repo / "data" / name).unlink(missing_ok=True)


def test_good_files_pass(files_repo):
    write_inputs(files_repo, jsonl(GOOD_CORPUS), jsonl(GOOD_QUERIES))
    clear_data(files_repo)
    proc = run_py(files_repo, "stages/data.py")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"passages": 3, "queries": 2}


@pytest.mark.parametrize("case, corpus, queries, expected", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_user_files_are_refused_with_file_line_and_field(files_repo, case, corpus, queries, expected):
    if case != "corpus-missing-file":
        corpus = jsonl(GOOD_CORPUS) if corpus is None else corpus
    queries = jsonl(GOOD_QUERIES) if queries is None else queries
    write_inputs(files_repo, corpus, queries)
    clear_data(files_repo)
    assert_clean_error(run_py(files_repo, "stages/data.py"), expected)
    no_leftovers(files_repo, "data/corpus.jsonl", "data/queries.jsonl")


def test_dvc_repro_reports_the_failure(files_repo):
    write_inputs(files_repo, with_line(GOOD_CORPUS, 2, '{"id": "p2"}'), jsonl(GOOD_QUERIES))
    clear_data(files_repo)
    proc = dvc(files_repo, "repro", "data", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"error: {CORPUS}:2: field 'text': missing" in out, out[-3000:]
    assert "failed to reproduce 'data'" in out, out[-3000:]
    assert "Traceback" not in out
    no_leftovers(files_repo, "data/corpus.jsonl", "data/queries.jsonl")


# --------------------------------------------------------------------------- params.yaml


def edit_params(repo: Path, section: str, key: str | None, value: str) -> int:
    """Set `section.key: value` (raw YAML text; a new key is added) or, with key None, add a top-level
    `section: value`. Returns the 1-based line it is on."""
    lines = (repo / "params.yaml").read_text().splitlines()
    if key is None:
        lines.append(f"{section}: {value}")
        line = len(lines)
    else:
        top = lines.index(f"{section}:")
        end = next((i for i in range(top + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
        hit = [i for i in range(top + 1, end) if lines[i].startswith(f"  {key}:")]
        i = hit[0] if hit else end
        if hit:
            lines[i] = f"  {key}: {value}"
        else:
            lines.insert(i, f"  {key}: {value}")
        line = i + 1
    (repo / "params.yaml").write_text("\n".join(lines) + "\n")
    return line


PARAM_CASES = [
    ("unknown-key", "data", "sourse", "files",
     "unknown key 'data.sourse' (valid keys here: source, corpus, queries, seed, entities"),
    ("unknown-section", "datta", None, "{}", "unknown key 'datta' (valid keys here: data, model, train, gradients"),
    ("wrong-type", "train", "epochs", "many", "field 'train.epochs': Input should be a valid integer"),
    ("wrong-type-bool", "model", "tie_embeddings", "maybe",
     "field 'model.tie_embeddings': Input should be a valid boolean"),
    ("out-of-range", "projection", "k", "0", "field 'projection.k': Input should be greater than or equal to 1"),
    ("out-of-range-float", "hessian", "lambda", "2.0",
     "field 'hessian.lambda': Input should be less than or equal to 1"),
    ("invalid-choice", "correction", "kind", "adam_rank2",
     "field 'correction.kind': Input should be 'adam_rank1', 'adam', 'estimated' or 'none' (got 'adam_rank2')"),
    ("invalid-choice-dtype", "encode", "dtype", "fp8",
     "field 'encode.dtype': Input should be 'fp32', 'fp16' or 'bf16'"),
    ("invalid-yaml", "data", "source", "[files", "invalid YAML"),
]


@pytest.mark.parametrize("case, section, key, value, expected", PARAM_CASES, ids=[c[0] for c in PARAM_CASES])
def test_bad_params_name_file_line_key_and_choices(files_repo, case, section, key, value, expected):
    original = (files_repo / "params.yaml").read_text()
    write_inputs(files_repo, jsonl(GOOD_CORPUS), jsonl(GOOD_QUERIES))
    clear_data(files_repo)
    try:
        line = edit_params(files_repo, section, key, value)
        proc = run_py(files_repo, "stages/data.py")
    finally:
        (files_repo / "params.yaml").write_text(original)
    if case == "invalid-yaml":  # the parser reports where it gave up: at or after the bad line
        err = assert_clean_error(proc, "params.yaml:")
        assert "invalid YAML" in err
    else:
        assert_clean_error(proc, f"params.yaml:{line}: {expected}")
    no_leftovers(files_repo, "data/corpus.jsonl", "data/queries.jsonl")


def test_on_disk_flat_index_is_refused_by_the_index_stage(files_repo):
    """A cross-key check made by the one stage that reads both keys, still naming file, line and key."""
    original = (files_repo / "params.yaml").read_text()
    try:
        line = edit_params(files_repo, "index", "on_disk", "true")
        proc = run_py(files_repo, "stages/index.py")
    finally:
        (files_repo / "params.yaml").write_text(original)
    assert_clean_error(proc, f"params.yaml:{line}: field 'index.on_disk': true needs index.kind ivf_flat or ivf_pq")
    no_leftovers(files_repo, "index")


# --------------------------------------------------------------------------- model, encodings, stores


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory):
    """A tiny trained pipeline up to the Hessian (raw stores of both splits), copied per test."""
    r = make_repo(tmp_path_factory.mktemp("badinput") / "model", {"train": {"epochs": 1}})
    repro(r, "hessian")
    return r


@pytest.fixture
def sandbox(model_repo, tmp_path):
    return Path(shutil.copytree(model_repo, tmp_path / "repo", symlinks=True))


def set_yaml(repo: Path, dotted: str, value) -> None:
    import yaml

    params = yaml.safe_load((repo / "params.yaml").read_text())
    section, key = dotted.split(".")
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def store_attrs(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text())["attributes"]


def test_too_long_passage_refused_or_counted(sandbox):
    long = " ".join(["lorem"] * 300)
    corpus = [GOOD_CORPUS[0], json.dumps({"id": "p2", "text": long}), GOOD_CORPUS[2],
              json.dumps({"id": "p4", "text": long + " ipsum"})]
    (sandbox / "data/corpus.jsonl").write_text("".join(line + "\n" for line in corpus))
    shutil.rmtree(sandbox / "encodings/raw/train.zarr")
    set_yaml(sandbox, "gradients.truncation", "refuse")
    assert_clean_error(run_py(sandbox, "stages/encode.py", "train"),
                       "data/corpus.jsonl:2: field 'text': longer than gradients.max_length=64 tokens")
    no_leftovers(sandbox, "encodings/raw/train.zarr")

    set_yaml(sandbox, "gradients.truncation", "truncate")
    proc = run_py(sandbox, "stages/encode.py", "train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["truncated"] == 2
    assert store_attrs(sandbox / "encodings/raw/train.zarr")["truncated"] == 2


def test_query_too_long_prompt_refused_and_target_that_cannot_fit(sandbox):
    long = " ".join(["lorem"] * 300)
    shutil.rmtree(sandbox / "encodings/raw/query.zarr")
    queries = [GOOD_QUERIES[0], json.dumps({"id": "q2", "prompt": long, "target": " Kesh"})]
    (sandbox / "data/queries.jsonl").write_text("".join(line + "\n" for line in queries))
    set_yaml(sandbox, "gradients.truncation", "refuse")
    assert_clean_error(run_py(sandbox, "stages/encode.py", "query"),
                       "data/queries.jsonl:2: field 'prompt': longer than gradients.max_length=64 tokens")
    no_leftovers(sandbox, "encodings/raw/query.zarr")

    set_yaml(sandbox, "gradients.truncation", "truncate")  # a target is never truncated
    queries = [GOOD_QUERIES[0], GOOD_QUERIES[1],
               json.dumps({"id": "q4", "prompt": "Q: A:", "target": " " + long})]
    (sandbox / "data/queries.jsonl").write_text("".join(line + "\n" for line in queries))
    assert_clean_error(run_py(sandbox, "stages/encode.py", "query"),
                       "data/queries.jsonl:3: field 'target': does not fit in gradients.max_length=64 tokens")
    no_leftovers(sandbox, "encodings/raw/query.zarr")


def test_a_d_that_cannot_fit_is_refused_before_encoding_and_before_the_hessian(sandbox):
    shutil.rmtree(sandbox / "encodings/raw/train.zarr")
    (sandbox / "hessian/stats.safetensors").unlink()
    set_yaml(sandbox, "hessian.memory_gb", 0.1)  # below the interpreter's own footprint: nothing fits
    line = next(i for i, t in enumerate((sandbox / "params.yaml").read_text().splitlines(), 1) if "memory_gb" in t)
    want = f"params.yaml:{line}: field 'hessian.memory_gb': even per-module blocks (15 blocks of up to 16 columns)"
    stderr = assert_clean_error(run_py(sandbox, "stages/encode.py", "train"), want)
    assert "memory plan: d = 240 = 15 modules x k^2 (k = 4)" in stderr  # the plan is printed first
    cli = run_py(sandbox, "-m", "trackstar.cli", "plan")  # the same plan and error without running a stage
    assert_clean_error(cli, want)
    assert "memory plan: d = 240" in cli.stdout and "module" in cli.stdout
    no_leftovers(sandbox, "encodings/raw/train.zarr")
    assert not (sandbox / ".work/encode-train").exists()
    set_yaml(sandbox, "hessian.memory_gb", 8.0)
    import re
    assert re.search(r"full +1 +240 .* yes <- used", run(sandbox, sys.executable, "-m", "trackstar.cli", "plan").stdout)
    assert run_py(sandbox, "stages/encode.py", "train").returncode == 0
    set_yaml(sandbox, "hessian.memory_gb", 0.1)
    assert_clean_error(run_py(sandbox, "stages/autocorrelation.py"), want)
    no_leftovers(sandbox, "hessian/stats.safetensors")


def adopt_checkpoint(repo: Path, drop: tuple[str, ...]) -> None:
    """inputs/checkpoint = the trained model/ minus `drop`; model.source: checkpoint."""
    ck = repo / "inputs/checkpoint"
    shutil.rmtree(ck)
    shutil.copytree(repo / "model", ck)
    for name in drop:
        (ck / name).unlink()
    set_yaml(repo, "model.source", "checkpoint")


def test_adam_correction_without_optimizer_state_suggests_estimated(sandbox):
    adopt_checkpoint(sandbox, ("optimizer_state.safetensors", "optimizer_state.json"))
    proc = run_py(sandbox, "stages/train.py")  # adopting a checkpoint without state is fine
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["optimizer_state"] is False
    shutil.rmtree(sandbox / "encodings/raw/train.zarr")
    err = assert_clean_error(run_py(sandbox, "stages/encode.py", "train"),
                             "correction.kind: adam_rank1 needs the optimizer's second moments")
    assert "optimizer_state.safetensors" in err and "correction.kind: estimated" in err
    no_leftovers(sandbox, "encodings/raw/train.zarr")


def test_broken_checkpoints_are_refused_before_model_is_written(sandbox):
    adopt_checkpoint(sandbox, ("optimizer_state.json",))  # half of the optimizer state
    shutil.rmtree(sandbox / "model")
    assert_clean_error(run_py(sandbox, "stages/train.py"),
                       "inputs/checkpoint/optimizer_state.json: missing (the optimizer state needs both files)")
    no_leftovers(sandbox, "model")

    (sandbox / "inputs/checkpoint/config.json").unlink()
    assert_clean_error(run_py(sandbox, "stages/train.py"),
                       "inputs/checkpoint: not a checkpoint: config.json is missing")
    no_leftovers(sandbox, "model")


@pytest.mark.parametrize("field, value, expected", [
    ("checkpoint_hash", "0" * 64, "encodings/raw/train.zarr: attr 'checkpoint_hash' is '0000"),
    ("complete", False, "encodings/raw/train.zarr: store is incomplete"),
], ids=["checkpoint_hash", "incomplete"])
def test_store_with_disagreeing_attrs_is_refused(sandbox, field, value, expected):
    meta = sandbox / "encodings/raw/train.zarr/zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"][field] = value
    meta.unlink()  # never write through a possible link into the DVC cache
    meta.write_text(json.dumps(doc))
    err = assert_clean_error(run_py(sandbox, "stages/precondition.py", "train"), expected)
    if field == "checkpoint_hash":
        assert "current config expects" in err
    no_leftovers(sandbox, "encodings/final/train.zarr")

