"""This process's place in a torchrun job, its device and its process group, one way for `encode` and
`autocorrelation`: RANK, WORLD_SIZE and LOCAL_RANK from the environment torchrun sets (rank 0 of 1 without it),
the local rank's GPU (`cuda:LOCAL_RANK`, made the current CUDA device) or the CPU, and nccl on CUDA, gloo on
the CPU. The same on one node and on many (`torchrun --nnodes N`): LOCAL_RANK numbers the processes of a node.
torch is imported on use: `autocorrelation` needs it only under torchrun."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np


def backend(device: str) -> str:
    """The collective backend for tensors on `device` (`cpu`, `cuda:N`): nccl for CUDA, gloo for the CPU."""
    return "nccl" if device.startswith("cuda") else "gloo"


def rank_device(setting: str, local_rank: int) -> str:
    """The device of local rank `local_rank` for a device setting (auto | cpu | cuda; auto: CUDA when present):
    `cuda:<local_rank>`, made the current CUDA device (collectives and default allocations use it), or `cpu`."""
    if setting == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        if setting == "auto":
            return "cpu"
        raise RuntimeError("encode.device: cuda requested but no CUDA device is available")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but this node has {n} CUDA device(s): start at most {n} "
                           "processes per node (torchrun --nproc_per_node)")
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


@dataclass(frozen=True)
class Ranks:
    """This process's rank among `world`, its rank on its node and its device (rank 0 of 1 on the CPU by
    default). Collectives (`barrier`, `reduce`) do nothing with world 1; with more, they need `group()`."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @classmethod
    def from_env(cls, device: str = "auto") -> "Ranks":
        """The ranks torchrun gives this process and the device `device` picks for it (see `rank_device`)."""
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local,
                   rank_device(device, local))

    @contextmanager
    def group(self) -> Iterator["Ranks"]:
        """The job's process group (nccl on CUDA, gloo on the CPU) for the duration, torn down after, even on
        error; no group with world 1."""
        if self.world == 1:
            yield self
            return
        import torch.distributed as dist

        dist.init_process_group(backend(self.device), rank=self.rank, world_size=self.world)
        try:
            yield self
        finally:
            dist.destroy_process_group()

    def barrier(self) -> None:
        """Wait for every rank (nothing with world 1)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        if backend(self.device) == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def reduce(self, x: np.ndarray) -> np.ndarray:
        """The sum of x over the ranks, written into x when it is contiguous (x itself with world 1); on CUDA the
        sum travels through this rank's GPU."""
        if self.world == 1:
            return x
        import torch
        import torch.distributed as dist

        x = np.ascontiguousarray(x)
        t = torch.from_numpy(x).to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if self.device != "cpu":  # summed on the GPU: copy back
            x[...] = t.cpu().numpy()
        return x
