"""The process group and its collectives: no-ops in one process, so every code path runs the same in one or many."""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

def all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    """In place over all ranks (sum by default). NCCL reduces only CUDA tensors: a CPU tensor (our metric sums)
    makes the round trip through the rank's GPU."""
    if dist.is_initialized():
        if dist.get_backend() == "nccl" and not x.is_cuda:
            on_gpu = x.cuda()
            dist.all_reduce(on_gpu, op=op or dist.ReduceOp.SUM)
            x.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def all_gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def setup_distributed(timeout_s: float = 3600.0):
    """-> (rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python is rank 0 of 1.
    timeout_s: how long a collective waits (NCCL's default, 10 min, is shorter than a long judge phase or rank 0's
    final export); device_id binds the NCCL communicator to this rank's GPU at once."""
    from datetime import timedelta
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
              else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


def check_shared_out(out: Path, rank: int, world: int) -> None:
    """Every rank must see the same --out (one filesystem shared by all nodes: rank 0 writes the checkpoints' metadata
    and the others their shards into it). Rank 0 writes a nonce there; a rank that cannot read it stops."""
    if world == 1:
        return
    nonce_path = out / f".shared-check-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    nonce = [f"{os.getpid()}-{time.time_ns()}-{random.SystemRandom().random()}" if rank == 0 else None]
    if rank == 0:
        nonce_path.write_text(nonce[0])
    dist.broadcast_object_list(nonce, src=0)
    seen = nonce_path.read_text() if nonce_path.is_file() else None
    ok = all_reduce(torch.tensor([float(seen == nonce[0])]), dist.ReduceOp.MIN).item() > 0
    if rank == 0:
        nonce_path.unlink(missing_ok=True)
    if not ok:
        sys.exit(f"error: rank {rank}: --out {out} is not the same folder on every rank (rank 0's marker "
                 f"{'is not there' if seen is None else 'differs'}); a multi-node run needs one shared filesystem "
                 "for --out")
