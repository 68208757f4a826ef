"""Float64 integrity of a check: the guard against a model's own casts, and the lossy probe.

Float64 integrity of a check: the guard that keeps a model's own casts from lowering the
precision of the check's objective, and the probe that finds the module that still loses it.

Real models cast to float32 on purpose: the causal-LM loss upcasts `logits.float()`, RMSNorm
computes `hidden_states.to(torch.float32)`, attention takes `softmax(..., dtype=torch.float32)`.
In training (bf16/fp16) those are upcasts; inside gradwatch's float64 shadow they are
*downcasts*, and a central-difference step of 1e-7 vanishes in float32 rounding (2⁻²⁴ ≈ 6e-8
relative): dθapprox reads 0 where dθ is not, and a correct model alerts.

`Float64Guard` is a `TorchFunctionMode`. While it is active — on the check's own thread only
(torch keeps the mode stack thread-local), for the check's own evaluations — every conversion
to float32/float16/bfloat16 yields float64 instead: `.float()`, `.half()`, `.bfloat16()`,
`.to(dtype)`, `.type(...)`, `.type_as(...)`, and `dtype=` of any op (softmax, sum, factories).
Integer and boolean tensors converted "to float32" become float64 too (exact: integers below
2⁵³), so that constants combined with θ-dependent values do not clash in dtype. Bit
reinterpretation (`view(dtype)`) is left alone. Autocast regions need nothing: autocast never
casts float64 tensors. What the guard cannot see — a kernel that computes in float32 inside
C++ and returns float64 — `find_lossy_modules` finds afterwards, by testing each module's
response to a perturbation of its inputs for float64 linearity.

Imports: nothing else of gradwatch (torch only; imported when a torch check runs).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["Float64Guard", "LossyModule", "find_lossy_modules"]

LOWER_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})
_TO_FLOAT = {torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16}
#: Conversions whose target dtype may come from another tensor or a type string: their result
#: is brought back to float64 after the call.
_CONVERSIONS = {torch.Tensor.to, torch.Tensor.type, torch.Tensor.type_as}
#: dtype arguments that mean a bit reinterpretation, not a conversion.
_REINTERPRET = {torch.Tensor.view}


def _lowered(value: Any) -> Any:
    return torch.float64 if isinstance(value, torch.dtype) and value in LOWER_FLOATS else value


class Float64Guard(TorchFunctionMode):
    """Keep every conversion to a lower floating precision at float64 (see the module doc).

    `prevented` counts the conversions kept at float64, by op; `escaped` the ops that still
    produced a lower-precision tensor from float64 inputs (by op name), which the precision
    verdict reports.

    Example:
        >>> import torch
        >>> x = torch.ones(2, dtype=torch.float64)
        >>> with Float64Guard() as guard:
        ...     y = x.float().softmax(0, dtype=torch.float32)
        >>> y.dtype, x.float().dtype, sum(guard.prevented.values())
        (torch.float64, torch.float32, 2)
    """

    def __init__(self) -> None:
        super().__init__()
        self.prevented: Counter[str] = Counter()
        self.escaped: Counter[str] = Counter()

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func in _TO_FLOAT:
            tensor = args[0]
            self.prevented[func.__name__] += 1
            return tensor if tensor.dtype == torch.float64 else tensor.to(torch.float64)
        if func not in _REINTERPRET:
            if any(type(a) is torch.dtype for a in args):
                rewritten = tuple(_lowered(a) for a in args)
                if rewritten != args:
                    self.prevented[_name(func)] += 1
                    args = rewritten
            dtype = kwargs.get("dtype")
            if dtype is not None and dtype in LOWER_FLOATS:
                kwargs["dtype"] = torch.float64
                self.prevented[_name(func)] += 1
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor) and result.dtype in LOWER_FLOATS:
            if func in _CONVERSIONS:
                self.prevented[_name(func)] += 1
                return result.to(torch.float64)
            if _has_float64(args, kwargs):
                self.escaped[_name(func)] += 1
        return result


def _name(func: Any) -> str:
    return str(getattr(func, "__qualname__", None) or getattr(func, "__name__", func))


def _has_float64(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
            return True
        if isinstance(value, (list, tuple)) and _has_float64(tuple(value), {}):
            return True
    return False


# ---------------------------------------------------------------------- the lossy-module probe
#: Relative sizes of the input perturbations of a module: two tiny ones (a float64 module
#: answers them in proportion, to ~u/SMALL_STEP ≈ 1e-7; a float32 path answers with 0 or with
#: rounding jumps of 2⁻²⁴), and a large one that tells "does not move at all" from "moves
#: below float32's resolution". Tiny steps almost never cross a ReLU/max-pool kink, whose
#: answer is not proportional either.
SMALL_STEP = 1e-9
LARGE_STEP = 1e-6
LINEARITY_TOLERANCE = 1e-3
#: Elements a kink bends are told from lost precision while they are under this share of
#: those that move (`_nonlinearity`).
KINKED_SHARE = 0.5


class LossyModule:
    """A module whose output does not respond to its inputs with float64 precision; or, with
    `kinked`, one whose response bends only at a few elements: inputs within the probe's step
    of a kink (ReLU, max-pool), not lost precision."""

    def __init__(self, name: str, kind: str, mismatch: float, kinked: bool = False) -> None:
        self.name, self.kind, self.mismatch, self.kinked = name, kind, mismatch, kinked

    def __repr__(self) -> str:
        what = ", kinked" if self.kinked else ""
        return f"LossyModule({self.name!r}, {self.kind}, mismatch={self.mismatch:.2g}{what})"


def find_lossy_modules(
    shadow: Any, run_forward: Callable[[], Any], *, generator: torch.Generator,
    limit: int = 3,
) -> list[LossyModule]:
    """The innermost modules of `shadow` (in forward order) whose output does not respond in
    proportion to perturbations of 1e-9 and 2e-9 (relative) of their θ-dependent inputs, or
    does not move at all while a 1e-6 one moves it: float64 code is linear at that scale, a
    float32 path is not (its output moves in 2⁻²⁴ jumps or not at all). `run_forward` runs
    one forward of the objective (with the guard on, as the check does); each module is then
    re-run alone on its recorded inputs."""
    calls: list[tuple[str, Any, tuple[Any, ...], dict[str, Any]]] = []
    handles = []

    def recorder(name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if any(_moves(a) for a in (*args, *kwargs.values())):
                calls.append((name, module, args, kwargs))
        return hook

    for name, module in shadow.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(recorder(name), with_kwargs=True))
    try:
        with torch.enable_grad():
            run_forward()
    finally:
        for handle in handles:
            handle.remove()
    lossy: list[LossyModule] = []
    seen: set[str] = set()
    with torch.no_grad():
        for name, module, args, kwargs in calls:
            if name in seen:
                continue
            seen.add(name)
            measured = _nonlinearity(module, args, kwargs, generator)
            if measured is not None and measured[0] > LINEARITY_TOLERANCE:
                mismatch, straight = measured
                # keep the innermost: drop the ancestors already listed
                lossy = [m for m in lossy if not name.startswith(m.name + ".")]
                lossy.append(LossyModule(name, type(module).__name__, mismatch,
                                         kinked=straight <= LINEARITY_TOLERANCE))
    return lossy[:limit]


def _moves(value: Any) -> bool:
    """A θ-dependent floating tensor (it carries autograd history in the recording forward)."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad


def _nonlinearity(
    module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], generator: torch.Generator
) -> tuple[float, float] | None:
    """max over outputs of ||Δ(2s) − 2·Δ(s)|| / ||Δ(2s)|| at s = SMALL_STEP (∞ when neither
    tiny step moves an output that the LARGE_STEP one moves); and the same with the elements
    that bend left out while they are under KINKED_SHARE of those that move. A float32 path
    bends nearly every element (it moves in 2⁻²⁴ jumps); float64 code only those whose input
    sits within the step of a kink (ReLU, max-pool, abs near 0), which a model near a fit can
    have in numbers: there the second figure is float64's."""
    directions = {}

    def shifted(step: float) -> Any:
        def move(key: Any, value: Any) -> Any:
            if not _moves(value):
                return value
            if key not in directions:
                noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
                directions[key] = noise.to(value.device) * value.detach().abs().mean()
            return (value.detach() + step * directions[key]).to(value.dtype)

        moved_args = tuple(move(i, a) for i, a in enumerate(args))
        moved_kwargs = {k: move(k, v) for k, v in kwargs.items()}
        return _float_outputs(module(*moved_args, **moved_kwargs))

    try:
        base, small, double, large = (shifted(0.0), shifted(SMALL_STEP),
                                      shifted(2 * SMALL_STEP), shifted(LARGE_STEP))
    except Exception:  # a module that cannot be re-run alone says nothing either way
        return None
    worst = straight = 0.0
    for b, s, d, g in zip(base, small, double, large):
        one, two = s - b, d - b
        scale = float(two.norm())
        if not (torch.isfinite(two).all() and torch.isfinite(g).all()):
            continue
        if scale == 0.0:
            if float((g - b).norm()) > 0.0:
                # moves at 1e-6, not at all at 1e-9: below its resolution
                worst = straight = math.inf
            continue
        bend = two - 2 * one
        worst = max(worst, float(bend.norm()) / scale)
        bent = bend.abs() > LINEARITY_TOLERANCE * two.abs()
        if int(bent.sum()) < KINKED_SHARE * int((two != 0).sum()):
            bend, two = bend[~bent], two[~bent]
        rest = float(two.norm())
        straight = max(straight, float(bend.norm()) / rest if rest > 0 else 0.0)
    return worst, straight


def _float_outputs(value: Any) -> list[Any]:
    if isinstance(value, torch.Tensor):
        return [value.detach()] if value.is_floating_point() else []
    if isinstance(value, Mapping):
        return [t for item in value.values() for t in _float_outputs(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _float_outputs(item)]
    return []
