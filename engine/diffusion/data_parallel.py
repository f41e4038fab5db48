"""One subject trained by several processes (one GPU each) with DistributedDataParallel: joining and leaving the
process group (gloo on CPU, nccl on CUDA), and the few collectives the training step adds to DDP's own.

No Ray here: whoever starts the processes (the fleet, a test's spawn) tells each its rank and where rank 0 listens.
Every wait is finite: a rank that never arrives fails `join` after `join_timeout`, and a collective whose peer is
gone fails after `collective_timeout` (gloo fails at once when a peer process dies or leaves the group).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

# Every rank is started at the same moment, on a worker whose model is already loaded.
JOIN_TIMEOUT = timedelta(minutes=2)
# Longer than the longest work rank 0 does alone while the others wait at the next collective: a checkpoint or the
# export of a full fine-tune to object storage.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)

_device: torch.device | None = None  # where this process's collectives run: the CUDA device for nccl, else the CPU


class PeerFailedError(RuntimeError):
    """Another rank of the group failed, or left it; this rank stopped with it."""


def free_port() -> int:
    """A TCP port free on this host now, for rank 0 to listen on."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def join(
    rank: int,
    world_size: int,
    address: str,
    port: int,
    device: torch.device,
    join_timeout: timedelta = JOIN_TIMEOUT,
    collective_timeout: timedelta = COLLECTIVE_TIMEOUT,
) -> None:
    """Join the process group of `world_size` ranks whose rank 0 listens on `address:port` (rank 0 opens it)."""
    global _device
    if dist.is_initialized():
        raise RuntimeError("this process is already in a process group; leave() it first")
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        backend, _device = "nccl", torch.device("cuda", index)
        torch.cuda.set_device(_device)
    else:
        backend, _device = "gloo", torch.device("cpu")
    try:
        store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=join_timeout,
                              wait_for_workers=False)  # fmt: skip
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=collective_timeout)
    except RuntimeError as err:  # DistNetworkError, DistStoreError: a rank that never came, a port taken
        raise PeerFailedError(f"rank {rank} of {world_size} could not join at {address}:{port}: {err}") from err


def leave() -> None:
    """Leave the process group (if in one); the process can join another afterwards."""
    global _device
    if dist.is_initialized():
        dist.destroy_process_group()
    _device = None


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the group's size; (0, 1) outside a group."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    """`tensor` reduced over every rank (a copy on this process's collective device, same dtype)."""
    work = tensor.detach().to(_device, copy=True)
    try:
        dist.all_reduce(work, op=op)
    except RuntimeError as err:  # gloo and nccl report a lost or departed peer as RuntimeError (DistError)
        raise PeerFailedError(f"a collective failed: {err}") from err
    return work.to(tensor.device)


def mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over every rank."""
    return _all_reduce(tensor, dist.ReduceOp.SUM) / dist.get_world_size()


def spread(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """The smallest and the largest of each value over every rank (one collective)."""
    both = torch.tensor([*values, *(-v for v in values)], dtype=torch.float64)
    low = _all_reduce(both, dist.ReduceOp.MIN).tolist()
    return low[: len(values)], [-v for v in low[len(values) :]]


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over every rank, in one flat collective."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = mean(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
