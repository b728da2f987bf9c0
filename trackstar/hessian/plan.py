"""The memory plan: the Hessian's block structure chosen from a fixed memory budget, and what each stage holds.

R is kept as diagonal blocks of the d columns: `full` (one d x d block), `layer` (the modules of one
transformer block together, found from module names: the prefix up to the first numeric part, e.g.
`model.layers.12`) or `module` (one k^2 block per module). `auto` picks the coarsest structure whose
estimated peak resident memory fits `hessian.memory_gb`. The estimate counts what the stages allocate:

- autocorrelation: float64 accumulators for R_train's blocks (8 b^2 bytes each) and for R_eval's blocks no
  wider than the number of queries m (the only ones eigen decomposes), one store chunk read (four
  chunk-sized buffers: measured) plus its float64 block slice, one write slab;
- eigen: float32 eigenvectors of every block (4 b^2), LAPACK's float32 workspace for the largest block
  (8 b^2), R_eval's factors (4 b min(m, b)), and the float64 eigensolve of the largest block no wider than
  m (40 b^2: the block, its eigenvectors, workspace and the product);
- whitening (precondition, ladder): the eigenvectors, the low-rank factors, the query rows and chunk buffers;

each plus the interpreter with numpy/scipy/zarr loaded (`BASE_BYTES`, measured by
benchmarks/hessian_memory.py, which also checks the estimates against measured peak RSS). The budget is a
parameter, not read from the machine, so the same params give the same structure everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from trackstar.config import EncodeParams, HessianParams, param_error

STRUCTURES = ("full", "layer", "module")  # coarsest first: auto takes the first that fits
BASE_BYTES = 112 << 20  # python + numpy + scipy + zarr resident: 76-90 MB measured (benchmarks/hessian_memory.py)
_SLAB_BYTES = 64 << 20  # the stats writer's cast slab (trackstar.tensorfile._SLAB_BYTES)
_ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
GIB = 1 << 30


def layer_key(name: str) -> str:
    """The transformer block a module belongs to: its name up to the first numeric part
    (`model.layers.12.mlp.up_proj` -> `model.layers.12`); a name without one is its own group (`lm_head`)."""
    m = re.match(r"^(.*?(?:^|\.)\d+)(?:\.|$)", name)
    return m.group(1) if m else name


def structure_blocks(layout: list[dict], structure: str) -> list[tuple[int, int]]:
    """The diagonal blocks [start, stop) of a structure over an encoding's column layout (module order)."""
    if structure == "full":
        return [(layout[0]["start"], layout[-1]["stop"])]
    if structure == "module":
        return [(m["start"], m["stop"]) for m in layout]
    if structure != "layer":
        raise ValueError(f"unknown Hessian structure {structure!r}")
    out, key = [], None
    for m in layout:  # consecutive modules of one transformer block form one block
        k = layer_key(m["name"])
        if out and k == key and out[-1][1] == m["start"]:
            out[-1] = (out[-1][0], m["stop"])
        else:
            out.append((m["start"], m["stop"]))
        key = k
    return out


@dataclass(frozen=True)
class Candidate:
    """One structure's blocks and the estimated peak resident bytes of the stages that hold R."""
    structure: str
    blocks: list[tuple[int, int]]
    autocorrelation: int
    eigen: int
    whitening: int

    @property
    def peak(self) -> int:
        return max(self.autocorrelation, self.eigen, self.whitening)

    @property
    def peak_stage(self) -> str:
        return max(("autocorrelation", "eigen", "whitening"), key=lambda s: getattr(self, s))

    @property
    def sizes(self) -> list[int]:
        return [b - a for a, b in self.blocks]

    def record(self) -> dict:
        """What hessian.json records: the structure, its block sizes and the estimated peak bytes."""
        sizes = self.sizes
        return {"structure": self.structure, "blocks": len(sizes), "block_sizes": sorted(set(sizes)),
                "largest_block": max(sizes), "estimated_peak_bytes": {
                    "autocorrelation": self.autocorrelation, "eigen": self.eigen, "whitening": self.whitening}}


def estimate(structure: str, blocks: list[tuple[int, int]], n_query: int, chunk_rows_train: int,
             chunk_rows_query: int) -> Candidate:
    """Estimated peak resident bytes of autocorrelation, eigen and whitening for these blocks (module docstring)."""
    sizes = [b - a for a, b in blocks]
    d, bmax, m = sum(sizes), max(sizes), n_query
    sq = sum(b * b for b in sizes)
    eval_sizes = [b for b in sizes if b <= m]  # blocks whose R_eval is accumulated and decomposed
    low_rank = sum(b * min(m, b) for b in sizes)

    def stream(rows: int) -> int:  # a chunk read: ~4 chunk-sized buffers measured (file bytes, zarr's buffer,
        return 4 * rows * d * 4 + rows * bmax * 8  # the float32 rows, allocator slack) + one block's float64 slice

    auto = (BASE_BYTES + 8 * sq + 8 * sum(b * b for b in eval_sizes)
            + max(stream(chunk_rows_train), stream(chunk_rows_query)) + min(_SLAB_BYTES, 4 * bmax * bmax))
    held = 4 * sq + 8 * d
    eigen = BASE_BYTES + held + max(8 * bmax * bmax,
                                    4 * low_rank + stream(chunk_rows_query),
                                    4 * low_rank + 40 * max(eval_sizes, default=0) ** 2)
    white = BASE_BYTES + held + 8 * low_rank + 4 * m * d + stream(chunk_rows_train) + chunk_rows_train * d * 4
    return Candidate(structure, blocks, int(auto), int(eigen), int(white))


def _fmt(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass
class Plan:
    """d, the structure that will be used (None if none fits) and the bytes each stage needs."""
    d: int
    k: int
    modules: int
    n_train: int
    n_query: int
    structure: str  # as asked: auto | full | layer | module
    budget: int
    candidates: list[Candidate]
    chosen: Candidate | None
    raw_bytes: int  # encodings/raw stores on disk
    final_bytes: int  # encodings/final stores on disk
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        """The plan as a table for stderr."""
        lines = [f"memory plan: d = {self.d:,} = {self.modules} modules x k^2 (k = {self.k}); "
                 f"{self.n_train:,} training rows, {self.n_query:,} queries; hessian.structure = {self.structure}, "
                 f"hessian.memory_gb = {self.budget / GIB:g}",
                 f"  {'structure':<10}{'blocks':>8}{'largest':>9}{'autocorrelation':>17}{'eigen':>11}"
                 f"{'whitening':>11}  fits"]
        for c in self.candidates:
            mark = " <- used" if c is self.chosen else ""
            lines.append(f"  {c.structure:<10}{len(c.blocks):>8}{max(c.sizes):>9,}{_fmt(c.autocorrelation):>17}"
                         f"{_fmt(c.eigen):>11}{_fmt(c.whitening):>11}  {'yes' if c.peak <= self.budget else 'no'}{mark}")
        lines.append(f"  encodings on disk: raw {_fmt(self.raw_bytes)}, final {_fmt(self.final_bytes)}")
        if self.chosen is None:
            lines.append("  no structure fits the budget: " + self._why())
        return "\n".join(lines + [f"  {n}" for n in self.notes])

    def _why(self) -> str:
        finest = self.candidates[-1]
        if self.structure == "auto":
            return (f"even per-module blocks ({len(finest.blocks)} blocks of up to {max(finest.sizes):,} columns) "
                    f"need {_fmt(finest.peak)} ({finest.peak_stage}) at d = {self.d:,}, more than "
                    f"{self.budget / GIB:g} GiB; raise hessian.memory_gb or lower projection.k / projection.d")
        c = next(c for c in self.candidates if c.structure == self.structure)
        fits = [x.structure for x in self.candidates if x.peak <= self.budget]
        return (f"'{self.structure}' needs {_fmt(c.peak)} ({c.peak_stage}) at d = {self.d:,}, more than "
                f"hessian.memory_gb = {self.budget / GIB:g} GiB; "
                + (f"use auto (it picks {fits[0]}) or " if fits else "") + "raise hessian.memory_gb")

    def require(self, path: str = "params.yaml") -> Candidate:
        """The chosen structure, or a ConfigError naming the params.yaml field and line at fault."""
        if self.chosen is None:
            raise param_error("hessian.memory_gb" if self.structure == "auto" else "hessian.structure",
                              self._why(), path)
        return self.chosen

    def record(self) -> dict:
        return {**(self.chosen.record() if self.chosen else {}), "memory_gb": self.budget / GIB}


def plan(layout: list[dict], n_train: int, n_query: int, hessian: HessianParams, encode: EncodeParams) -> Plan:
    """The memory plan for an encoding layout (store attrs `layout`), the row counts and the params."""
    from trackstar.store import chunk_rows_for  # here, not at the top: the `hessian` stage imports this module without zarr

    d = layout[-1]["stop"] - layout[0]["start"]
    k = round((layout[0]["stop"] - layout[0]["start"]) ** 0.5)
    rows = [chunk_rows_for(d, encode.dtype, encode.chunk_mb, max(1, n)) for n in (n_train, n_query)]
    budget = int(hessian.memory_gb * GIB)
    cands = [estimate(s, structure_blocks(layout, s), n_query, rows[0], rows[1]) for s in STRUCTURES]
    asked = STRUCTURES if hessian.structure == "auto" else (hessian.structure,)
    chosen = next((c for c in cands if c.structure in asked and c.peak <= budget), None)
    item = _ITEMSIZE[encode.dtype]
    n = n_train + n_query
    return Plan(d, k, len(layout), n_train, n_query, hessian.structure, budget, cands, chosen,
                n * d * item * (2 if encode.save_plain else 1), n * d * item)
