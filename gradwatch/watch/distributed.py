"""Several training processes (DDP, Accelerate, Lightning): one checks, all agree.

Several training processes (DDP, Accelerate, Lightning's DDP strategy): one checks, all agree.

Only global rank zero checks and records: the check runs on the unwrapped module's float64
copy, never through the DDP wrapper (whose forward on one rank alone would wait forever for the
others' buffer broadcast). At a step where a check is due every rank calls `agree`, an
all-reduce (MAX) of one flag: it is the barrier after rank zero's check and it carries rank
zero's stop decision, so that `on_alert="stop"` stops every rank at the same step (a rank that
went on alone would hang in its next gradient all-reduce).

With a step-count schedule every rank knows when a check is due, so nothing is exchanged on
the other steps. A wall-clock schedule runs on rank zero only; its "due" flag is agreed at
every step (one one-element all-reduce per step).

Imports: nothing else of gradwatch (torch.distributed when initialised).
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["agree", "world"]


def _dist() -> Any:
    """`torch.distributed` when a process group is up, else None (torch is not imported here:
    a process whose training initialised one has imported it already)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def world() -> tuple[int, int]:
    """(global rank, world size); (0, 1) outside torch.distributed."""
    dist = _dist()
    if dist is None:
        return 0, 1
    return int(dist.get_rank()), int(dist.get_world_size())


def agree(flag: bool) -> bool:
    """True on every rank when it is True on any rank (an all-reduce MAX; also a barrier)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return flag
    torch = sys.modules["torch"]
    device = torch.device("cpu")
    if "nccl" in str(dist.get_backend()).lower() and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # NCCL reduces on the GPU
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
