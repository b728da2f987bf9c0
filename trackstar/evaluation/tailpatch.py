"""Tail-patch influence: one optimizer step from the final checkpoint on a single
proponent, theta' = theta - lr * g / sqrt(v_hat + eps) (final second moments, no momentum), then
the change in the query target's log-probability and probability: measured on the stepped model,
not predicted to first order. The step depends only on the proponent, so the work is grouped by
passage: one gradient per distinct passage, all the queries that have it re-scored in one forward.

The figure means something only in the linear regime: `probe_linearity` measures where on an lr grid a few
probe steps still match their first-order prediction, and `random_guard` checks that random proponents'
mean change stays near zero.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Mapping, MutableMapping, Sequence

import torch
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from trackstar.data.examples import Example, collate, per_example_loss

# vmap over scaled-dot-product attention falls back to a loop and says so on every call: not news to a user
warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)


# queries re-scored per forward under one stepped model (bounds the [queries, length, vocab] logits)
_QUERY_BATCH = 16


@dataclass(frozen=True)
class Step:
    """One tail-patch step theta - lr * g / sqrt(v_hat + eps) (v_hat None: a plain gradient step), on examples
    padded with `pad_id`; `batch` proponents per vmapped backward (None: by the model's size)."""

    lr: float
    v_hat: Mapping[str, torch.Tensor] | None
    pad_id: int
    eps: float = 1e-8
    batch: int | None = None
    progress: bool = True


def _batch_size(model: torch.nn.Module, budget_bytes: int = 1 << 29) -> int:
    """Proponents per vmapped step: each holds ~3 parameter-sized tensors (gradient, direction, patched
    weights); at most 16 (measured fastest on CPU for small models, 3.2-3.6x the one-at-a-time loop)."""
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(1, min(16, budget_bytes // max(1, 3 * n_bytes)))


def _losses(model: torch.nn.Module, params: Mapping[str, torch.Tensor], ids: torch.Tensor,
            mask: torch.Tensor) -> torch.Tensor:
    """Summed masked loss of each right-padded sequence of a batch, run without an attention mask: with
    causal attention and the loss masked to real tokens, padding changes neither the loss nor its gradient."""
    logits = functional_call(model, dict(params), args=(), kwargs={"input_ids": ids}).logits
    return per_example_loss(logits, ids, mask)


def _target_loss(model: torch.nn.Module, params: Mapping[str, torch.Tensor], ids: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """Summed masked loss of one right-padded sequence (the unit torch.func differentiates per example)."""
    return _losses(model, params, ids[None], mask[None]).sum()


def inverse_sqrt_moments(model: torch.nn.Module, v_hat: Mapping[str, torch.Tensor] | None, eps: float
                         ) -> dict[str, torch.Tensor | None]:
    """1 / sqrt(v_hat + eps) per parameter, computed once for every step (None: a plain gradient step)."""
    out: dict[str, torch.Tensor | None] = {}
    for n, p in model.named_parameters():
        v = None if v_hat is None else v_hat.get(n)
        out[n] = None if v is None else (v.to(device=p.device, dtype=p.dtype) + eps).rsqrt()
    return out


def _passage_key(ex: Example) -> tuple:
    """Identity of a proponent's step: its tokens and loss mask (the step does not depend on the query)."""
    return tuple(ex.input_ids), tuple(ex.loss_mask)


class _Stepper:
    """The machinery every tail-patch step shares: the model's detached weights, 1 / sqrt(v_hat + eps) (computed
    once), per-example gradients, stepped weights written into reused buffers and the re-score of queries under
    them. One proponent at a time (large models) runs plain autograd and a plain forward; several run vmapped."""

    def __init__(self, model: torch.nn.Module, step: Step):
        self.model, self.pad_id, self.device = model, step.pad_id, next(model.parameters()).device
        self.params = {n: p.detach() for n, p in model.named_parameters()}
        self.inv = inverse_sqrt_moments(model, step.v_hat, step.eps)
        self._grads = vmap(grad(lambda pr, ids, mask: _target_loss(model, pr, ids, mask)), in_dims=(None, 0, 0))
        self._score = vmap(lambda pr, ids, mask: _losses(model, pr, ids, mask))
        self._out: dict[str, torch.Tensor] = {}

    def gradients(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Per-example gradients of the summed loss, stacked [len(examples), *parameter shape]."""
        b = collate(list(examples), self.pad_id)
        ids, mask = b["input_ids"].to(self.device), b["loss_mask"].to(self.device)
        if len(examples) == 1:  # plain autograd: no vmap overhead for one (with reused buffers 1.08x per SmolLM2 step)
            leaves = {n: p.requires_grad_() for n, p in ((n, p.detach()) for n, p in self.params.items())}
            with torch.enable_grad():
                loss = _losses(self.model, leaves, ids, mask).sum()
                gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            return {n: (torch.zeros_like(p) if g is None else g)[None] for (n, p), g in zip(self.params.items(), gs)}
        return self._grads(self.params, ids, mask)

    def stepped(self, g: Mapping[str, torch.Tensor], lr: float) -> dict[str, torch.Tensor]:
        """theta - lr * g / sqrt(v_hat + eps) for each stacked gradient, written into buffers reused from step to
        step (a fresh parameter-sized allocation per step costs as much as the arithmetic); the model is
        untouched. The result is valid until the next call."""
        b = next(iter(g.values())).shape[0]
        out = {}
        for n, p in self.params.items():
            buf = self._out.get(n)
            if buf is None or buf.shape[0] < b:
                buf = self._out[n] = torch.empty((b, *p.shape), dtype=p.dtype, device=p.device)
            if self.inv[n] is not None:
                out[n] = torch.addcmul(p, g[n], self.inv[n], value=-lr, out=buf[:b])
            else:
                out[n] = torch.add(p, g[n], alpha=-lr, out=buf[:b])
        return out

    def first_order(self, gq: Mapping[str, torch.Tensor], g: Mapping[str, torch.Tensor]) -> list[float]:
        """grad L_q . g / sqrt(v_hat + eps) per stacked (query, passage) gradient pair: the first-order change
        of log p(target) per unit lr (the step moves theta by -lr u, and log p = -L_q)."""
        out = torch.zeros(next(iter(g.values())).shape[0], dtype=torch.float64, device=self.device)
        for n, gp in g.items():  # per parameter in its own dtype (a float64 copy of every gradient costs more)
            u = gp if self.inv[n] is None else gp * self.inv[n]
            out += torch.linalg.vecdot(gq[n].flatten(1), u.flatten(1)).double()
        return out.cpu().tolist()

    def _neg_losses(self, new: Mapping[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """-loss [weight sets, queries] of each weight set's queries: a plain forward for one weight set."""
        with torch.no_grad():
            if ids.shape[0] == 1:
                return -_losses(self.model, {n: t[0] for n, t in new.items()}, ids[0], mask[0])[None]
            return -self._score(new, ids, mask)

    def rescore(self, new: Mapping[str, torch.Tensor], rows: Sequence[Sequence[Example]]) -> list[list[float]]:
        """log p(target) of the queries of row b under stepped weight set b, `_QUERY_BATCH` queries of each row
        per forward; a short row repeats its last query in the padded slots (discarded)."""
        width = max(len(r) for r in rows)
        out: list[list[float]] = [[] for _ in rows]
        for c in range(0, width, _QUERY_BATCH):
            cols = range(c, min(c + _QUERY_BATCH, width))
            q = collate([row[min(t, len(row) - 1)] for row in rows for t in cols], self.pad_id)
            shape = (len(rows), len(cols), -1)
            lp = self._neg_losses(new, q["input_ids"].view(shape).to(self.device),
                                  q["loss_mask"].view(shape).to(self.device))
            for b, vals in enumerate(lp.double().cpu().tolist()):
                out[b] += vals[: max(0, min(len(rows[b]) - c, len(cols)))]
        return out


def target_logprobs(model: torch.nn.Module, queries: Sequence[Example], pad_id: int, batch: int = _QUERY_BATCH
                    ) -> list[float]:
    """log p(target | prompt) of every query (minus its summed target-token loss), through the same
    vmapped forward the tail-patch re-score uses, `batch` queries per forward."""
    params = {n: p.detach()[None] for n, p in model.named_parameters()}
    score = vmap(lambda pr, ids, mask: _losses(model, pr, ids, mask))
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.no_grad():
        for s in range(0, len(queries), batch):
            q = collate(list(queries[s:s + batch]), pad_id)
            out += [-float(x) for x in score(params, q["input_ids"][None].to(device), q["loss_mask"][None].to(device))[0]]
    return out


def batched_deltas(model: torch.nn.Module, queries: Sequence[Example], pairs: Sequence[tuple[int, Example]],
                   step: Step, base: Sequence[float] | None = None) -> list[float]:
    """Change in log p(target) of query i after one step theta - lr * g / sqrt(v_hat + eps) on the
    passage, for every (query index i, passage) pair.

    Grouped by passage: each distinct passage's step is computed once (one per-example gradient, `batch`
    passages per vmapped backward) and all its queries are re-scored under the stepped weights in one
    vmapped forward; the stepped weights are new tensors, the model's own are never modified. Passages
    are processed in order of their query count so a chunk pads few query slots. `base`: the queries'
    `target_logprobs`, when the caller has them.
    """
    batch = step.batch or _batch_size(model)
    st = _Stepper(model, step)
    base_t = target_logprobs(model, queries, step.pad_id) if base is None else list(base)
    groups: dict[tuple, tuple[Example, list[int]]] = {}
    for j, (_, ex) in enumerate(pairs):
        groups.setdefault(_passage_key(ex), (ex, []))[1].append(j)
    order = sorted(groups.values(), key=lambda g: len(g[1]))
    out = [0.0] * len(pairs)
    bar = tqdm(total=len(order), desc="tail-patch", unit="passage", disable=not step.progress or None,
               mininterval=2.0)
    for s in range(0, len(order), batch):
        chunk = order[s:s + batch]
        g = st.gradients([ex for ex, _ in chunk])
        new = st.stepped(g, step.lr)
        del g
        vals = st.rescore(new, [[queries[pairs[j][0]] for j in members] for _, members in chunk])
        for (_, members), row in zip(chunk, vals):
            for j, v in zip(members, row):
                out[j] = v - float(base_t[pairs[j][0]])
        bar.update(len(chunk))
    bar.close()
    return out


def pair_key(query: Example, passage: Example) -> str:
    """A stable id of one (query, proponent) step: their tokens and the query's target mask."""
    raw = json.dumps([query.input_ids, query.loss_mask, passage.input_ids]).encode()
    return hashlib.sha256(raw).hexdigest()[:24]


def pending_pairs(queries: Sequence[Example], proponents: Mapping[str, Sequence[Sequence[Example]]], kmax: int,
                  cache: Mapping[str, float]) -> dict[str, tuple[int, Example]]:
    """The distinct (query index, passage) pairs of every method's top `kmax` that `cache` does not hold, by
    `pair_key`, in first-seen order."""
    todo: dict[str, tuple[int, Example]] = {}
    for lists in proponents.values():
        for i, q in enumerate(queries):
            for ex in list(lists[i])[:kmax]:
                key = pair_key(q, ex)
                if key not in cache:
                    todo.setdefault(key, (i, ex))
    return todo


def tail_patch(model: torch.nn.Module, queries: Sequence[Example], proponents: Mapping[str, Sequence[Sequence[Example]]],
               step: Step, ks: Sequence[int], cache: MutableMapping[str, float] | None = None
               ) -> dict[str, dict[str, float]]:
    """Mean change in target log-prob / prob over the top-k proponents of each query, per method, and the
    standard error of the log-prob mean over the queries (`tail_patch_se@k`, with 2 queries or more).

    `proponents[method][i]` lists query i's proponents, best first (their passage examples).
    Each distinct (query, passage) pair is computed once and shared between methods, and each distinct
    passage's step once for all its queries (`batched_deltas`); with `cache`
    (pair_key -> log-prob change, for this model and step) known steps are reused and new
    ones added, so a rerun after a ranking change computes only the pairs it has not seen.
    """
    kmax = max(ks)
    cache = {} if cache is None else cache
    todo = pending_pairs(queries, proponents, kmax, cache)
    base = target_logprobs(model, queries, step.pad_id)
    if todo:
        fresh = batched_deltas(model, queries, list(todo.values()), step, base)
        cache.update(zip(todo, fresh))
    n = max(1, len(queries))
    out = {}
    for m, lists in proponents.items():
        per_query = {k: [0.0] * len(queries) for k in ks}
        prob = {k: 0.0 for k in ks}
        for i, q in enumerate(queries):
            deltas = [cache[pair_key(q, ex)] for ex in list(lists[i])[:kmax]]
            for k in ks:
                top = deltas[:k]
                if top:
                    per_query[k][i] = sum(top) / len(top)
                    prob[k] += sum(math.exp(base[i] + d) - math.exp(base[i]) for d in top) / len(top)
        out[m] = {**{f"tail_patch@{k}": sum(per_query[k]) / n for k in ks},
                  **{f"tail_patch_prob@{k}": prob[k] / n for k in ks}}
        if len(queries) >= 2:
            out[m].update({f"tail_patch_se@{k}": statistics.stdev(per_query[k]) / math.sqrt(len(queries)) for k in ks})
    return out


# The linearity probe's lr grid, largest first: 1e-2 down to 1e-9, two steps per decade (factor sqrt(10)).
LR_GRID = tuple(10.0 ** (-e / 2) for e in range(4, 19))
# An lr is linear when, in every group of probe pairs, the median of |measured - predicted| / |predicted| is at
# most the group's tolerance. Random passages are the control: a step on one must stay first-order (its
# first-order mean is ~0, so curvature is what would move the control off zero). A top proponent's step may
# saturate (the measured gain falls short of the prediction) without losing its meaning, up to half of it.
TOLERANCE = {"random": 0.2, "top": 0.5}
# The probe keeps its passages' gradients between its two passes up to this many bytes, else recomputes them.
_KEEP_BYTES = 1 << 30
# A predicted change below this many float epsilons (of the model's dtype, in nats) is numerical noise.
_NOISE_EPS = 100


@dataclass(frozen=True)
class Probe:
    """What the linearity probe measured: per grid lr (largest first) each group's median relative error of
    the measured change against its first-order prediction and the median predicted |change|; the lr chosen
    (None: no lr of the grid was linear), whether every step was dead (predicted change below the noise
    floor at every lr), and seconds per passage gradient and per (lr, pair) step-and-re-score."""

    grid: list[dict]
    chosen: float | None
    tolerance: Mapping[str, float]
    noise: float
    dead: bool
    pairs: int
    seconds_per_passage: float
    seconds_per_pair: float
    measured: dict[str, float] = field(default_factory=dict)  # pair_key -> change at `lr` (the probe's pairs)

    @property
    def lr(self) -> float:
        """The lr to step with: the chosen one, else the grid's lr of least error above the noise floor, else
        (a dead step) the grid's largest."""
        if self.chosen is not None:
            return self.chosen
        live = [r for r in self.grid if r["predicted"] >= self.noise and math.isfinite(r["error"])]
        return min(live, key=lambda r: r["error"])["lr"] if live else self.grid[0]["lr"]

    def tolerances(self) -> str:
        """The tolerances as text: `random 20 %, top 50 %`."""
        return ", ".join(f"{g} {t:.0%}" for g, t in self.tolerance.items())

    def reason(self) -> str | None:
        """Why the probe found no linear step (None when it did)."""
        if self.chosen is not None:
            return None
        if self.dead:
            return (f"dead step: the first-order change of every probe pair is below the noise floor "
                    f"({self.noise:.1e} nats) at every lr of the grid (no gradient reaches the targets)")
        if len(self.grid) == 1:
            r = self.grid[0]
            return (f"at lr {r['lr']:.3g} the probe steps' change differs from its first-order prediction by a median "
                    f"relative error of {r['error']:.3g} (of its tolerance; {self.tolerances()}): the step is not "
                    f"linear; "
                    f"eval.tail_patch_lr: auto picks one that is")
        errs = ", ".join(f"{r['lr']:.1e}: {r['error']:.3g}" for r in self.grid)
        return (f"no lr had every group's median relative error within its tolerance ({self.tolerances()}) against "
                f"the first-order prediction (largest share of a tolerance per lr: {errs})")


def _median(xs: Sequence[float]) -> float:
    """Median with NaN counted as +inf (a failed measurement never passes)."""
    return statistics.median([x if x == x else math.inf for x in xs]) if xs else math.inf


def _probe_row(lr: float, slopes: Sequence[float], measured: Sequence[float], labels: Sequence[str],
               tolerance: Mapping[str, float]) -> dict:
    """One grid lr's record: each group's median relative error, the largest of them as a share of its group's
    tolerance (`error`: at most 1 passes) and the median |prediction|."""
    pred = [lr * a for a in slopes]
    rel = [abs(m - p) / abs(p) if p else math.inf for m, p in zip(measured, pred)]
    groups = {g: _median([r for r, lab in zip(rel, labels) if lab == g]) for g in dict.fromkeys(labels)}
    return {"lr": lr, "error": max(e / _tolerance(tolerance, g) for g, e in groups.items()), "groups": groups,
            "predicted": statistics.median(abs(p) for p in pred)}


def _tolerance(tolerance: Mapping[str, float], group: str) -> float:
    """A group's tolerance; a group the mapping does not name gets the strictest."""
    return tolerance.get(group, min(tolerance.values()))


def _skip_reason(lr: float, slopes: Sequence[float], base: Sequence[float], labels: Sequence[str], noise: float,
                 tolerance: Mapping[str, float] = TOLERANCE) -> str | None:
    """Why grid lr cannot be chosen, known from the first-order slopes alone (no step needed), or None: its
    median predicted |change| is below the noise floor (the rule never picks such a step), or more than half of
    the top group's predicted gains exceed their headroom -log p / (1 - the group's tolerance): log p cannot rise
    above 0, so each such pair's measured gain falls short of its prediction by more than the tolerance, and so
    does the group's median."""
    if statistics.median(abs(lr * a) for a in slopes) < noise:
        return "predicted change below the noise floor"
    tol = _tolerance(tolerance, "top")
    top = [lr * a * (1 - tol) > -b for a, b, g in zip(slopes, base, labels) if g == "top"]
    if tol < 1 and top and sum(top) > len(top) // 2:
        return "first-order gain of most top pairs beyond their headroom to log p = 0 (over 1 - tolerance)"
    return None


def probe_linearity(model: torch.nn.Module, queries: Sequence[Example],
                    groups: Mapping[str, Sequence[tuple[int, Example]]], step: Step,
                    grid: Sequence[float] = LR_GRID, tolerance: Mapping[str, float] = TOLERANCE) -> Probe:
    """Measure, for each lr of `grid` (largest first), the exact change of log p(target) after one step on each
    probe (query index, passage) pair against its first-order prediction lr * grad L_q . g / sqrt(v_hat + eps),
    and choose the largest lr at which every group's median relative error is within its `tolerance` with a median
    prediction above the noise floor. Each passage's gradient is taken once for the whole grid (`step.lr` is
    not used); `groups` names sets of pairs (e.g. random passages, top proponents) checked separately. Grid lrs
    that the slopes alone rule out (`_skip_reason`) are not stepped (a grid of two or more; their row says why).
    The measured changes at the chosen lr are kept (`Probe.measured`, by `pair_key`) for tail-patch to reuse."""
    labels = [g for g, ps in groups.items() for _ in ps]
    pairs = [p for ps in groups.values() for p in ps]
    grid = sorted(grid, reverse=True)
    st = _Stepper(model, step)
    batch = max(1, (step.batch or _batch_size(model)) // 2)  # a passage's and a query's gradient at once
    base = target_logprobs(model, [queries[i] for i, _ in pairs], step.pad_id)
    noise = _NOISE_EPS * torch.finfo(next(model.parameters()).dtype).eps
    slopes: list[float] = []
    grad_t: list[tuple[float, int]] = []
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kept: dict[int, dict[str, torch.Tensor]] = {}  # the passages' gradients, when they fit in _KEEP_BYTES
    for s in range(0, len(pairs), batch):  # slopes first: they decide which lrs need a step at all
        idx = range(s, min(s + batch, len(pairs)))
        t0 = _clock(st.device)
        g = st.gradients([pairs[j][1] for j in idx])
        grad_t.append(((_clock(st.device) - t0) / len(idx), len(idx)))
        slopes += st.first_order(st.gradients([queries[pairs[j][0]] for j in idx]), g)
        if len(pairs) * n_bytes <= _KEEP_BYTES:
            kept[s] = g
        del g
    skip = {lr: _skip_reason(lr, slopes, base, labels, noise, tolerance) if len(grid) > 1 else None for lr in grid}
    stepped = [lr for lr in grid if skip[lr] is None]
    measured = {lr: [math.nan] * len(pairs) for lr in stepped}
    step_t: list[tuple[float, int]] = []
    if stepped:
        for s in range(0, len(pairs), batch):
            idx = range(s, min(s + batch, len(pairs)))
            g = kept.pop(s) if s in kept else st.gradients([pairs[j][1] for j in idx])
            t1 = _clock(st.device)
            for lr in stepped:
                vals = st.rescore(st.stepped(g, lr), [[queries[pairs[j][0]]] for j in idx])
                for j, row in zip(idx, vals):
                    measured[lr][j] = row[0] - base[j]
            step_t.append(((_clock(st.device) - t1) / (len(stepped) * len(idx)), len(idx)))
            del g
    rows = []
    for lr in grid:
        if skip[lr] is None:
            rows.append(_probe_row(lr, slopes, measured[lr], labels, tolerance))
        else:
            rows.append({**_probe_row(lr, slopes, [math.inf] * len(pairs), labels, tolerance), "skipped": skip[lr]})
    ok = [r["lr"] for r in rows if "skipped" not in r and r["predicted"] >= noise and r["error"] <= 1.0]
    warm = lambda t: statistics.median(x for x, _ in (t[1:] or t)) if t else math.nan  # noqa: E731 (1st: warm-up)
    probe = Probe(rows, ok[0] if ok else None, tolerance, noise, all(r["predicted"] < noise for r in rows),
                  len(pairs), warm(grad_t), warm(step_t) if step_t else warm(grad_t))
    if probe.lr in measured:
        probe.measured.update({pair_key(queries[i], ex): d for (i, ex), d in zip(pairs, measured[probe.lr])
                               if math.isfinite(d)})
    return probe


def _clock(device: torch.device) -> float:
    """A wall-clock reading after the device's queued work has finished (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# The guard: random proponents' mean change must be small next to the methods' and indistinguishable from 0.
GUARD_SHARE = 0.1
GUARD_Z = 2.0


def random_guard(tp: Mapping[str, Mapping[str, float]], k: int, baseline: str = "random") -> str | None:
    """Why the tail-patch figures at top-k are not trustworthy, or None: the `baseline` method's mean change is
    not finite, or it is both larger in magnitude than GUARD_SHARE x the largest |mean| of the other methods
    and more than GUARD_Z standard errors from zero (a step outside the linear regime moves the target
    whatever the passage). No baseline among the methods: None."""
    if baseline not in tp:
        return None
    key = f"tail_patch@{k}"
    r = tp[baseline][key]
    se = tp[baseline].get(f"tail_patch_se@{k}")
    others = [abs(v[key]) for m, v in tp.items() if m != baseline]
    if not all(math.isfinite(x) for x in [r, *others]):
        return f"a method's {key} is not finite: the step leaves the range the model can score"
    top = max(others, default=0.0)
    significant = se is None or abs(r) > GUARD_Z * se
    if abs(r) > GUARD_SHARE * top and significant:
        se_text = f" and {abs(r) / se:.1f} standard errors from 0" if se else ""
        return (f"{baseline} proponents' mean {key} is {r:+.4g}: {abs(r) / top if top else math.inf:.2f} x the "
                f"largest method's |mean| ({top:.4g}; limit {GUARD_SHARE}){se_text}: random passages move the "
                f"target too, so tail-patch cannot tell a method's proponents from them (a step outside the "
                f"linear regime, or a model that any corpus passage still improves)")
    return None
