"""The params.yaml schema: one pydantic model per section, unknown keys and bad values refused.

Each DVC stage reads only its own sections, so an edit invalidates exactly what depends on it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trackstar.errors import ConfigError
from trackstar.methods import RUNGS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    """Where the corpus and queries come from: the generated fact world or the user's files."""

    source: Literal["generate", "files"] = "generate"
    corpus: str = "inputs/data/corpus.jsonl"  # read when source == files
    queries: str = "inputs/data/queries.jsonl"
    seed: int = 0
    entities: int = Field(200, ge=2)
    relations: int = Field(4, ge=1)
    paraphrases: int = Field(3, ge=1)
    question_fraction: float = Field(0.5, ge=0.0, le=1.0)
    distractors_per_entity: int = Field(2, ge=0)
    confusers_per_entity: int = Field(2, ge=0)
    confuser_true_value: float = Field(0.75, ge=0.0, le=1.0)
    near_miss_fraction: float = Field(0.3, ge=0.0, le=0.5)
    contradicted: float = Field(1.0, ge=0.0, le=1.0)
    digests: float = Field(0.1, ge=0.0, le=1.0)  # two-fact passages about question-trained entities, per other passage
    query_wording: Literal["held_out", "training"] = "training"  # queries' question: one no passage uses, or the Q/A one
    text_column: str = Field("text", min_length=1)  # field / column holding the passage (files: jsonl, parquet, arrow)
    id_column: str = Field("id", min_length=1)  # field / column holding the passage id
    shards: dict[str, str] = {}  # name -> file under inputs/data/: more corpus, one encode_shard@<name> stage each

    @model_validator(mode="after")
    def _shards(self) -> "DataParams":
        for name, path in self.shards.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(f"data.shards: name {name!r} must be letters, digits, '_', '.', '-' (it names a stage)")
            if not str(Path(path)).startswith("inputs/data/"):
                raise ValueError(f"data.shards.{name}: {path!r} must lie under inputs/data/ (the data stage's input)")
        if self.shards and self.source != "files":
            raise ValueError("data.shards needs data.source: files (the generated world is one corpus)")
        return self


class ModelParams(_Section):
    """The checkpoint: trained in the pipeline (source=train), a user's checkpoint taken as is
    (source=checkpoint) or fine-tuned on the corpus (source=finetune); `checkpoint` is an HF
    checkpoint directory or a GGUF file."""

    source: Literal["train", "checkpoint", "finetune"] = "train"
    checkpoint: str = "inputs/checkpoint"  # directory or .gguf file (source checkpoint / finetune)
    vocab_size: int = Field(1024, ge=64)
    hidden_size: int = Field(128, ge=8)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    intermediate_size: int = Field(512, ge=8)
    max_length: int = Field(64, ge=8)
    tie_embeddings: bool = False


class TrainParams(_Section):
    seed: int = 0
    epochs: int = Field(54, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)


class GradientsParams(_Section):
    """Which layers' weight gradients are encoded (nn.Linear / GPT-2 Conv1D modules)."""

    include: str = ".*"  # regex on module names
    exclude: str = "^$"  # regex on module names
    include_lm_head: bool = True
    max_length: int = Field(64, ge=4)
    truncation: Literal["truncate", "refuse"] = "truncate"


class CorrectionParams(_Section):
    """Optimizer second-moment correction g / sqrt(v + eps) (docs/method.md, step 2)."""

    kind: Literal["adam_rank1", "adam", "estimated", "none"] = "adam_rank1"
    eps: float = Field(1e-8, gt=0)
    estimate_samples: int = Field(256, ge=1)  # passages for kind=estimated
    seed: int = 0


class ProjectionParams(_Section):
    """Per-layer Kronecker projection to k x k; d = k^2 x number of layers."""

    k: int = Field(16, ge=1)
    seed: int = 0
    d: int = Field(0, ge=0)  # total d asked for: k = floor(sqrt(d / modules)); 0 = use k

    def k_for(self, modules: int) -> int:
        """k for this many encoded modules: `k`, or the largest k with k^2 x modules <= `d` when d > 0."""
        if not self.d:
            return self.k
        k = math.isqrt(self.d // modules)  # = floor(sqrt(d / modules)), exact in integers
        if k < 1:
            raise param_error("projection.d", f"{self.d} is below one column per encoded module ({modules} modules); "
                              f"use at least {modules} or set 0 to use projection.k")
        return k


class EncodeParams(_Section):
    batch_size: int = Field(32, ge=1)
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    chunk_mb: float = Field(32.0, gt=0)
    compressor: Literal["none", "zstd", "blosc"] = "none"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    autocast: Literal["auto", "off", "bf16"] = "auto"  # the forward/backward in bf16 (auto: on CUDA only)
    save_plain: bool = True  # also store uncorrected projections (ladder rungs dot/cosine)


class HessianParams(_Section):
    mix_k: int = Field(100, ge=1)  # eigen-crossing component (1-based), ~1.5 % of d
    lambda_: Optional[float] = Field(None, alias="lambda", ge=0.0, le=1.0)
    damping: Union[Literal["auto"], Annotated[float, Field(ge=0)]] = "auto"  # auto: Ledoit-Wolf shrinkage
    structure: Literal["auto", "full", "layer", "module"] = "auto"  # R's diagonal blocks (trackstar.plan)
    memory_gb: float = Field(8.0, gt=0)  # GiB the structure must fit; a param, not read from the machine
    train_sample: int = Field(0, ge=0)  # 0 = all training rows

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class IndexParams(_Section):
    kind: Literal["flat", "ivf_flat", "ivf_pq", "pq"] = "flat"
    nlist: int = Field(64, ge=1)
    nprobe: int = Field(8, ge=1)
    pq_m: int = Field(64, ge=1)
    pq_bits: int = Field(8, ge=1, le=16)
    opq: bool = False
    pca: int = Field(0, ge=0)  # PCA to this many dims in front of the index (0 = off; the passages' rank = lossless)
    rerank: int = Field(0, ge=0)  # ANN candidates rescored exactly from the store (0 = off)
    train_sample: int = Field(100_000, ge=1)
    seed: int = 0
    on_disk: bool = False  # IVF inverted lists in a memory-mapped file (indexes larger than RAM); checked
    # against `kind` by the index stage only, so that stages which do not read it never fail on it


class RetrieveParams(_Section):
    """Proponents/opponents per query; MRR is computed within these k, so keep k well above 10."""

    k: int = Field(100, ge=1)
    methods: list[Literal[tuple(RUNGS)]] = list(RUNGS)  # ladder rungs (trackstar.methods)
    query_batch: int = Field(1024, ge=1)


class Bm25Params(_Section):
    k: int = Field(100, ge=1)
    k1: float = Field(1.5, ge=0)
    b: float = Field(0.75, ge=0, le=1)


class EvalParams(_Section):
    """Attribution metrics and tail-patch (docs/evaluation.md): lr `auto` is the largest lr of a grid at which a
    probe's steps match their first-order prediction; queries `auto` is up to 100, fewer when the time
    estimated from the probe exceeds `tail_patch_budget_s`."""

    tail_patch_lr: Union[Literal["auto"], Annotated[float, Field(gt=0, allow_inf_nan=False)]] = "auto"
    tail_patch_ks: list[Annotated[int, Field(ge=1)]] = Field([1, 10], min_length=1)
    tail_patch_queries: Union[Literal["auto"], Annotated[int, Field(ge=0)]] = "auto"  # 0 = skip tail-patch
    tail_patch_budget_s: float = Field(300.0, gt=0, allow_inf_nan=False)  # seconds `auto` queries aim to fit
    seed: int = 0
    dev_fraction: float = Field(0.5, ge=0.0, le=1.0)  # queries (by entity) whose metrics choose settings

    @field_validator("tail_patch_lr", mode="before")
    @classmethod
    def _lr(cls, v: object) -> object:
        return _auto_or_number(v, "a number > 0", float, lambda x: x > 0)

    @field_validator("tail_patch_queries", mode="before")
    @classmethod
    def _queries(cls, v: object) -> object:
        return _auto_or_number(v, "a whole number >= 0 (0 skips tail-patch)", int, lambda x: x >= 0)


def _auto_or_number(v: object, what: str, kind: type, ok: Callable[[float], bool]) -> object:
    """'auto', or a number (YAML may give it as a string) of `kind` that `ok` accepts; one clear message
    otherwise (booleans, lists and a fractional count refused)."""
    if v == "auto":
        return v
    try:
        x = float(v) if isinstance(v, (int, float, str)) and not isinstance(v, bool) else math.nan
    except ValueError:
        x = math.nan
    if not math.isfinite(x) or (kind is int and not x.is_integer()) or not ok(x):
        raise ValueError(f"must be 'auto' or {what}")
    return kind(x)


class Params(_Section):
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    gradients: GradientsParams = GradientsParams()
    correction: CorrectionParams = CorrectionParams()
    projection: ProjectionParams = ProjectionParams()
    encode: EncodeParams = EncodeParams()
    hessian: HessianParams = HessianParams()
    index: IndexParams = IndexParams()
    retrieve: RetrieveParams = RetrieveParams()
    bm25: Bm25Params = Bm25Params()
    eval: EvalParams = EvalParams()

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        if self.model.source == "train" and self.model.hidden_size % self.model.heads:
            raise ValueError("model.hidden_size must be divisible by model.heads")
        return self


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return [f.alias or n for n, f in model.model_fields.items()]


def _line_of(text: str | None, loc: tuple) -> int | None:
    """1-based line of a dotted key in the YAML text (None if not found)."""
    if not text:
        return None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if k.value == str(part):
                line, node = k.start_mark.line + 1, v
                break
        else:
            break
    return line


def parse_params(raw: dict, path: str = "params.yaml", text: str | None = None) -> Params:
    """Validate a params mapping; errors name the file, line, dotted key and the valid choices."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            line = _line_of(text, err["loc"])
            where = f"{path}:{line}" if line else path
            if err["type"] == "extra_forbidden":
                valid = ", ".join(_valid_keys(Params, err["loc"]))
                lines.append(f"{where}: unknown key '{key}' (valid keys here: {valid})")
            else:
                lines.append(f"{where}: field '{key}': {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("\n".join(lines)) from None


def param_error(dotted: str, message: str, path: str | Path = "params.yaml") -> ConfigError:
    """A ConfigError naming the file, the line of a dotted key and the key, for checks made by a stage."""
    path = Path(path)
    line = _line_of(path.read_text(encoding="utf-8") if path.exists() else None, tuple(dotted.split(".")))
    return ConfigError(f"{path}{f':{line}' if line else ''}: field '{dotted}': {message}")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml (a missing file means all defaults)."""
    path = Path(path)
    if not path.exists():
        return Params()
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {exc}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return parse_params(raw, str(path), text)
