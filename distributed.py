"""
distributed.py: data parallel under torchrun, for train.py. Each process takes its share of the same
global batch; the routers' gradients are averaged by DDP, or the frozen model is sharded with FSDP2
(--fsdp), so that N processes give the routers that one process gives on the same global batch.
Without torchrun everything here is a no-op: one process, the plain model.

Leaves out: pipeline and tensor parallelism, multi-node set-up (torchrun's own flags do that).
"""

import os
from typing import NamedTuple

import torch

from cli import UserError, pick_device


class Processes(NamedTuple):
    rank: int
    world: int
    model: torch.nn.Module    # the model (FSDP2 shards it in place)
    wrapped: torch.nn.Module  # what the training step calls: the model, or its DDP wrapper


def under_torchrun():
    return "WORLD_SIZE" in os.environ  # torchrun tells each process its place through the environment


def world_size():
    """The number of processes torchrun started (1 without torchrun), known before any set-up."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_processes(batch_size, fsdp):
    """Before any work: the global batch splits evenly over the processes, and --fsdp has processes to shard over."""
    if batch_size % world_size():
        raise UserError(f"--batch-size {batch_size} must be divisible by the number of processes ({world_size()})")
    if fsdp and not under_torchrun():
        raise UserError("--fsdp shards the model across the processes that torchrun starts; run "
                        "torchrun --nproc_per_node N train.py --fsdp ..., or drop --fsdp")


def process_device(requested):
    """(device, reason) from cli.pick_device; under torchrun on GPUs each process takes its own GPU."""
    device, why = pick_device(requested)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device, why


def setup_distributed(model, use_fsdp):
    """Processes(rank, world, model, what to call): plain, DDP over the routers, or FSDP2-sharded.
    Freeze what is not trained first: DDP and FSDP register what is trainable when they wrap."""
    if not under_torchrun() or (world_size() == 1 and not use_fsdp):
        return Processes(0, 1, model, model)
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if next(model.parameters()).is_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        return Processes(rank, world, model, model)
    from torch.nn.parallel import DistributedDataParallel
    return Processes(rank, world, model, DistributedDataParallel(model))


def share(batch, procs):
    """This process's rows of a global batch (B, ...) that every process drew alike: (B / world, ...)."""
    per_rank = len(batch) // procs.world
    return batch[procs.rank * per_rank:(procs.rank + 1) * per_rank]


def sum_over_processes(t):
    """The sum of `t` over all processes (no gradient flows through it): the switch balance loss's
    expert counts, so that every process weighs its share of the batch by the global load."""
    torch.distributed.all_reduce(t)
    return t


def full_tensor(t):
    """The whole tensor, also from an FSDP2-sharded parameter (a DTensor; gathering is collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def wait_for_all(procs):
    """A barrier when there are several processes."""
    if procs.world > 1:
        torch.distributed.barrier()


def shut_down():
    """Leave the process group, if one was set up."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
