"""One process or many under ``torchrun``: rank, world size, device, and the few collectives the loop needs.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them the
trainer runs as a single process and no process group is created. NCCL on CUDA, gloo on the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def from_main(self, values: list[float]) -> list[float]:
        """Rank 0's ``values`` on every rank (decisions that must agree: stop now, the lr horizon)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return t.tolist()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str | None = None) -> DistContext:
    """Reads torchrun's environment, joins the process group and picks this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    ctx = DistContext(rank=rank, world=world, local_rank=local_rank, device=dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return ctx
