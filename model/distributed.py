"""Several processes on one job (``torchrun``), as MA-LMM trains and evaluates: torch.distributed.

`init_from_env` joins the process group that ``torchrun`` describes in the environment (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; ``LOCAL_RANK`` picks the GPU): NCCL on CUDA, gloo
on CPU. Without those variables (or with ``WORLD_SIZE=1``) nothing is initialised and every helper
here acts as one process would. Training splits each batch over the processes and all-reduces the
gradients before the optimiser step (`all_reduce_gradients`); evaluation gives each process every
N-th batch (`shard`) and gathers the answers to rank 0 (`gather_shards`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta

import torch


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints, logs and reports."""
    return rank() == 0


def init_from_env(device: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Join torchrun's process group when the environment names one with more than one process.

    device: the command's ``--device`` (None: CUDA when available). On CUDA the backend is NCCL and the
    process's device is ``cuda:LOCAL_RANK``; elsewhere gloo. Returns whether this is a distributed run.
    ValueError when the environment is incomplete (RANK without WORLD_SIZE...).
    """
    if is_distributed():
        return True
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: start the command with torchrun")
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return True


def local_device(device: str | None) -> str | None:
    """The device of this process: ``cuda:LOCAL_RANK`` for ``cuda`` (or the default on a CUDA machine) in
    a distributed run; `device` otherwise."""
    if not is_distributed():
        return device
    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if chosen == "cuda" else chosen


def _reduce_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """The sum over processes of each value (float64); the values themselves in one process."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_reduce_device())
    torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Every process starts from rank 0's parameters and buffers (as DistributedDataParallel does)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type == "cpu" and torch.distributed.get_backend() == "nccl":
                continue
            torch.distributed.broadcast(t.data, src=0)


def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum each parameter's gradient over the processes (DistributedDataParallel's all-reduce; the loss
    of each process is already scaled so that the sum is the whole batch's gradient).

    A parameter no process gave a gradient keeps none (the optimiser skips it, as in one process); one
    that some did gets zeros where it had none, then the sum.
    """
    if not is_distributed():
        return
    params = list(params)
    have = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=_reduce_device())
    torch.distributed.all_reduce(have)
    grads = []
    for p, n in zip(params, have.tolist(), strict=True):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one all-reduce, as DDP's buckets
    torch.distributed.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def shard(count: int, batch_size: int) -> list[range]:
    """This process's batches of ``range(count)``: batch b (items b*batch_size...) goes to rank b mod N,
    so every batch is the one a single process would run (same items, same padding, same numbers)."""
    starts = range(0, count, batch_size)
    return [range(s, min(count, s + batch_size)) for k, s in enumerate(starts) if k % world_size() == rank()]


def gather_shards(indices: Sequence[int], values: Sequence) -> list | None:
    """Rank 0: every process's (index, value) pairs put back in index order (a list of all values);
    other ranks: None. One process: `values` as a list."""
    if not is_distributed():
        return list(values)
    pairs = list(zip(indices, values, strict=True))
    gathered: list = [None] * world_size() if is_main() else None
    torch.distributed.gather_object(pairs, gathered, dst=0)
    if not is_main():
        return None
    merged = sorted((p for part in gathered for p in part), key=lambda p: p[0])
    return [v for _, v in merged]


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def finish() -> None:
    """Leave the process group (when one was joined)."""
    if is_distributed():
        torch.distributed.destroy_process_group()
