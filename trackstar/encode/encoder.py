"""The configured gradient encoder: checkpoint + layer selection + correction + projection.

One object used by the encode stage, the trace CLI and tests, so a query is encoded exactly the
same way everywhere, and the attrs it records let consumers refuse mismatched artifacts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from trackstar.model.checkpoint import (
    checkpoint_dtype,
    checkpoint_hash,
    context_length,
    load_checkpoint,
    load_second_moments,
    pick_device,
    weights_dtype,
)
from trackstar.config import CorrectionParams, EncodeParams, GradientsParams, Params, ProjectionParams, param_error
from trackstar.encode.correction import Correction, build_correction
from trackstar.data.records import iter_corpus, read_queries
from trackstar.encode.writer import encode_chunk
from trackstar.errors import InputError
from trackstar.data.examples import Example, pad_token_id, passage_example, query_example
from trackstar.encode.gradients import HookProjector
from trackstar.encode.layers import find_layers, layout
from trackstar.encode.moments import MOMENTS_FILE, read_moments

log = logging.getLogger(__name__)


class Encoder:
    def __init__(self, model_dir: str | Path, gradients: GradientsParams, correction: CorrectionParams,
                 projection: ProjectionParams, encode: EncodeParams, moments: str | Path | None = None,
                 params_file: str | Path = "params.yaml"):
        self.model_dir = Path(model_dir)
        self.g, self.c, self.p, self.e = gradients, correction, projection, encode
        self.device = pick_device(encode.device)
        dtype = weights_dtype(checkpoint_dtype(self.model_dir), self.device)
        self.model, self.tok = load_checkpoint(self.model_dir, self.device, dtype)
        ctx = context_length(self.model)
        if ctx is not None and gradients.max_length > ctx:
            raise param_error("gradients.max_length", f"{gradients.max_length} exceeds the context of the model in "
                              f"{self.model_dir} ({ctx} positions)", params_file)
        self.pad_id = pad_token_id(self.tok)
        self.layers = find_layers(self.model, gradients.include, gradients.exclude, gradients.include_lm_head)
        self.p = projection.model_copy(update={"k": projection.k_for(len(self.layers))})  # projection.d -> k
        self.d = self.p.k ** 2 * len(self.layers)
        self.ckpt_hash = checkpoint_hash(self.model_dir)
        self.autocast = torch.bfloat16 if self.device.type == "cuda" else None
        self.correction = self._correction(moments)
        self.truncated = 0

    @classmethod
    def from_params(cls, params: Params, root: Path = Path(".")) -> "Encoder":
        """The encoder of the pipeline at `root`: its model/, its moments file and its params.yaml (for errors)."""
        root = Path(root)
        return cls(root / "model", params.gradients, params.correction, params.projection, params.encode,
                   moments=root / MOMENTS_FILE, params_file=root / "params.yaml")

    def _correction(self, moments_file: str | Path | None) -> Correction:
        kind = self.c.kind
        if kind == "estimated":
            if moments_file is None:
                raise ValueError("correction.kind: estimated needs the moments file of the `moments` stage")
            moments = read_moments(moments_file, self.ckpt_hash)
            return build_correction("estimated", self.layers, moments, self.c.eps, checkpoint=str(moments_file))
        state = load_second_moments(self.model_dir) if kind in ("adam", "adam_rank1") else None
        moments = state[0] if state else None
        return build_correction(kind, self.layers, moments, self.c.eps, checkpoint=str(self.model_dir))

    @property
    def k(self) -> int:
        """The per-layer projection size (k x k per layer), from projection.k or projection.d."""
        return self.p.k

    @property
    def attrs(self) -> dict:
        """What a store made by this encoder records (and what readers check)."""
        return {"d": self.d, "k": self.p.k, "projection_seed": self.p.seed, "correction": self.c.kind,
                "checkpoint_hash": self.ckpt_hash, "layout": layout(self.layers, self.p.k),
                "config": {"gradients": self.g.model_dump(), "correction": self.c.model_dump(),
                           "projection": self.p.model_dump()}}

    def _check(self, ex: Example, path, line: int, field: str = "text") -> Example:
        if ex.truncated:
            if self.g.truncation == "refuse":
                raise InputError(str(path), f"longer than gradients.max_length={self.g.max_length} tokens "
                                 "(set gradients.truncation: truncate to cut it)", line=line, field=field)
            self.truncated += 1
        return ex

    def passages(self, path) -> Iterator[Example]:
        for i, p in enumerate(iter_corpus(path)):
            yield self._check(passage_example(self.tok, p.text, self.g.max_length), path, i + 1)

    def queries(self, path) -> Iterator[Example]:
        for i, q in enumerate(read_queries(path)):
            try:
                ex = query_example(self.tok, q.prompt, q.target, self.g.max_length)
            except ValueError as e:  # a target is never truncated: it tokenizes to nothing or does not fit
                why = ("tokenizes to nothing" if "nothing" in str(e) else
                       f"does not fit in gradients.max_length={self.g.max_length} tokens (targets are never truncated)")
                raise InputError(str(path), why, line=i + 1, field="target") from None
            yield self._check(ex, path, i + 1, field="prompt")

    def query_example(self, prompt: str, target: str) -> Example:
        return query_example(self.tok, prompt, target, self.g.max_length)

    def encode_query(self, prompt: str, target: str) -> np.ndarray:
        """The corrected row, shape (1, d) float32, of one query; an InputError naming `target` when the target
        tokenizes to nothing or does not fit gradients.max_length."""
        try:
            ex = self.query_example(prompt, target)
        except ValueError as e:
            raise InputError("query", str(e), field="target") from None
        return self.encode([ex])[0]

    def encode(self, examples: list[Example]) -> tuple[np.ndarray, np.ndarray]:
        """(corrected, plain) rows for a small list of examples (the trace CLI, tests)."""
        projector = None if self.correction.exact else HookProjector(
            self.model, self.layers, self.p.k, self.p.seed, self.correction, plain=True, device=self.device)
        if projector is None:
            return encode_chunk(self.model, examples, None, self.layers, self.p.k, self.p.seed, self.correction,
                                self.e.batch_size, self.pad_id)
        with projector.attached():
            return encode_chunk(self.model, examples, projector, self.layers, self.p.k, self.p.seed,
                                self.correction, self.e.batch_size, self.pad_id, self.autocast)
