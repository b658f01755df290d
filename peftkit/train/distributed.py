"""Running the same training command under torchrun: DDP (gloo on CPU, nccl on GPU) or FSDP2 (``fully_shard``).

Only trainable parameters take part: frozen base weights are never all-reduced (DDP ignores parameters that do
not require grad). Rank 0 writes every output.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Env:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def environment() -> Env:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Env()
    return Env(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(env: Env) -> None:
    if env.distributed and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)


def shutdown(env: Env) -> None:
    if env.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap(model: nn.Module, env: Env, mode: str) -> nn.Module:
    """The module to call for training steps (the model itself when running alone)."""
    if not env.distributed:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        blocks = [m for m in model.modules() if type(m).__name__.endswith(("Layer", "Block")) and m is not model]
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)


def sum_scalar(value: torch.Tensor, env: Env) -> float:
    if env.distributed:
        value = value.clone()
        torch.distributed.all_reduce(value)
    return float(value)


def full(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2) made whole; other tensors as they are."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def broadcast_flag(flag: bool, env: Env) -> bool:
    if not env.distributed:
        return flag
    tensor = torch.tensor([1 if flag else 0])
    torch.distributed.broadcast(tensor, src=0)
    return bool(tensor.item())


def barrier(env: Env) -> None:
    if env.distributed:
        torch.distributed.barrier()


@contextlib.contextmanager
def _swap_full(model: nn.Module):
    """Temporarily replace sharded (DTensor) parameters by whole tensors, for saving."""
    originals = []
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if hasattr(param, "full_tensor") and param.requires_grad:
                whole = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                originals.append((module, name, param))
                module._parameters[name] = whole
    try:
        yield
    finally:
        for module, name, param in originals:
            module._parameters[name] = param


def gather_for_save(model: nn.Module, env: Env, mode: str):
    """A context in which the model's parameters are whole on every rank (a collective under FSDP)."""
    if env.distributed and mode == "fsdp":
        return _swap_full(model)
    return contextlib.nullcontext()
