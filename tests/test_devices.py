"""Each torchrun rank takes its own device and the backend that fits it, without a GPU: the environment torchrun
sets (RANK, WORLD_SIZE, LOCAL_RANK) and torch.cuda are faked, and what the ranks, the encoder and the process group
would do is recorded. And the hook path's projections stay fp32 under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.tiny import random_examples, tiny_llama
from trackstar.data.examples import collate
from trackstar.distributed import Ranks, backend
from trackstar.encode.encoder import autocast_dtype
from trackstar.encode.gradients import HookProjector
from trackstar.encode.layers import find_layers
from trackstar.encode.projection import Projection


@pytest.fixture
def gpus(monkeypatch):
    """A node with 2 fake CUDA devices; returns the devices set current, in order."""
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def torchrun_env(monkeypatch, rank: int, world: int, local: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local))


@pytest.mark.parametrize("setting", ["auto", "cuda"])
def test_each_rank_takes_its_local_gpu_and_nccl(monkeypatch, gpus, setting):
    # rank 3 of 4 = the second process of the second node (2 nodes x 2 GPUs)
    torchrun_env(monkeypatch, rank=3, world=4, local=1)
    ranks = Ranks.from_env(setting)
    assert ranks == Ranks(rank=3, world=4, local_rank=1, device="cuda:1")
    assert gpus == [1]  # made the current device: collectives and default allocations use cuda:1
    assert backend(ranks.device) == "nccl"


def test_cpu_setting_or_no_gpu_gives_the_cpu_and_gloo(monkeypatch, gpus):
    torchrun_env(monkeypatch, rank=1, world=2, local=1)
    assert Ranks.from_env("cpu") == Ranks(1, 2, 1, "cpu") and gpus == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ranks = Ranks.from_env("auto")
    assert ranks.device == "cpu" and backend(ranks.device) == "gloo" and gpus == []
    with pytest.raises(RuntimeError, match="encode.device: cuda requested"):
        Ranks.from_env("cuda")


def test_more_processes_than_gpus_on_a_node_is_refused(monkeypatch, gpus):
    torchrun_env(monkeypatch, rank=2, world=3, local=2)
    with pytest.raises(RuntimeError, match="LOCAL_RANK=2 but this node has 2 CUDA"):
        Ranks.from_env("auto")


def test_without_torchrun_one_process_and_no_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("no group with world 1"))
    ranks = Ranks.from_env("auto")
    assert ranks == Ranks()
    x = torch.arange(3.0).numpy()
    with ranks.group():
        ranks.barrier()
        assert ranks.reduce(x) is x


def test_group_uses_the_devices_backend(monkeypatch, gpus):
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda b, **k: calls.append(("init", b, k)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    monkeypatch.setattr(dist, "barrier", lambda **k: calls.append(("barrier", k)))
    torchrun_env(monkeypatch, rank=1, world=2, local=1)
    with Ranks.from_env("auto").group() as ranks:
        ranks.barrier()
    with Ranks.from_env("cpu").group() as ranks:
        ranks.barrier()
    assert calls == [("init", "nccl", {"rank": 1, "world_size": 2}), ("barrier", {"device_ids": [1]}), ("destroy",),
                     ("init", "gloo", {"rank": 1, "world_size": 2}), ("barrier", {}), ("destroy",)]


def test_encoder_loads_the_model_on_its_ranks_device(monkeypatch, gpus):
    """The encoder (encode stage, trace, serve) asks for cuda:LOCAL_RANK, not cuda:0."""
    from trackstar.config import Params
    from trackstar.encode import encoder

    asked = []

    def load(model_dir, device, *args):
        asked.append(device)
        raise StopIteration  # the device is all this test needs

    monkeypatch.setattr(encoder, "load_for_gradients", load)
    torchrun_env(monkeypatch, rank=1, world=2, local=1)
    with pytest.raises(StopIteration):
        encoder.Encoder(Params(), "model", "moments")
    assert asked == ["cuda:1"]


def test_autocast_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 1)
    assert autocast_dtype("auto", cuda) == torch.bfloat16 and autocast_dtype("auto", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("off", cuda) is None and autocast_dtype("off", cpu) is None


def test_bf16_autocast_projects_in_fp32():
    """Under bf16 autocast (CPU here) the forward hook's input-side projection is not cast to bf16: the rows
    are fp32 and within bf16's forward/backward rounding of the fp32 rows."""
    model = tiny_llama()
    proj = HookProjector(model, Projection(find_layers(model), 4, 0), None, plain=False)
    batch = collate(random_examples(6), 0)
    with proj.attached():
        want, _ = proj.encode_batch(batch, None)
        got, _ = proj.encode_batch(batch, torch.bfloat16)
    assert got.dtype == torch.float32
    err = float((got - want).norm() / want.norm())
    assert 0 < err < 0.02, err  # bf16 did run (not bit-equal), and only the model's own passes are rounded

