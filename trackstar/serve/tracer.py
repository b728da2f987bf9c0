"""A loaded-once tracer: the pipeline's encoder, whitening, index (for `flat`, the final store, streamed per
trace), BM25 and passage lookup, kept in memory so that each trace costs one query encode and one search, not
a reload of everything.

`trackstar trace` builds one for a single answer and `trackstar serve` keeps one for its lifetime, so both
give the same ids and scores. Artifacts that do not match params.yaml and model/ are refused at load,
naming the file and the attribute, as the pipeline's stages refuse them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from trackstar import layout
from trackstar.config import Params, load_params
from trackstar.data.records import Query, corpus_files, iter_corpus
from trackstar.data.rows import PassageText
from trackstar.errors import ArtifactMismatch, InputError
from trackstar.methods import RUNGS
from trackstar.retrieval.results import Hits, make_result, valid_hits

BASE_METHODS = ("trackstar", "bm25")
MAX_ANSWER_TOKENS = 16  # a greedy answer stops at end-of-text, a newline or this many tokens
REQUEST = "request"  # the "file" an InputError about a trace request names


@dataclass(frozen=True)
class TraceRequest:
    """One trace: a prompt, the continuation whose loss is traced (None: the model's greedy answer), k, a method."""

    prompt: str
    target: str | None = None
    k: int = 10
    method: str = "trackstar"


@dataclass
class Traced:
    """A trace's record, in the retrieval files' format (plus `method`, and `prediction` when the target
    was the model's greedy answer), and the seconds each step took."""

    record: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def check_attrs(store: Any, want: dict[str, Any], keys: Sequence[str]) -> None:
    """Refuse a store whose attrs differ from the encoder's on `keys` (checkpoint, d, encoding config)."""
    for key in keys:
        if not _same(store.attrs.get(key), want[key]):
            raise ArtifactMismatch(f"{store.path}: '{key}' differs from the current params.yaml/model "
                                   f"(stored {str(store.attrs.get(key))[:80]!r}); run `dvc repro` first")


class Tracer:
    """Everything a trace needs, loaded once from a built pipeline at `root`; `methods` limits what is
    loaded (default: trackstar, bm25 and the ladder rungs of params.yaml retrieve.methods)."""

    def __init__(self, root: str | Path = ".", methods: Sequence[str] | None = None):
        self.root = Path(root)
        self.params: Params = load_params(self.root / "params.yaml")
        rungs = [m for m in self.params.retrieve.methods if m in RUNGS]
        self.methods = list(methods) if methods is not None else [*BASE_METHODS, *rungs]
        unknown = [m for m in self.methods if m not in (*BASE_METHODS, *RUNGS)]
        if unknown:
            raise InputError(REQUEST, f"unknown method {unknown[0]!r} (choose from "
                             f"{', '.join((*BASE_METHODS, *RUNGS))})", field="method")
        files = corpus_files(self.root / layout.DATA)
        self.passages = PassageText(files)
        self.enc = None
        if any(m != "bm25" for m in self.methods):
            self._load_encoder()
        if "trackstar" in self.methods:
            self._load_trackstar()
        self.rungs = {m: self._load_rung(m) for m in self.methods if m in RUNGS}
        self.bm25 = None
        if "bm25" in self.methods:
            from trackstar.retrieval.bm25 import BM25Index

            self.bm25 = BM25Index(((p.id, p.text) for p in iter_corpus(files)), self.params.bm25.k1, self.params.bm25.b)

    # ------------------------------------------------------------------ loading
    def _load_encoder(self) -> None:
        from trackstar.encode.encoder import Encoder
        from trackstar.runner import flush_denormals

        flush_denormals()  # torch is loaded now: encode exactly as the encode stage does
        self.enc = Encoder.from_params(self.params, self.root)

    def _load_trackstar(self) -> None:
        from trackstar.hessian.whitening import load_whitening
        from trackstar.retrieval.searcher import Searcher
        from trackstar.store import StoreReader

        final = StoreReader(layout.final_store("train", self.root))
        check_attrs(final, self.enc.attrs, ("checkpoint_hash", "d", "config"))
        self._check_rows(final)
        w_path = layout.at(layout.W_MIX, self.root)
        self.w_mix, wmeta = load_whitening(w_path, layout.at(layout.EIGEN, self.root))
        if wmeta["whitening_id"] != final.attrs["whitening_id"]:
            raise ArtifactMismatch(f"{w_path}: whitening {wmeta['whitening_id']} is not the one {final.path} was "
                                   "preconditioned with; run `dvc repro` first")
        self.searcher = Searcher(final, self.params, self.root)  # flat: the final store, streamed per trace

    def _load_rung(self, rung: str):
        """The raw corpus store of a rung's array (read per trace, never held) and W_train for r_train."""
        from trackstar.retrieval.ladder import train_whitening_of
        from trackstar.store import ConcatReader

        train = ConcatReader(layout.corpus_stores(self.params.data.shards, self.root), RUNGS[rung].array)
        for part in train.parts:
            check_attrs(part, self.enc.attrs, ("checkpoint_hash", "d", "config"))
        self._check_rows(train)
        return train, train_whitening_of(self.params, self.root) if RUNGS[rung].whitened else None

    def _check_rows(self, store: Any) -> None:
        if store.n != len(self.passages):
            raise ArtifactMismatch(f"{store.path}: {store.n} rows but the corpus ({', '.join(map(str, self.passages.files))}) "
                                   f"has {len(self.passages)} passages; run `dvc repro` first")

    # ------------------------------------------------------------------ requests
    @property
    def max_length(self) -> int:
        return self.params.gradients.max_length

    def check(self, req: TraceRequest) -> None:
        """Refuse (InputError naming the field) an unknown method, or a prompt and target that do not fit
        gradients.max_length tokens whole: the server refuses where the pipeline would cut the prompt."""
        if req.method not in self.methods:
            raise InputError(REQUEST, f"{req.method!r} is not served here (methods: {', '.join(self.methods)})",
                             field="method")
        if self.enc is None:
            return
        tok = self.enc.tok
        bos = 1 if getattr(tok, "bos_token_id", None) is not None else 0
        n_prompt = len(tok(req.prompt, add_special_tokens=False)["input_ids"])
        if req.target is None:
            n_target = 1  # at least one answer token must fit
        else:
            n_target = len(tok(req.target, add_special_tokens=False)["input_ids"])
            if n_target == 0:
                raise InputError(REQUEST, "tokenizes to nothing", field="target")
            if bos + n_target + 1 > self.max_length:
                raise InputError(REQUEST, f"{n_target} tokens: gradients.max_length={self.max_length} leaves no "
                                 "room for a prompt token beside them", field="target")
        if bos + n_prompt + n_target > self.max_length:
            raise InputError(REQUEST, f"{n_prompt} tokens with the target's {n_target}: more than "
                             f"gradients.max_length={self.max_length} (shorten it; it is never cut here)", field="prompt")

    def trace(self, req: TraceRequest) -> Traced:
        """Top (and, for gradient methods, bottom) k passages of one request, with their texts (no length check:
        the prompt is cut as the pipeline cuts it)."""
        done = self.trace_many([req], check=False)[0]
        if isinstance(done, Exception):
            raise done
        return done

    def trace_many(self, reqs: Sequence[TraceRequest], check: bool = True) -> list[Traced | Exception]:
        """Each request's trace (after `check` when asked), or the exception it raised (the others are still
        answered). TrackStar requests
        asking for the same k share one search: a `flat` index is one pass over the final store for all
        of them instead of one each (the pass is most of a trace's time on a large store)."""
        out: list[Traced | Exception | None] = [None] * len(reqs)
        batched: dict[int, list[tuple[int, TraceRequest, str, dict, dict, np.ndarray]]] = {}
        for i, req in enumerate(reqs):
            try:
                if check:
                    self.check(req)
                seconds: dict[str, float] = {}
                extra: dict[str, Any] = {"method": req.method}
                target = self._target(req, seconds, extra)
                if req.method == "trackstar":
                    batched.setdefault(req.k, []).append((i, req, target, extra, seconds,
                                                          self._trackstar_query(req.prompt, target, seconds)))
                    continue
                if req.method == "bm25":
                    t0 = time.perf_counter()
                    rows, scores = self.bm25.search(req.prompt + target, req.k)
                    seconds["search"] = time.perf_counter() - t0
                    top, bottom = (rows, scores), (np.empty(0, dtype=np.int64), np.empty(0))
                else:
                    top, bottom = self._rung_search(req, target, seconds)
                out[i] = self._record(req, target, extra, seconds, top, bottom)
            except Exception as e:  # noqa: BLE001 - one request's failure is its own answer
                out[i] = e
        for k, group in batched.items():
            try:
                t0 = time.perf_counter()
                ts, ti, bs, bi = self.searcher.search(np.concatenate([g[5] for g in group]), k)
                took = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001
                for g in group:
                    out[g[0]] = e
                continue
            for j, (i, req, target, extra, seconds, _) in enumerate(group):
                seconds["search"] = took
                if len(group) > 1:
                    seconds["batch"] = len(group)
                (s, r), (bs_j, bi_j) = valid_hits(ts[j], ti[j]), valid_hits(bs[j], bi[j])
                try:
                    out[i] = self._record(req, target, extra, seconds, (r, s), (bi_j, bs_j))
                except Exception as e:  # noqa: BLE001
                    out[i] = e
        return out  # type: ignore[return-value]

    def _target(self, req: TraceRequest, seconds: dict[str, float], extra: dict[str, Any]) -> str:
        """The request's target, or the model's greedy answer (recorded as `prediction`) when it gave none."""
        if req.target is not None:
            return req.target
        t0 = time.perf_counter()
        target = extra["prediction"] = self.greedy_answer(req.prompt)
        seconds["answer"] = time.perf_counter() - t0
        if not target.strip():
            raise InputError(REQUEST, f"the model's greedy answer {target!r} is empty: give a target", field="target")
        return target

    def _record(self, req: TraceRequest, target: str, extra: dict[str, Any], seconds: dict[str, float],
                top: tuple[np.ndarray, np.ndarray], bottom: tuple[np.ndarray, np.ndarray]) -> Traced:
        """The trace's record from (rows, scores) of its top and bottom hits, their texts looked up."""
        t0 = time.perf_counter()
        found = self.passages.get(np.concatenate([top[0], bottom[0]]).tolist())
        texts = {p.id: p.text for p in found.values()}
        record = make_result(Query("trace", req.prompt, target), Hits([found[int(r)].id for r in top[0]], top[1]),
                             texts, Hits([found[int(r)].id for r in bottom[0]], bottom[1]), **extra).to_json()
        seconds["text"] = time.perf_counter() - t0
        return Traced(record, seconds)

    def _encode(self, prompt: str, target: str, seconds: dict[str, float]):
        """(corrected, plain) gradient encodings of the query example, [1, d] each."""
        t0 = time.perf_counter()
        try:
            example = self.enc.query_example(prompt, target)
        except ValueError as e:  # a target that tokenizes to nothing or does not fit
            raise InputError(REQUEST, str(e), field="target") from None
        g, plain = self.enc.encode([example])
        seconds["encode"] = time.perf_counter() - t0
        return g, plain

    def _trackstar_query(self, prompt: str, target: str, seconds: dict[str, float]) -> np.ndarray:
        """The whitened, unit-norm query row [1, d] that TrackStar searches with."""
        from trackstar.hessian.whitening import whiten

        g, _ = self._encode(prompt, target, seconds)
        t0 = time.perf_counter()
        q = whiten(g, self.w_mix, normalize=True)
        seconds["whiten"] = time.perf_counter() - t0
        return q

    def _rung_search(self, req: TraceRequest, target: str, seconds: dict[str, float]):
        """((top rows, scores), (bottom rows, scores)) of a ladder rung."""
        from trackstar.retrieval.ladder import rung_search

        g, plain = self._encode(req.prompt, target, seconds)
        t0 = time.perf_counter()
        train, w = self.rungs[req.method]
        ts, ti, bs, bi = rung_search(req.method, plain if RUNGS[req.method].array == "g_plain" else g, train, w, req.k)
        seconds["search"] = time.perf_counter() - t0
        (ts, ti), (bs, bi) = valid_hits(ts[0], ti[0]), valid_hits(bs[0], bi[0])
        return (ti, ts), (bi, bs)

    def greedy_answer(self, prompt: str) -> str:
        """The model's greedy continuation of the prompt, up to end-of-text, a newline or MAX_ANSWER_TOKENS
        tokens (and gradients.max_length in all), without the end-of-text token."""
        import torch

        tok, model = self.enc.tok, self.enc.model
        bos = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []
        ids = bos + tok(prompt, add_special_tokens=False)["input_ids"][-(self.max_length - len(bos) - 1):]
        eos = getattr(tok, "eos_token_id", None)
        new: list[int] = []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                while len(new) < MAX_ANSWER_TOKENS and len(ids) + len(new) < self.max_length:
                    x = torch.tensor([ids + new], device=self.enc.device)
                    nxt = int(model(input_ids=x).logits[0, -1].argmax())
                    if nxt == eos or "\n" in tok.decode([nxt]):
                        break
                    new.append(nxt)
        finally:
            model.train(was_training)
        return tok.decode(new)

    def info(self) -> dict[str, Any]:
        """What the server tells the viewer: methods, limits, sizes."""
        return {"methods": self.methods, "max_length": self.max_length, "passages": len(self.passages),
                "d": self.enc.d if self.enc is not None else None,
                "checkpoint_hash": self.enc.ckpt_hash if self.enc is not None else None}
