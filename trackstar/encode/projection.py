"""Seeded Gaussian projection matrices, regenerable from (seed, layer name, side) alone.

Entries are N(0, 1/k), drawn on the CPU with a generator seeded from a hash of the layer
name, so d and the values never depend on device, batch size or the set of other layers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from trackstar.encode.layers import Layer


def layer_seed(seed: int, name: str, side: str) -> int:
    """A 63-bit seed derived from the global seed, the module name and 'in'/'out'."""
    h = hashlib.sha256(f"{seed}:{name}:{side}".encode()).hexdigest()
    return int(h[:15], 16)


def projection_matrix(seed: int, name: str, side: str, k: int, n: int) -> torch.Tensor:
    """P (k x n) with entries N(0, 1/k); float32 on the CPU."""
    g = torch.Generator(device="cpu").manual_seed(layer_seed(seed, name, side))
    return torch.randn((k, n), generator=g, dtype=torch.float32) / k**0.5


def project_dense(grad: torch.Tensor, p_out: torch.Tensor, p_in: torch.Tensor) -> torch.Tensor:
    """vec(P_out G P_in^T) for a full (n_out x n_in) gradient G: the reference for the hook path."""
    return (p_out @ grad.to(p_out.dtype) @ p_in.T).reshape(-1)


@dataclass(frozen=True)
class Projection:
    """The seeded Kronecker projection of the encoded layers: each layer's (out, in) gradient G to the k x k
    block P_out G P_in^T, the blocks side by side (d = k^2 x layers)."""

    layers: list[Layer]
    k: int
    seed: int

    @property
    def d(self) -> int:
        return self.k * self.k * len(self.layers)

    def matrices(self, device: torch.device | str = "cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (P_out, P_in), moved to `device`."""
        return {l.name: (projection_matrix(self.seed, l.name, "out", self.k, l.n_out).to(device),
                         projection_matrix(self.seed, l.name, "in", self.k, l.n_in).to(device)) for l in self.layers}
