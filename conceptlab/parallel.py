"""Data-parallel concept learning: what each of N processes does (``accelerate launch``).

Under ``accelerate launch --num_processes N -m conceptlab learn ...`` every process holds
the whole pipeline and runs the same EM loop: the same E-steps (they are deterministic),
the same global batch drawn from the same generator. Each process then computes the loss
on its own share of the batch (rows ``rank * B / N`` to ``(rank + 1) * B / N``), the
gradients of the trained tensors (concept rows, LoRA or U-Net weights) are averaged over
the processes, and every process takes the same optimizer step. N processes thus train
what one process trains with the whole batch, up to float rounding. Only the main process
writes files. Without ``torch.distributed`` initialised everything here is a no-op, and
inside :func:`alone` too: there each process runs a job of its own (``learn-many`` gives
each process its own images), which it trains and writes by itself.
"""

from __future__ import annotations

import contextlib

import torch

_ALONE = [False]


@contextlib.contextmanager
def alone():
    """Inside the block this process works by itself: :func:`world` is (0, 1)."""
    before = _ALONE[0]
    _ALONE[0] = True
    try:
        yield
    finally:
        _ALONE[0] = before


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without torch.distributed,
    and inside :func:`alone`."""
    import torch.distributed as dist

    if not _ALONE[0] and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True in the process that writes files (rank 0, or the only process)."""
    return world()[0] == 0


def barrier():
    """Wait for every process (nothing to wait for in one process)."""
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def shard(items, batch: int):
    """This process's contiguous share of a global batch of ``batch`` items.

    Raises:
        ValueError: ``batch`` does not split evenly between the processes.
    """
    rank, n = world()
    if batch % n:
        raise ValueError(f"the batch of {batch} does not split between {n} processes: use a "
                         f"batch size that is a multiple of {n}")
    k = batch // n
    return items[rank * k:(rank + 1) * k]


def average_gradients(params):
    """Average the gradients of ``params`` over the processes (in place)."""
    n = world()[1]
    if n == 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= n


def average_scalars(values: dict) -> dict:
    """``{name: float}`` averaged over the processes (the losses a log shows)."""
    if world()[1] == 1:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, (t / world()[1]).tolist()))


__all__ = ["alone", "average_gradients", "average_scalars", "barrier", "is_main", "shard", "world"]
