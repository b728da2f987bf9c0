"""Discovery of the weight matrices whose gradients are encoded.

Every `nn.Linear` and GPT-2 `Conv1D` in the model (Llama, Qwen, GPT-NeoX, OLMo, GPT-2, ...)
selected by include/exclude regexes; the output head optionally. Each layer is described in
(out, in) orientation: G = sum_t delta_t a_t^T has shape (n_out, n_in) for both kinds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

try:  # transformers keeps GPT-2's Conv1D here
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]


@dataclass(frozen=True)
class Layer:
    name: str  # module name
    param_name: str  # name of its weight in model.named_parameters() (differs when tied)
    kind: str  # "linear" | "conv1d"
    n_out: int
    n_in: int

    def weight_grad_out_in(self, grad: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor in (out, in) orientation (Conv1D stores (in, out))."""
        return grad.T if self.kind == "conv1d" else grad


def output_head_name(model: nn.Module) -> str | None:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is None:
        return None
    for name, mod in model.named_modules():
        if mod is emb:
            return name
    return None


def find_layers(model: nn.Module, include: str = ".*", exclude: str = "^$", include_lm_head: bool = True) -> list[Layer]:
    """The encoded layers, in module order; refuses a selection that is empty."""
    head = output_head_name(model)
    param_names = {id(p): n for n, p in model.named_parameters()}
    inc, exc = re.compile(include), re.compile(exclude)
    layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            kind, n_out, n_in = "linear", mod.out_features, mod.in_features
        elif Conv1D and isinstance(mod, Conv1D):
            kind, (n_in, n_out) = "conv1d", mod.weight.shape
        else:
            continue
        if name == head:
            if not include_lm_head:
                continue
        elif not inc.search(name) or exc.search(name):
            continue
        layers.append(Layer(name, param_names[id(mod.weight)], kind, int(n_out), int(n_in)))
    if not layers:
        raise ValueError(f"no nn.Linear/Conv1D layer matches include={include!r} exclude={exclude!r}")
    return layers


def layout(layers: list[Layer], k: int) -> list[dict]:
    """The column layout of an encoding: each layer's name and [start, stop) columns."""
    out, start = [], 0
    for layer in layers:
        out.append({"name": layer.name, "start": start, "stop": start + k * k, "n_out": layer.n_out, "n_in": layer.n_in})
        start += k * k
    return out
