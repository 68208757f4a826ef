"""The training-kernels measurement: the gradient training computes, against the float64 one.

A check's central differences prove the float64 *definition* of the model. Training runs other
code: bf16/fp16 autocast kernels, a `torch.compile`-generated backward, custom ops whose
float32 path is a different kernel from the reference their float64 path falls back to. This
measurement takes, on the probe batch,

    g_T   the gradient as training computes it: the live module (or its compiled wrapper), its
          parameter dtypes, the training's autocast, on its device, in eval mode (dropout
          off), by `torch.autograd.grad` (no `.grad` written, no parameter, buffer or
          optimizer state touched; the module flags are put back one by one);
    g_64  the float64 gradient the check validated by central differences;
    g_E   the float64 path run again with every op's floating inputs and outputs rounded to
          the training precision under a `TorchDispatchMode` (`RoundingMode`): what a correct
          implementation at that precision computes. It runs the float64 path, never the code
          under test, so a faulty kernel cannot hide in its own reference;

and judges each tensor by the ratio of two relative distances from g_64:

    d_T = ||g_T − g_64|| / max(||g_T|| + ||g_64||, f),    d_E likewise for g_E,
    ratio = d_T / max(d_E, u)

with u the unit roundoff of the training dtype (2⁻⁸ bf16, 2⁻¹¹ fp16, 2⁻²⁴ fp32: no gradient
at that precision is expected closer than that), and the floor f = √u·||g_64||·√(n/N) (n the
tensor's elements, N all checked elements): a tensor whose true gradient is ~0 (attention key
biases: softmax ignores a shift) reads its rounding noise against the model's gradient scale,
not against itself (which would be distance 1.0 at any precision). Rounding every op to the
training dtype is pessimistic for autocast (which keeps softmax, norms and losses in float32),
so correct models read ratios ≈ 1 (up to ~9 with bf16 parameters); the thresholds
(`RatioThresholds`, warn 12, alert 32) sit above the largest clean ratio measured on the HF
zoo (docs/numerics.md §10).

When the training path is the float64 check's own path up to float32 rounding — float32 eager
on CPU, no autocast, no custom autograd op in the graph — nothing is measured ("same").

Imports: gradwatch.common, engine.report, engine.torch_model (torch itself: this module is
imported when a torch check runs).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from gradwatch.common.errors import ConfigError
from gradwatch.engine.report import (
    KernelElement,
    KernelLayer,
    KernelReport,
    RatioThresholds,
    worst_verdict,
)
from gradwatch.engine.torch_model import unwrap_model

__all__ = [
    "RoundingMode",
    "TrainingPath",
    "custom_autograd_nodes",
    "judge",
    "loss_scale",
    "resolve_autocast",
    "training_gradients",
    "training_path",
]

Vector = NDArray[np.float64]

#: Unit roundoff u = 2^-(mantissa bits + 1) of the dtypes training computes in.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24,
                 torch.float64: 2.0**-53}
#: fp16 training scales its loss (GradScaler) so that small gradients do not flush to zero;
#: both the training and the emulated gradient are taken of loss·scale, then divided.
FP16_LOSS_SCALE = 1024.0
#: Names of autograd's own backward nodes (`AddmmBackward0`, ...); anything else in the graph
#: (a Python `autograd.Function`, a `torch.library` op's autograd, a C++ extension's node) is
#: code the float64 path may run differently from the training dtype.
_BUILTIN_NODE = re.compile(r"^[A-Za-z0-9_]+Backward[0-9]+$|^(AccumulateGrad|GraphRoot|"
                           r"CopySlices|CopyBackwards|Error|DelayedError|NotImplemented|"
                           r"UndefinedGradBackward)$")
_DTYPE_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "half": torch.float16}


def resolve_autocast(spec: Any, device_type: str) -> torch.dtype | None:
    """The autocast dtype training runs under: `spec` "auto" (the autocast active now, on the
    model's device, or none), None (none), a dtype or its name ("bfloat16", "float16")."""
    if spec is None:
        return None
    if isinstance(spec, str) and spec == "auto":
        if not _autocast_on(device_type):
            return None
        return _autocast_dtype(device_type)
    dtype = _DTYPE_NAMES.get(spec.lower()) if isinstance(spec, str) else spec
    if dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(
            f"autocast must be 'auto', None, 'bfloat16' or 'float16' (or the torch dtype), "
            f"got {spec!r}: it says which autocast dtype training runs under."
        )
    return dtype


def _autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4
        return bool(torch.is_autocast_cpu_enabled() if device_type == "cpu"
                    else torch.is_autocast_enabled())


def _autocast_dtype(device_type: str) -> torch.dtype:
    try:
        return torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError):  # torch < 2.4
        return (torch.get_autocast_cpu_dtype() if device_type == "cpu"
                else torch.get_autocast_gpu_dtype())


@dataclass
class TrainingPath:
    """How training computes the gradient: what it calls, in which dtypes, under what."""

    call: Any  # the module training calls: the parameters' module or its compiled wrapper
    module: Any  # the module that holds the parameters
    device: str
    param_dtypes: set[torch.dtype]
    autocast: torch.dtype | None
    compiled: bool
    wrapped_forward: bool  # Accelerate's mixed precision: forward wrapped in an autocast
    notes: list[str] = field(default_factory=list)

    def differences(self, custom: list[str]) -> list[str]:
        """Why this path is not the float64 check's own (empty: it is, up to float32)."""
        found = []
        lower = sorted(str(d).replace("torch.", "") for d in self.param_dtypes
                       if d not in (torch.float32, torch.float64))
        if lower:
            found.append(f"parameters in {', '.join(lower)}")
        if self.autocast is not None:
            found.append(f"autocast {str(self.autocast).replace('torch.', '')}")
        if self.wrapped_forward:
            found.append("forward wrapped for mixed precision (Accelerate)")
        if self.compiled:
            found.append("torch.compile")
        if self.device != "cpu":
            found.append(f"device {self.device}")
        if custom:
            found.append(f"custom autograd ops ({', '.join(custom[:5])})")
        return found

    def dtype(self, observed: set[torch.dtype]) -> torch.dtype:
        """The lowest floating precision training computes in (what the emulation rounds
        to): the parameters', the autocast's, and the op outputs observed."""
        candidates = set(self.param_dtypes) | observed
        if self.autocast is not None:
            candidates.add(self.autocast)
        candidates &= set(UNIT_ROUNDOFF)
        return max(candidates, key=lambda d: UNIT_ROUNDOFF[d], default=torch.float32)


def training_path(model: Any, names: list[str], autocast: Any) -> TrainingPath:
    """The training path of `model` (the object the user trains: maybe DDP- or
    compile-wrapped). DDP/DataParallel are stepped through (calling them would start a
    gradient reduction that the other ranks do not join); a compiled wrapper is kept."""
    call, notes = model, []
    while type(call).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(
            call, "module"):
        call = call.module
    compiled = hasattr(call, "_orig_mod")
    module = unwrap_model(call)
    if compiled and unwrap_model(call._orig_mod) is not call._orig_mod:
        notes.append("the compiled module wraps DDP: measured on the eager module")
        call, compiled = module, False
    parameters = dict(module.named_parameters())
    dtypes = {parameters[name].dtype for name in names if name in parameters}
    device = next((str(parameters[n].device.type) for n in names if n in parameters), "cpu")
    return TrainingPath(
        call=call, module=module, device=device, param_dtypes=dtypes,
        autocast=resolve_autocast(autocast, device), compiled=compiled,
        wrapped_forward="_original_forward" in getattr(module, "__dict__", {}), notes=notes,
    )


def custom_autograd_nodes(loss: Any) -> list[str]:
    """Names of the backward nodes in `loss`'s graph that are not autograd's own formulas."""
    found: dict[str, None] = {}
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        name = type(node).__name__
        if (not _BUILTIN_NODE.match(name)
                or isinstance(node, torch.autograd.function.BackwardCFunction)):
            found[name] = None
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(found)


class RoundingMode(TorchDispatchMode):
    """Round every floating input and output of every op to `dtype` (and back to float64).

    Run over the float64 path, it gives what a correct implementation at `dtype` computes:
    each op's result correctly rounded to `dtype`, as a kernel with a wider accumulator does.
    Views keep aliasing their (already rounded) base; in-place and `out=` ops are rounded in
    place.

    Example:
        >>> x = torch.tensor([1.0 + 2.0**-12], dtype=torch.float64)
        >>> with RoundingMode(torch.bfloat16):
        ...     y = x * 3
        >>> y.item() == 3.0, (x * 3).item() == 3.0
        (True, False)
    """

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()

    def _round(self, value: Any) -> Any:
        if (isinstance(value, torch.Tensor) and value.is_floating_point()
                and value.element_size() > self.itemsize):
            return value.to(self.dtype).to(value.dtype)
        return value

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        decomposed = _fused_decomposition(func)
        if decomposed is not None:
            # A fused kernel at `dtype` rounds its intermediates too: log_softmax's backward
            # forms exp(out) ≈ 1 − p at `dtype` before subtracting it from the label's 1, so a
            # cross-entropy near a fit (p ≈ 1e-4) has gradients good only to u/p ≈ 6e-4 in
            # float32. Rounding only the fused op's output would call 6e-4 a kernel fault; its
            # ATen decomposition, run under this mode, rounds each step as the kernel does.
            with self:
                return decomposed(*args, **(kwargs or {}))
        schema = func._schema
        aliased = any(ret.alias_info is not None for ret in schema.returns)
        if not aliased:  # in-place ops must see their own tensor, not a rounded copy
            args = tree_map(self._round, args)
            kwargs = tree_map(self._round, dict(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if not aliased:
            return tree_map(self._round, out)
        if schema.is_mutable:
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
                        and tensor.element_size() > self.itemsize):
                    tensor.copy_(tensor.to(self.dtype))
        return out


#: Fused ops whose kernels cancel large intermediates (softmax's exp against the label's 1,
#: log-sum-exp): emulated through their ATen decompositions (`RoundingMode`).
_FUSED = ("_softmax", "_log_softmax", "_softmax_backward_data", "_log_softmax_backward_data",
          "logsumexp", "binary_cross_entropy_with_logits")


def _fused_decomposition(func: Any) -> Any:
    """The ATen decomposition of `func` when it is one of `_FUSED`, else None."""
    if func.__name__.split(".")[0] not in _FUSED:
        return None
    from torch._decomp import decomposition_table

    return decomposition_table.get(func)


class _Observer(TorchDispatchMode):
    """Record the floating dtypes of the ops' outputs and the ops outside aten."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()
        self.custom: dict[str, None] = {}

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        namespace = getattr(func, "namespace", "aten")
        if namespace not in ("aten", "prim", "prims"):
            self.custom[f"{namespace}::{func._schema.name.split('::')[-1]}"] = None
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                self.dtypes.add(tensor.dtype)
        return out


def loss_scale(dtype: torch.dtype) -> float:
    """The factor the loss is scaled by before backprop at `dtype` (fp16: `FP16_LOSS_SCALE`)."""
    return FP16_LOSS_SCALE if dtype == torch.float16 else 1.0


def training_gradients(
    path: TrainingPath,
    loss_fn: Callable[[Any, Any], Any],
    batch: Any,
    names: list[str],
    scalar: Callable[[Any, str], Any],
) -> tuple[dict[str, Vector], torch.dtype, list[str]]:
    """g_T: the gradient of `loss_fn(path.call, batch)` as training computes it, in eval mode,
    without writing `.grad`. Returns it (float64, on the CPU), the training precision
    (`TrainingPath.dtype` with the dtypes the ops produced; op outputs are not observable
    inside a compiled graph) and the non-aten ops seen.

    A loss function with a `training_loss(model, batch)` method is called through it here
    (Lightning's adapter: `training_step` on the live module with `self.log` silenced)."""
    parameters = dict(path.module.named_parameters())
    selected = [parameters[name] for name in names]
    flags = [(module, module.training) for module in path.module.modules()]
    if path.call is not path.module:
        flags.append((path.call, path.call.training))
    observer = _Observer()
    autocast = (torch.autocast(device_type=path.device, dtype=path.autocast)
                if path.autocast is not None else nullcontext())
    try:
        path.module.eval()  # dropout off, BatchNorm on its running statistics (not updated)
        with torch.enable_grad(), autocast, nullcontext() if path.compiled else observer:
            call = getattr(loss_fn, "training_loss", loss_fn)
            loss = scalar(call(path.call, batch),
                          "loss_fn(model, batch) at the training precision")
            dtype = path.dtype(observer.dtypes)
            factor = loss_scale(dtype)
            grads = torch.autograd.grad(loss * factor if factor != 1.0 else loss, selected,
                                        allow_unused=True)
    finally:
        for module, flag in flags:  # exactly as they were, module by module
            module.training = flag
    result = {}
    for name, parameter, grad in zip(names, selected, grads):
        value = torch.zeros_like(parameter) if grad is None else grad.detach()
        result[name] = value.to("cpu", torch.float64).numpy() / factor
    return result, dtype, list(observer.custom)


def judge(
    reference: Mapping[str, Vector],
    training: Mapping[str, Vector],
    emulated: Mapping[str, Vector],
    shapes: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype,
    thresholds: RatioThresholds,
    top_k: int,
) -> tuple[dict[str, KernelLayer], float, float]:
    """Per-tensor distances, ratios and verdicts (see the module doc); also the overall
    distances of g_T and g_E from g_64 over every checked tensor."""
    u = UNIT_ROUNDOFF[dtype]
    total = math.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in reference.values()))
    count = sum(g.size for g in reference.values()) or 1
    layers: dict[str, KernelLayer] = {}
    for name, g64 in reference.items():
        g_t, g_e = training[name].ravel(), emulated[name].ravel()
        g64 = g64.ravel()
        floor = math.sqrt(u) * total * math.sqrt(g64.size / count)
        d_t = _distance(g_t, g64, floor)
        d_e = _distance(g_e, g64, floor)
        if not np.all(np.isfinite(g_e)):
            raise FloatingPointError(
                f"the emulated {dtype} gradient of '{name}' overflows: the probe batch's "
                f"activations exceed the range of {dtype}")
        ratio = d_t / max(d_e, u) if math.isfinite(d_t) else math.inf
        worst = []
        if top_k:
            error = np.abs(np.nan_to_num(g_t - g64, nan=np.inf))
            for flat in np.argsort(-error, kind="stable")[:top_k]:
                index = tuple(int(i) for i in np.unravel_index(int(flat), shapes[name] or ()))
                worst.append(KernelElement(index=index, training=float(g_t[flat]),
                                           reference=float(g64[flat]),
                                           emulated=float(g_e[flat])))
        layers[name] = KernelLayer(distance=d_t, reference_distance=d_e, ratio=ratio,
                                   verdict=thresholds.classify(ratio), numel=int(g64.size),
                                   worst=worst)
    joined = [np.concatenate([m[n].ravel() for n in reference]) if reference else np.zeros(0)
              for m in (training, emulated, reference)]
    return layers, _distance(joined[0], joined[2], 0.0), _distance(joined[1], joined[2], 0.0)


def _distance(approx: Vector, exact: Vector, floor: float) -> float:
    difference = float(np.linalg.norm(approx - exact))
    if not math.isfinite(difference):
        return math.inf
    scale = max(float(np.linalg.norm(approx)) + float(np.linalg.norm(exact)), floor)
    return difference / scale if scale > 0 else 0.0


def build_report(
    path: TrainingPath,
    measure: Callable[[], tuple[dict[str, KernelLayer], float, float, torch.dtype,
                                list[str]]],
    custom: list[str],
    thresholds: RatioThresholds,
) -> KernelReport:
    """Run `measure` (→ layers, distances, dtype, non-aten ops) into a `KernelReport`; a
    failure becomes status "error" with its reason (never "ok")."""
    started = time.perf_counter()
    base = KernelReport(
        status="error", autocast=str(path.autocast).replace("torch.", "") if path.autocast
        else None, compiled=path.compiled, device=path.device, thresholds=thresholds,
        custom_ops=custom)
    try:
        layers, distance, reference, dtype, ops = measure()
    except Exception as exc:
        return base.model_copy(update={
            "verdict": "error", "seconds": time.perf_counter() - started,
            "reasons": [f"training kernels: could not measure the gradient at training "
                        f"precision ({', '.join(path.differences(custom)) or 'float32'}): "
                        f"{type(exc).__name__}: {str(exc)[:300]}"]})
    name = str(dtype).replace("torch.", "")
    verdict = worst_verdict(*(layer.verdict for layer in layers.values()))
    reasons: list[str] = []
    for tensor, layer in sorted(layers.items(), key=lambda item: -_finite(item[1].ratio)):
        if layer.verdict == "ok" or len(reasons) >= 5:
            break
        reasons.append(
            f"training kernels: the gradient of '{tensor}' as training computes it "
            f"({', '.join(path.differences(custom + ops))}) is {layer.ratio:.3g}× farther "
            f"from the float64 gradient than a correct {name} computation (distance "
            f"{layer.distance:.2e} vs {layer.reference_distance:.2e})")
    ratio = max((layer.ratio for layer in layers.values()), default=math.nan)
    return base.model_copy(update={
        "status": "measured", "verdict": verdict, "reasons": reasons, "dtype": name,
        "custom_ops": list(dict.fromkeys(custom + ops)), "distance": distance,
        "reference_distance": reference, "ratio": ratio, "layers": layers,
        "seconds": time.perf_counter() - started})


def _finite(value: float) -> float:
    return math.inf if math.isnan(value) else value
