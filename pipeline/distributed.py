"""Data-parallel plumbing shared by the training loops torchrun may start (robust training, DDPM and EDM).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them (a plain `python -m ...`) every helper here is
the single-process identity, so the same code path runs on a laptop CPU and on 8 GPUs. Backends: nccl
on CUDA, gloo on CPU (the tests run two gloo ranks on one machine).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline import models


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    flags: Any = None    # gloo group for host-side agreements under nccl (None: the default group)

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """The number of ranks torchrun started (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 when not launched by torchrun), readable before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group if launched by torchrun (gloo on CPU, nccl on GPU); pick the device."""
    world = world_size()
    device = models.resolve_device(device_name)
    if world == 1:
        return Dist(), device
    ctx = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":  # host flags go through gloo: an nccl all-reduce read back would sync the GPU
        ctx = dataclasses.replace(ctx, flags=dist.new_group(backend="gloo"))
    return ctx, device


def agree_all(values: list[float], ctx: Dist, op: str = "max") -> list[float]:
    """Host numbers each reduced (max or min) over the ranks in one collective, on CPU tensors through gloo,
    so reading them back never waits for the GPU."""
    if ctx.world_size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN, group=ctx.flags)
    return [float(v) for v in tensor]


def agree(value: float, ctx: Dist, op: str = "max") -> float:
    """One host number reduced (max or min) over the ranks."""
    return agree_all([value], ctx, op)[0]


def any_rank(flags: list[bool], ctx: Dist) -> list[bool]:
    """Each flag OR-ed over the ranks, in one collective. Every rank must agree on a SIGTERM or a divergence,
    or one would checkpoint (or stop) and leave while the others wait forever in the next collective."""
    return [bool(v) for v in agree_all([float(f) for f in flags], ctx)]


def sigterm_on_any_rank(received: bool, ctx: Dist) -> bool:
    """Whether any rank has received SIGTERM."""
    return any_rank([received], ctx)[0]


def rank_share(n: int, ctx: Dist) -> slice:
    """The contiguous part of n items rank `ctx.rank` handles (sizes differ by at most one)."""
    return slice(ctx.rank * n // ctx.world_size, (ctx.rank + 1) * n // ctx.world_size)


def barrier(ctx: Dist) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def finish() -> None:
    """Leave the process group (after a last barrier, so no rank exits while another still writes)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
