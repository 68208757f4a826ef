"""The live PyTorch model and its batch, as a check takes them in and copies them to float64.

Everything a check needs from the user's objects before it evaluates anything: the module that
holds the parameters (through DDP, DataParallel and torch.compile), a refusal for models no
process holds whole (FSDP, ZeRO-3), the parameters to check, the float64 shadow of the model
and of the batch, the loss a model computes itself, and the global state (RNG streams, grad
mode, intra-op threads) that a check must leave as it found it.

Imports: gradwatch.common, engine.types (torch itself only when a function is called).
"""

from __future__ import annotations

import copy
import fnmatch
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from gradwatch.common.errors import (
    InputError,
    LossError,
    UnsupportedModelError,
    missing_dependency,
)
from gradwatch.engine.types import glob_list, select_names

LossFn = Callable[[Any, Any], Any]

LOSS_FN_HELP = (
    "Pass loss_fn=lambda model, batch: <scalar loss tensor>, the full objective including any "
    "loss-level regularisation, e.g. loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1])."
)


def require_torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - exercised only without torch
        raise missing_dependency("gradwatch.check_module", "torch", "torch") from exc
    return torch


def unwrap_model(model: Any) -> Any:
    """The module that holds the parameters: through DDP/DataParallel and torch.compile."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(
            model, "module"
        ):
            model = model.module
    return model


def refuse_sharded(model: Any) -> None:
    """Raise UnsupportedModelError when no process holds the whole model (FSDP, ZeRO-3).

    A check needs every parameter's full value on one rank; gathering them would take
    collectives that the other ranks are not making at that moment (they would hang).
    """
    reason = None
    for module in model.modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            reason = "FSDP (FullyShardedDataParallel) shards its parameters across the ranks"
            break
    if reason is None:
        for name, parameter in model.named_parameters():
            if type(parameter).__name__ == "DTensor" or type(
                    getattr(parameter, "data", None)).__name__ == "DTensor":
                reason = (f"parameter {name!r} is a DTensor (FSDP2 fully_shard or tensor "
                          f"parallelism): its values are spread across the ranks")
                break
            if hasattr(parameter, "ds_id") or hasattr(parameter, "ds_status"):
                reason = (f"parameter {name!r} is partitioned by DeepSpeed ZeRO-3; only a "
                          f"shard of it lives on this rank")
                break
    if reason is not None:
        raise UnsupportedModelError(
            f"gradwatch cannot check {type(model).__name__}: {reason}. Supported: single "
            f"process, DDP, DataParallel, Accelerate, FSDP2 (fully_shard), FSDP1 "
            f"(FullyShardedDataParallel) and DeepSpeed ZeRO-3 called on every rank, "
            f"torch.compile. To check this model's backward, run gradwatch.check_module on an "
            f"unsharded copy of a small configuration (e.g. in a test), or train it with "
            f"FSDP2 or DDP."
        )


def select_parameters(
    model: Any, include: str | Sequence[str] | None, exclude: str | Sequence[str] | None
) -> list[str]:
    includes = glob_list(include, "include")
    named = list(model.named_parameters())
    available = [n for n, p in named if p.requires_grad]
    for name, parameter in named:
        wanted = not includes or any(fnmatch.fnmatchcase(name, g) for g in includes)
        if wanted and includes and not parameter.is_floating_point():
            raise InputError(
                f"parameter {name!r} has dtype {parameter.dtype}; central differences need "
                f"floating-point parameters. Remove it from include=."
            )
    if not available:
        raise InputError(
            f"{type(model).__name__} has no trainable parameters (none with requires_grad="
            f"True among {len(named)}); there is no gradient to check. Unfreeze the "
            f"parameters you train, or check the module that has them."
        )
    return select_names(available, include, exclude, what="parameter")


@contextmanager
def preserved_global_state(torch: Any) -> Iterator[None]:
    """Restore torch (CPU, CUDA), numpy and `random` RNG states and grad mode afterwards."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    grad_enabled = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
        torch.set_grad_enabled(grad_enabled)


@contextmanager
def single_thread(torch: Any) -> Iterator[None]:
    """Run one-evaluation-at-a-time loops on one intra-op thread, then restore the setting.

    Each loop evaluation is a handful of small ops: waking a second thread for each costs more
    than it saves, and on a shared machine it is where the occasional multi-millisecond stall
    comes from. (The setting is the same afterwards, so training's own ops are unaffected.)
    """
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def float64_shadow(torch: Any, model: Any) -> Any:
    """A float64 deep copy of `model` in eval mode, without gradients: what a check runs on."""
    # Parameters are copied straight to float64 (one pass over the weights instead of a
    # copy and then a cast); deepcopy's memo keeps shared (tied) parameters shared.
    memo: dict[int, Any] = {}
    for parameter in model.parameters():
        if parameter.is_floating_point() and id(parameter) not in memo:
            try:
                memo[id(parameter)] = type(parameter)(
                    parameter.detach().to(torch.float64, copy=True), parameter.requires_grad
                )
            except Exception:  # an exotic Parameter subclass: let deepcopy copy it
                continue
    try:
        shadow = copy.deepcopy(model, memo)
    except Exception as exc:
        raise InputError(
            f"gradwatch checks a float64 copy of the model and could not copy "
            f"{type(model).__name__}: {type(exc).__name__}: {exc}. Pass the plain nn.Module "
            f"(not a wrapper holding locks, files or process groups)."
        ) from exc
    forward = shadow.__dict__.get("forward")
    original = getattr(shadow, "_original_forward", None)
    if forward is not None and original is not None:
        # Accelerate's mixed precision replaces forward with an autocast wrapper and keeps the
        # original as _original_forward: the float64 check must run the original.
        shadow.forward = original
    shadow.double()
    shadow.eval()  # dropout off, BatchNorm on running statistics (and not updated)
    for parameter in shadow.parameters():
        # requires_grad stays as in the live model: a loss_fn may read it (e.g. an L2 penalty
        # over the trainable parameters), so the shadow must answer the same.
        parameter.grad = None
        if not parameter.is_contiguous():
            parameter.data = parameter.data.contiguous()
    return shadow


def to_float64(torch: Any, value: Any) -> Any:
    """A copy of `value` with every floating tensor in float64; containers rebuilt, not edited."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64) if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {key: to_float64(torch, item) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(to_float64(torch, item) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_float64(torch, item) for item in value)
    return value


def describe_batch(value: Any) -> Any:
    """Shapes and dtypes of a (nested) batch, for the report's probe section."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{str(dtype).replace('torch.', '')}{list(shape)}"
    if isinstance(value, Mapping):
        return {str(key): describe_batch(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe_batch(item) for item in value]
    return type(value).__name__


def default_loss(model: Any, batch: Any) -> Any:
    """The loss a model computes itself: `model(**batch).loss` or `model(*batch)`."""
    if isinstance(batch, Mapping):
        output = _call_model(model, batch, star=2)
        loss = _loss_attribute(output)
        if loss is None:
            raise LossError(
                f"model(**batch) returned {type(output).__name__} without a 'loss'; the batch "
                f"probably has no labels. {LOSS_FN_HELP}"
            )
        return loss
    if isinstance(batch, (tuple, list)):
        return loss_of_output(_call_model(model, batch, star=1), "model(*batch)")
    raise LossError(
        f"cannot tell how to compute a loss from a batch of type "
        f"{type(batch).__name__} without loss_fn (dict batches call model(**batch), tuples "
        f"model(*batch)). {LOSS_FN_HELP}"
    )


def loss_of_output(output: Any, call: str) -> Any:
    """The loss in a model's output: its `.loss` / ["loss"], or the output if it is a scalar."""
    loss = _loss_attribute(output)
    if loss is None and getattr(output, "ndim", None) == 0:
        loss = output
    if loss is None:
        shape = list(getattr(output, "shape", []))
        raise LossError(
            f"{call} returned {type(output).__name__}"
            f"{' of shape ' + str(shape) if shape else ''}, not a scalar loss. {LOSS_FN_HELP}"
        )
    return loss


def _call_model(model: Any, batch: Any, *, star: int) -> Any:
    try:
        return model(**batch) if star == 2 else model(*batch)
    except (TypeError, RuntimeError, ValueError, IndexError, KeyError) as exc:
        call = "model(**batch)" if star == 2 else "model(*batch)"
        raise InputError(
            f"{call} failed with {type(exc).__name__}: {exc}. The batch must be what the "
            f"model's forward takes; got {describe_batch(batch)} (floating tensors cast to "
            f"float64 for the check). {LOSS_FN_HELP}"
        ) from exc


def _loss_attribute(output: Any) -> Any:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    return loss
