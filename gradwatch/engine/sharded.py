"""Sharded models (FSDP2 `fully_shard`, FSDP1, ZeRO-3): the "gathered" strategy, collectively.

No rank holds an FSDP2 model whole: each parameter is a DTensor whose rows are split across
the ranks (`Shard(0)` on a 1-D device mesh, `torch.chunk` semantics: rank r holds rows
[r·c, min((r+1)·c, n)) with c = ⌈n / world⌉). A check is therefore a collective operation that
every rank takes part in, at the same step, like a training step:

1. every rank takes its local shards to the CPU (a failure is agreed on at once: every rank
   learns that, and why, through one `all_gather_object`, so no rank waits for a gather that
   will not come);
2. rank 0 gathers each parameter's shards (`dist.gather`, padded to c rows) and builds an
   unsharded copy of the model: the same modules, with FSDP's class mixin and hooks removed,
   the full parameters (ties kept: a parameter shared by two modules stays one) and the
   replicated buffers; the other ranks get None and wait for rank 0's check at the step's
   agreement, as under DDP;
3. rank 0 runs the ordinary float64 check on that copy. The live sharded parameters,
   gradients, optimizer state and RNG are only read.

FSDP1 (`FullyShardedDataParallel`) goes through its own `summon_full_params(rank0_only=True,
writeback=False)` (offloaded to the CPU from an accelerator) after step 1's agreement; rank 0
copies the wrapped modules (not the wrappers) inside it. DeepSpeed ZeRO-3 goes through
`deepspeed.zero.GatheredParameters(modifier_rank=None)` the same way (every rank enters it;
rank 0 copies the modules, DeepSpeed's hooks left behind). The "collective" decision (a model
whose copy does not fit, or `strategy="collective"`) is taken here too, on rank 0's estimate;
`gradwatch.engine.collective` then checks the FSDP2 model where it lives.

Every other collective here runs on a gloo group of its own with a timeout (`GATHER_TIMEOUT`),
on CPU tensors (so NCCL training works too): a rank that dies or hangs makes the others raise
after the timeout instead of waiting for ever, and the ranks then agree on the failure over the
training's own group. The float64 copy must fit in rank 0's host memory: `estimate` says how
much it needs (the fp32 gather plus the float64 shadow, its gradients and the check's
workspace: ≈ 36 bytes per parameter element) against what the host has available.

Imports: gradwatch.common (torch and torch.distributed when a function is called).
"""

from __future__ import annotations

import copy
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from types import MethodType
from typing import Any

from gradwatch.common.errors import UnsupportedModelError

__all__ = ["GATHER_TIMEOUT", "Gathered", "estimate", "gather_unsharded", "sharding_of", "share"]

#: Seconds any collective of a check may wait for the other ranks.
GATHER_TIMEOUT = 120.0
#: Bytes per parameter element on rank 0 during a gathered check: the fp32 gather (4), the
#: float64 shadow (8), its gradient (8), a second float64 copy for perturbed evaluations and
#: the gradient vectors the check keeps (16).
BYTES_PER_ELEMENT = 36

_groups: dict[tuple[int, float], Any] = {}


@dataclass
class Gathered:
    """What one rank holds after `gather_unsharded`: rank 0 the unsharded copy (None on the
    other ranks); `error` the reason when any rank failed (the same text on every rank)."""

    model: Any
    error: str | None
    strategy: str
    reason: str
    kind: str = "fsdp2"


def sharding_of(model: Any) -> str | None:
    """"fsdp2" when the parameters are FSDP2 DTensors, "fsdp1" for FullyShardedDataParallel
    wrappers, "zero3" for DeepSpeed's partitioned parameters, None for a model some rank holds
    whole."""
    for module in model.modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            return "fsdp1"
    for parameter in model.parameters():
        if type(parameter).__name__ == "DTensor" or type(
                getattr(parameter, "data", None)).__name__ == "DTensor":
            return "fsdp2"
        if hasattr(parameter, "ds_id") or hasattr(parameter, "ds_status"):
            return "zero3"
    return None


def estimate(model: Any, world: int = 1) -> tuple[bool, str]:
    """(fits, why): does a gathered float64 check of `model` fit in this host's memory?
    (FSDP1's parameters are this rank's flat shards: their size times `world`.)"""
    elements = sum(_full_numel(p) for p in model.parameters())
    if sharding_of(model) == "fsdp1":
        elements *= world
    needed = elements * BYTES_PER_ELEMENT
    available = _available_memory()
    if available is None:
        return True, (f"{elements:,} parameter elements need ≈ {_gib(needed)} on rank 0 "
                      f"(host memory unknown)")
    why = (f"{elements:,} parameter elements need ≈ {_gib(needed)} on rank 0's host, "
           f"{_gib(available)} available")
    return needed <= available, why


def gather_unsharded(model: Any, timeout: float = GATHER_TIMEOUT,
                     strategy: str = "auto") -> Gathered:
    """Collective: every rank must call it at the same point. Rank 0 gets an unsharded copy
    of the FSDP2 `model` (the others None); any rank's failure reaches every rank as `error`.
    Never raises: a collective that times out (a rank stalled or gone) is an error too, and
    the ranks agree on the outcome over the training's own process group at the end.

    `strategy` "auto" gathers when rank 0's estimate fits (every rank takes rank 0's word:
    hosts differ) and otherwise returns the "collective" decision with nothing gathered
    (`gradwatch.engine.collective` then checks the sharded model in place); "gathered" and
    "collective" force one."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    kind = sharding_of(model) or "unsharded"
    fits, why = estimate(model, world)
    failure: str | None = None
    if kind not in ("fsdp2", "fsdp1", "zero3"):
        failure = f"rank {rank}: gradwatch checks FSDP2, FSDP1 and ZeRO-3 models, not {kind}"
    try:
        decided: list[Any] = [None] * world
        dist.all_gather_object(decided, (failure, fits, why), group=_group(timeout))
    except Exception as exc:  # a timeout, or a peer gone
        decided = [(f"rank {rank}: a collective of the check failed (timeout {timeout:g} s): "
                    f"{type(exc).__name__}: {str(exc)[:200]}", fits, why)]
    errors = [text for text, _, _ in decided if text]
    fits, why = decided[0][1], decided[0][2]
    chosen = strategy if strategy != "auto" else ("gathered" if fits else "collective")
    why = (f"sharded={strategy!r}; {why}" if strategy != "auto" else
           f"{why}: {'fits' if fits else 'does not fit'}, {chosen}")
    if not errors and chosen == "collective" and kind != "fsdp2":
        errors = [f"the collective strategy checks FSDP2 (fully_shard) models; this is {kind}"
                  + ("" if fits else f", and the gathered strategy does not fit: {why}")]
    if errors or chosen == "collective":
        if _any_rank(bool(errors)):
            _groups.clear()
            return Gathered(None, "; ".join(errors) or f"rank {rank}: another rank failed",
                            chosen, why, kind)
        return Gathered(None, None, "collective", why, kind)
    local: list[tuple[str, Any]] | None = None
    try:
        if kind == "fsdp2":
            local = _local_shards(model, world)
    except Exception as exc:
        failure = f"rank {rank}: {type(exc).__name__}: {exc}"
    errors = []
    full: dict[str, Any] = {}
    try:
        group = _group(timeout)
        failures: list[str | None] = [None] * world
        dist.all_gather_object(failures, failure, group=group)
        errors = [text for text in failures if text]
        if not errors and local is not None:
            for name, (shard, rows, shape) in local:
                full[name] = _gather_one(shard, rows, shape, world, rank, group)
    except Exception as exc:  # a timeout, or a peer gone
        errors.append(f"rank {rank}: a collective of the check failed (timeout "
                      f"{timeout:g} s): {type(exc).__name__}: {str(exc)[:200]}")
    if _any_rank(bool(errors)):
        _groups.clear()  # a group that timed out is broken: every rank makes a new one
        return Gathered(None, "; ".join(errors) or f"rank {rank}: another rank failed",
                        "gathered", why, kind)
    if kind in ("fsdp1", "zero3"):
        # FSDP's or DeepSpeed's own collective on the training's process group (its timeout,
        # not ours); a failure after it (rank 0's copy) is agreed on so no rank waits
        plain, failure = None, None
        gather, what = ((_summon_fsdp1, "summon_full_params") if kind == "fsdp1" else
                        (_gather_zero3, "GatheredParameters"))
        try:
            plain = gather(model, rank)
        except Exception as exc:
            failure = f"rank {rank}: {what} failed: {type(exc).__name__}: {exc}"
        if _any_rank(failure is not None):
            return Gathered(None, failure or f"rank {rank}: another rank failed", "gathered",
                            why, kind)
        return Gathered(plain, None, "gathered", why, kind)
    plain = _unsharded_copy(model, full) if rank == 0 else None
    return Gathered(plain, None, "gathered", why, kind)


def _summon_fsdp1(model: Any, rank: int) -> Any:
    """FSDP1: `summon_full_params` (every rank; the full values on rank 0 only, not written
    back), inside which rank 0 copies the modules without their wrappers. The values are
    offloaded to the CPU when they live on an accelerator; on CPU they are not (torch 2.13's
    offload of CPU flat parameters fails with "setStorage: ... storage of size 0")."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    offload = any(p.device.type != "cpu" for p in model.parameters())
    with FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=True,
                                                     offload_to_cpu=offload):
        return _copy_module(model, {}) if rank == 0 else None


def _gather_zero3(model: Any, rank: int) -> Any:
    """DeepSpeed ZeRO-3: every rank enters `GatheredParameters` (an all-gather; read only,
    `modifier_rank=None`, so nothing is written back), inside which rank 0 copies the modules
    with the full values (DeepSpeed's hooks and partitioning state left behind)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        return _copy_module(model, {}) if rank == 0 else None


def _any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any (an all-reduce MAX over the default group,
    the one training itself uses: on the GPU for NCCL)."""
    import torch
    import torch.distributed as dist

    device = torch.device("cpu")
    if "nccl" in str(dist.get_backend()).lower() and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def share(value: Any, timeout: float = GATHER_TIMEOUT) -> Any:
    """Collective: rank 0's `value` on every rank (an exception travels as a RuntimeError
    with its type and message; rank 0 keeps its own object)."""
    import torch.distributed as dist

    sent: Any = value
    if isinstance(value, BaseException):
        sent = RuntimeError(f"{type(value).__name__}: {value}")
    box = [sent if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=_group(timeout))
    return value if dist.get_rank() == 0 else box[0]


# ---------------------------------------------------------------------- helpers
def _group(timeout: float) -> Any:
    """gradwatch's own gloo group (CPU tensors, its own timeout), created collectively once."""
    import torch.distributed as dist

    default = dist.distributed_c10d._get_default_group()
    key = (id(default), timeout)
    if key not in _groups:
        _groups[key] = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    return _groups[key]


def _full_numel(parameter: Any) -> int:
    # a ZeRO-3 parameter outside GatheredParameters is empty; its full shape is ds_shape
    return int(math.prod(getattr(parameter, "ds_shape", None) or parameter.shape))


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _gib(size: float) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _local_shards(model: Any, world: int) -> list[tuple[str, tuple[Any, int, tuple[int, ...]]]]:
    """Per distinct parameter (in `named_parameters` order, the same on every rank): its local
    rows on the CPU, its full row count and its full shape. Refuses placements other than
    FSDP2's `Shard(0)` over all the ranks."""
    out = []
    for name, parameter in model.named_parameters():
        if type(parameter).__name__ != "DTensor":
            out.append((name, (parameter.detach().cpu(), -1, tuple(parameter.shape))))
            continue
        placements = tuple(parameter.placements)
        mesh_size = int(parameter.device_mesh.size())
        if len(placements) != 1 or type(placements[0]).__name__ != "Shard" or \
                placements[0].dim != 0 or mesh_size != world:
            raise UnsupportedModelError(
                f"parameter {name!r} is sharded as {placements} over a mesh of {mesh_size} "
                f"ranks; gradwatch gathers FSDP2's Shard(0) over all {world} ranks only (HSDP "
                f"and tensor parallelism are not supported)")
        shard = parameter.to_local().detach().cpu()
        out.append((name, (shard, int(parameter.shape[0]), tuple(parameter.shape))))
    return out


def _gather_one(shard: Any, rows: int, shape: tuple[int, ...], world: int, rank: int,
                group: Any) -> Any:
    """The full tensor on rank 0 (None elsewhere) from every rank's rows."""
    import torch
    import torch.distributed as dist

    if rows < 0:  # a replicated (unsharded) parameter: rank 0's own copy is the full one
        return shard.clone() if rank == 0 else None
    chunk = -(-rows // world) if rows else 0
    padded = torch.zeros((chunk, *shape[1:]), dtype=shard.dtype)
    padded[: shard.shape[0]] = shard
    gathered = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, gathered, dst=0, group=group)  # the group holds every rank
    if rank != 0:
        return None
    assert gathered is not None
    return torch.cat(gathered)[:rows].reshape(shape)


def _is_fsdp(obj: Any) -> bool:
    module = getattr(type(obj), "__module__", "") or ""
    return module.startswith("torch.distributed.fsdp") or \
        module.startswith("torch.distributed._composable")


def _is_fsdp_hook(hook: Any) -> bool:
    """FSDP2's hooks: its state's bound methods, or closures wrapping them (functools.wraps
    keeps the wrapped function's module)."""
    name = getattr(hook, "__module__", None) or getattr(getattr(hook, "func", None),
                                                        "__module__", "") or ""
    return name.startswith(("torch.distributed.fsdp", "torch.distributed._composable",
                            "deepspeed."))


def _unsharded_copy(model: Any, full: dict[str, Any]) -> Any:
    """The model's modules, shallow-copied, with FSDP's mixin class, hooks and state removed,
    and the full parameters (ties kept) and buffers in place."""
    import torch

    parameters: dict[int, Any] = {}
    named = dict(model.named_parameters())
    for name, parameter in named.items():
        if id(parameter) not in parameters:
            parameters[id(parameter)] = torch.nn.Parameter(
                full[name], requires_grad=parameter.requires_grad)
    return _copy_module(model, parameters)


def _copy_module(module: Any, parameters: dict[int, Any]) -> Any:
    import torch

    if type(module).__name__ == "FullyShardedDataParallel":
        # FSDP1's wrapper: the module it wraps, whose parameters summon_full_params has
        # unflattened into full views (copied here: they are gone when the context ends)
        return _copy_module(module._fsdp_wrapped_module, parameters)
    cls = type(module)
    if any(_is_fsdp_class(base) for base in cls.__mro__[1:]):
        # fully_shard swaps the class for FSDP<Class>(FSDPModule, Class): back to Class
        cls = next(base for base in cls.__bases__ if not _is_fsdp_class(base))
    clone = object.__new__(cls)  # FSDPModule.__new__ would run __init__ again
    state = clone.__dict__
    state.update(module.__dict__)  # a shallow copy; the tensors and hooks are replaced below
    for key in [k for k, v in state.items()
                if _is_fsdp(v) or str(k).startswith("__composable_api_state_key")]:
        del state[key]  # FSDP's per-module state (it holds the process group)
    for key, value in state.items():
        if isinstance(value, MethodType) and value.__self__ is module:
            # a method bound to the live module in its __dict__ (transformers' `generate`,
            # Accelerate's `forward`): bound to the copy instead
            state[key] = MethodType(value.__func__, clone)
        elif type(value) in (list, dict, set) and not str(key).startswith("_"):
            # the user's own containers (a list the forward appends losses to): the copy's
            # evaluations must not grow the live module's
            state[key] = copy.copy(value)
    clone._parameters = OrderedDict(
        (name, None if value is None else _parameter(torch, value, parameters))
        for name, value in module._parameters.items())
    clone._buffers = OrderedDict(
        (name, None if value is None else _plain_buffer(torch, value))
        for name, value in module._buffers.items())
    clone._modules = OrderedDict(
        (name, None if child is None else _copy_module(child, parameters))
        for name, child in module._modules.items())
    for attribute in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks",
                      "_backward_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
                      "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"):
        hooks = getattr(module, attribute, None)
        if isinstance(hooks, dict):
            kept = OrderedDict((key, hook) for key, hook in hooks.items()
                               if not _is_fsdp_hook(hook))
            setattr(clone, attribute, kept)
    for attribute, hooks_of in (("_forward_pre_hooks_with_kwargs", "_forward_pre_hooks"),
                                ("_forward_hooks_with_kwargs", "_forward_hooks"),
                                ("_forward_hooks_always_called", "_forward_hooks")):
        flags = getattr(module, attribute, None)
        if isinstance(flags, dict):
            kept_hooks = getattr(clone, hooks_of)
            setattr(clone, attribute, OrderedDict(
                (key, flag) for key, flag in flags.items() if key in kept_hooks))
    return clone


def _parameter(torch: Any, value: Any, parameters: dict[int, Any]) -> Any:
    """The copy's parameter for `value`: the gathered one, else a copy made once per
    parameter (so a tied parameter stays one)."""
    if id(value) not in parameters:
        parameters[id(value)] = torch.nn.Parameter(value.detach().clone(),
                                                   requires_grad=value.requires_grad)
    return parameters[id(value)]


def _is_fsdp_class(cls: type) -> bool:
    return cls.__name__ == "FSDPModule" and (cls.__module__ or "").startswith(
        "torch.distributed")


def _plain_buffer(torch: Any, value: Any) -> Any:
    if type(value).__name__ == "DTensor":
        raise UnsupportedModelError("a buffer is a DTensor: gradwatch gathers parameters only")
    return value.detach().clone()
