"""Seeded Gaussian projection matrices, regenerable from (seed, layer name, side) alone.

Entries are N(0, 1/k), drawn on the CPU with a generator seeded from a hash of the layer
name, so d and the values never depend on device, batch size or the set of other layers.
"""

from __future__ import annotations

import hashlib

import torch


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
