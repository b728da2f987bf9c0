"""Checkpoint directories: HF model + tokenizer, plus the final AdamW second moments.

A model source (`model.checkpoint`) is either such a directory or a GGUF file (llama.cpp's
format, e.g. SmolLM2's Q4 file); a GGUF is dequantized to fp32 by transformers and written out
as a normal directory by the `train` stage, so every later stage loads a directory.

Layout of a checkpoint written by `save_checkpoint`:
    config.json, model.safetensors, tokenizer files   (save_pretrained)
    optimizer_state.safetensors   exp_avg_sq per parameter, keyed by model.named_parameters() name
    optimizer_state.json          {"step", "lr", "betas", "eps", "weight_decay", "kind": "adamw"}
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from trackstar.atomic import atomic_dir
from trackstar.config import param_error
from trackstar.errors import InputError

OPT_TENSORS = "optimizer_state.safetensors"
OPT_META = "optimizer_state.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class _quiet_hf:
    """Silence transformers' own per-file progress bars (shard writing / weight loading)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._log = hf_logging
        self._was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        if self._was:
            self._log.enable_progress_bar()


def save_checkpoint(model, tokenizer, optimizer, out_dir) -> Path:
    """Atomically write model, tokenizer and (when given) AdamW second moments to out_dir."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        with _quiet_hf():
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        if optimizer is not None:
            tensors, meta = _adam_state(model, optimizer)
            save_file(tensors, str(tmp / OPT_TENSORS))
            (tmp / OPT_META).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out_dir)


def _adam_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise TypeError(f"only Adam/AdamW optimizer state is supported, got {type(optimizer).__name__}")
    group_of = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            group_of[id(p)] = g
    tensors: dict[str, torch.Tensor] = {}
    steps = set()
    for name, p in model.named_parameters():
        st = optimizer.state.get(p)
        if not st or "exp_avg_sq" not in st:
            raise ValueError(f"optimizer has no second-moment state for parameter {name!r} (never stepped?)")
        tensors[name] = st["exp_avg_sq"].detach().to("cpu", torch.float32).contiguous().clone()
        steps.add(int(st["step"]))
    if len(steps) != 1:
        raise ValueError(f"parameters were stepped a different number of times: {sorted(steps)}")
    g = optimizer.param_groups[0]
    if any(tuple(gg["betas"]) != tuple(g["betas"]) for gg in optimizer.param_groups):
        raise ValueError("param groups with different betas are not supported")
    meta = {
        "kind": "adamw" if isinstance(optimizer, torch.optim.AdamW) else "adam",
        "step": steps.pop(),
        "lr": float(g.get("last_used_lr", g["lr"])),
        "betas": [float(b) for b in g["betas"]],
        "eps": float(g["eps"]),
        "weight_decay": float(g["weight_decay"]),
    }
    return tensors, meta


def _check_dir(d) -> Path:
    p = Path(d)
    if not p.exists():
        raise InputError(str(d), "checkpoint directory does not exist")
    if not p.is_dir():
        raise InputError(str(d), "is not a directory (expected a checkpoint directory)")
    if not (p / "config.json").is_file():
        ggufs = sorted(f.name for f in p.glob("*.gguf"))
        hint = f" (to use the GGUF file, set model.checkpoint to {p / ggufs[0]})" if ggufs else ""
        raise InputError(str(d), f"not a checkpoint: config.json is missing{hint}")
    if not _weight_files(p):
        raise InputError(str(d), "not a checkpoint: no weight file (model.safetensors / pytorch_model.bin)")
    return p


def pick_device(name: str) -> torch.device:
    """The torch device for `encode.device` (auto: CUDA when present)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("encode.device: cuda requested but no CUDA device is available")
    return torch.device(name)


def weights_dtype(config_dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """The dtype to load weights in: bf16 checkpoints stay bf16 on a GPU (half the memory, the
    dtype they were trained in); everything else, and anything on CPU, is fp32."""
    if isinstance(config_dtype, str):
        config_dtype = getattr(torch, config_dtype.replace("torch.", ""), None)
    if torch.device(device).type == "cuda" and config_dtype == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def checkpoint_dtype(d) -> torch.dtype | None:
    """The dtype a checkpoint directory's config.json declares (`dtype` / `torch_dtype`), if any."""
    p = _check_dir(d)
    try:
        conf = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(str(p / "config.json"), f"corrupt JSON: {e}") from None
    name = conf.get("dtype", conf.get("torch_dtype")) if isinstance(conf, dict) else None
    return getattr(torch, str(name).replace("torch.", ""), None) if name else None


def context_length(model) -> int | None:
    """The longest sequence the model's position encoding supports (max_position_embeddings / n_positions)."""
    conf = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        v = getattr(conf, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


GGUF_MAGIC = b"GGUF"


def load_gguf(path, dtype=torch.float32):
    """Load (model, tokenizer) from a GGUF file (dequantized by transformers); model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    p = Path(path)
    if not p.is_file():
        raise InputError(str(path), "GGUF file does not exist")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise InputError(str(path), f"not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}); "
                         "model.checkpoint must be a checkpoint directory or a .gguf file")
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise InputError(str(path), "reading a GGUF file needs the `gguf` package (pip install gguf)") from None
    kw = {"gguf_file": p.name, "local_files_only": True}
    try:
        tok = AutoTokenizer.from_pretrained(str(p.parent), **kw)
    except Exception as e:  # noqa: BLE001 - surfaced as a clear input error
        raise InputError(str(path), f"cannot build the tokenizer from this GGUF: {type(e).__name__}: {e}") from None
    try:
        with _quiet_hf():
            # every weight unpacked into plain nn.Linear / embedding tensors (no packed GGUF modules)
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), dtype=dtype,
                                                         quantization_config=GgufConfig(dequantize=True), **kw)
    except Exception as e:  # noqa: BLE001
        raise InputError(str(path), f"cannot load the model from this GGUF: {type(e).__name__}: {e}") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # dense now: save_pretrained must write it as a plain checkpoint
        quantizer.remove_quantization_config(model)
    model.eval()
    return model, tok


def load_source(path, device="cpu", dtype=torch.float32):
    """Load (model, tokenizer) from a model source: a checkpoint directory or a GGUF file."""
    if Path(path).is_file():  # a source that is a file must be a GGUF
        model, tok = load_gguf(path, dtype)
        return model.to(device), tok
    return load_checkpoint(path, device, dtype)


def load_checkpoint(d, device="cpu", dtype=torch.float32):
    """Load (model, tokenizer) from a local checkpoint directory; model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = _check_dir(d)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - surfaced as a clear input error
        raise InputError(str(d), f"cannot load the tokenizer: {type(e).__name__}: {e}") from None
    try:
        with _quiet_hf():
            model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise InputError(str(d), f"cannot load the model: {type(e).__name__}: {e}") from None
    model.to(device)
    model.eval()
    return model, tok


def load_for_gradients(d, device: str, max_length: int, params_file: str | Path = "params.yaml"
                       ) -> tuple[torch.nn.Module, object, torch.device]:
    """(model, tokenizer, device) of the checkpoint in `d` on `encode.device`, in its weights dtype; refuses a
    gradients.max_length beyond the model's context (named in `params_file`)."""
    dev = pick_device(device)
    model, tok = load_checkpoint(d, dev, weights_dtype(checkpoint_dtype(d), dev))
    ctx = context_length(model)
    if ctx is not None and max_length > ctx:
        raise param_error("gradients.max_length", f"{max_length} exceeds the context of the model in {d} "
                          f"({ctx} positions)", params_file)
    return model, tok, dev


def load_second_moments(d) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Bias-corrected second moments v̂ = exp_avg_sq / (1 - beta2**step) by parameter name.

    Returns None when the checkpoint holds no optimizer state.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = _check_dir(d)
    tf, mf = p / OPT_TENSORS, p / OPT_META
    if not tf.exists() and not mf.exists():
        return None
    if not (tf.exists() and mf.exists()):
        missing = OPT_TENSORS if not tf.exists() else OPT_META
        raise InputError(str(p / missing), "missing (the optimizer state needs both files)")
    try:
        meta = json.loads(mf.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(str(mf), f"corrupt optimizer metadata: {e}") from None
    if not isinstance(meta, dict):
        raise InputError(str(mf), "expected a JSON object")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise InputError(str(mf), f"must be a positive integer, got {step!r}", field="step")
    betas = meta.get("betas")
    if (
        not isinstance(betas, list)
        or len(betas) != 2
        or not all(isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
    ):
        raise InputError(str(mf), f"must be two numbers in [0, 1), got {betas!r}", field="betas")
    if meta.get("kind") not in ("adamw", "adam"):
        raise InputError(str(mf), f"unsupported optimizer kind {meta.get('kind')!r}", field="kind")
    try:
        raw = load_file(str(tf))
    except Exception as e:  # noqa: BLE001
        raise InputError(str(tf), f"corrupt safetensors file: {type(e).__name__}: {e}") from None

    # every moment must match a weight of the same name and shape
    shapes: dict[str, tuple[int, ...]] = {}
    for wf in _weight_files(p):
        if wf.suffix == ".safetensors":
            try:
                with safe_open(str(wf), framework="pt") as f:
                    for k in f.keys():
                        shapes[k] = tuple(f.get_slice(k).get_shape())
            except Exception as e:  # noqa: BLE001
                raise InputError(str(wf), f"corrupt weight file: {type(e).__name__}: {e}") from None
    denom = 1.0 - float(betas[1]) ** step
    if denom <= 0 or not math.isfinite(denom):
        raise InputError(str(mf), "bias correction 1 - beta2**step is not positive", field="betas")
    out: dict[str, torch.Tensor] = {}
    for name, v in raw.items():
        if shapes and name not in shapes:
            raise InputError(str(tf), f"moment {name!r} has no matching model weight (mismatched checkpoint)")
        if shapes and tuple(v.shape) != shapes[name]:
            raise InputError(
                str(tf), f"moment {name!r} has shape {tuple(v.shape)}, the weight has {shapes[name]} (mismatched)"
            )
        if not torch.isfinite(v).all() or (v < 0).any():
            raise InputError(str(tf), f"moment {name!r} has negative or non-finite values")
        out[name] = v.float() / denom
    if not out:
        raise InputError(str(tf), "holds no tensors")
    return out, meta


def _weight_files(p: Path) -> list[Path]:
    files = [
        f
        for f in p.iterdir()
        if f.is_file()
        and (f.name in _WEIGHT_INDEXES or (f.suffix in _WEIGHT_SUFFIXES and f.name != OPT_TENSORS))
        and not f.name.startswith("training_args")
    ]
    return sorted(files, key=lambda f: f.name)


def checkpoint_hash(d) -> str:
    """sha256 over config.json, the weight files, tokenizer.json and the optimizer files (sorted by name)."""
    p = _check_dir(d)
    names = {f.name for f in _weight_files(p)} | {"config.json"}
    for extra in (OPT_TENSORS, OPT_META, "tokenizer.json"):
        if (p / extra).is_file():
            names.add(extra)
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode() + b"\0")
        with open(p / name, "rb") as f:
            while True:
                block = f.read(1 << 20)
                if not block:
                    break
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()
