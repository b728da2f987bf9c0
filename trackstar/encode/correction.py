"""Optimizer second-moment correction g / sqrt(v + eps) (docs/method.md, step 2).

`adam` is exact and element-wise (reference path only); `adam_rank1` replaces each layer's v
by its Adafactor rank-1 fit v ~ r c^T / mean(r), which turns the correction into a row scaling
of output-gradients and a column scaling of layer inputs (the fast hook path); `estimated`
uses the mean squared per-example gradient over a corpus sample in place of Adam's v;
`none` skips it. Never silently skipped: asking for Adam without optimizer state is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trackstar.errors import TrackStarError
from trackstar.encode.layers import Layer


@dataclass
class Correction:
    kind: str  # adam_rank1 | adam | estimated | none
    eps: float
    v: dict[str, torch.Tensor] | None = None  # per layer name, (out, in) orientation, bias-corrected
    scales: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer: (s_out, s_in)

    @property
    def exact(self) -> bool:
        """True when the correction must be applied element-wise (reference path)."""
        return self.kind == "adam"


def rank1_scales(v: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Row/column scalings s_out, s_in with s_out_i s_in_j = 1/sqrt(r_i c_j / mean(r)), r, c = means of v + eps."""
    v = v.double() + eps
    return scales_from_means(v.mean(dim=1), v.mean(dim=0))


def scales_from_means(r: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-1 scalings from the row means r and column means c of v + eps (the factored form)."""
    r, c = r.double(), c.double()
    s_out = (r.mean() / r).sqrt()
    s_in = c.rsqrt()
    return s_out.float(), s_in.float()


def apply_exact(grad: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """Element-wise g / sqrt(v + eps)."""
    return grad / (v + eps).sqrt()


def apply_rank1(grad: torch.Tensor, s_out: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
    """The rank-1 (factored) correction of a full (out, in) gradient: diag(s_out) G diag(s_in)."""
    return s_out[:, None] * grad * s_in[None, :]


def layer_moments(layers: list[Layer], moments: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pick each layer's v from a {parameter name: v} mapping, in (out, in) orientation."""
    out = {}
    for layer in layers:
        if layer.param_name not in moments:
            raise TrackStarError(
                f"optimizer state has no second moments for parameter '{layer.param_name}' (layer {layer.name}); "
                "use correction.kind: estimated or none")
        out[layer.name] = layer.weight_grad_out_in(moments[layer.param_name]).float()
    return out


def build_correction(kind: str, layers: list[Layer], moments: dict[str, torch.Tensor] | None, eps: float,
                     checkpoint: str = "the checkpoint") -> Correction:
    """Assemble the correction for the selected layers; refuses Adam kinds without optimizer state."""
    if kind == "none":
        return Correction(kind, eps)
    if moments is None:
        raise TrackStarError(
            f"correction.kind: {kind} needs the optimizer's second moments, but {checkpoint} has no "
            "optimizer_state.safetensors; set correction.kind: estimated (mean squared gradient over a "
            "corpus sample) or none")
    if kind == "estimated":  # factored moments: {parameter: (row means, column means)}, (out, in) orientation
        missing = [l.param_name for l in layers if l.param_name not in moments]
        if missing:
            raise TrackStarError(f"{checkpoint} has no estimated moments for parameter '{missing[0]}'; "
                                 "run `dvc repro` first")
        return Correction(kind, eps, scales={l.name: scales_from_means(moments[l.param_name][0] + eps,
                                                                       moments[l.param_name][1] + eps)
                                             for l in layers})
    v = layer_moments(layers, moments)
    scales = {name: rank1_scales(t, eps) for name, t in v.items()}
    return Correction(kind, eps, v=v, scales=scales)
