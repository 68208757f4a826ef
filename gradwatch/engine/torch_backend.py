"""`gradwatch.check_module`: the PyTorch backend.

The live model is never touched: the check runs on a float64 *shadow* (a deep copy in eval
mode: dropout off, BatchNorm on its running statistics and not updated), with its own RNG.
The global RNG states (torch CPU and CUDA, numpy, `random`) are saved and restored around the
check so that even a loss that draws random numbers leaves training's streams where they were.

Loss evaluations perturb one shadow tensor at a time, either in place in a plain loop or for a
chunk of perturbations at once with `torch.func.vmap`; which one is faster depends on the model
and the tensor, so it is measured on the first chunk of each tensor, never assumed.

The live model and its batch (unwrapping, the float64 shadow, the default loss, the global
state a check restores) are taken in by `engine.torch_model`.

Imports: gradwatch.common, engine.types, engine.core, engine.numerics, engine.report,
engine.precision, engine.kernels, engine.torch_model (torch itself only when a check runs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from gradwatch.common.errors import (
    ConfigError,
    GradwatchError,
    InputError,
    LossError,
    UnsupportedModelError,
)
from gradwatch.common.progress import resolve_progress
from gradwatch.common.settings import DEFAULT, Default
from gradwatch.engine.core import run_check
from gradwatch.engine.numerics import ROUNDING, Signs
from gradwatch.engine.report import CheckReport, KernelReport, Mode, Thresholds, worst_verdict
from gradwatch.engine.sharded import sharding_of
from gradwatch.engine.torch_model import (
    LOSS_FN_HELP,
    LossFn,
    default_loss,
    describe_batch,
    float64_shadow,
    preserved_global_state,
    refuse_sharded,
    require_torch,
    select_parameters,
    single_thread,
    to_float64,
    unwrap_model,
)
from gradwatch.engine.types import CheckOptions, check_settings

__all__ = ["check_module"]

Vector = NDArray[np.float64]
Batching = Literal["auto", "loop", "vmap"]

#: Bytes a chunk of stacked perturbed copies of one tensor may take.
CHUNK_BYTES = 64 * 2**20
MAX_CHUNK = 64


def check_module(
    model: Any,
    batch: Any,
    loss_fn: LossFn | None = None,
    *,
    options: CheckOptions | Mapping[str, Any] | None = None,
    mode: Mode | Default = DEFAULT,
    eps: float | Default | None = DEFAULT,
    budget: int | Default | None = DEFAULT,
    thresholds: Thresholds | Mapping[str, float] | Default | None = DEFAULT,
    seed: int | Default = DEFAULT,
    include: str | Sequence[str] | Default | None = DEFAULT,
    exclude: str | Sequence[str] | Default | None = DEFAULT,
    samples: int | Default = DEFAULT,
    directions: int | Default = DEFAULT,
    top_k: int | Default = DEFAULT,
    batching: Batching = "auto",
    progress: bool | Callable[[int, int], None] = False,
    loss_scale: float | None = None,
    autocast: Any = "auto",
) -> CheckReport:
    """Check the backward pass of a PyTorch `nn.Module` on one batch.

    Args:
        model: the module; it is read, never modified (the check runs on a float64 copy).
        batch: tensors, tuples, lists, dicts, nested; floating tensors are cast to float64.
        loss_fn: `loss_fn(model, batch) -> scalar tensor`, the full objective with loss-level
            regularisation. Without it, a dict batch is called as `model(**batch)` and the
            output's `.loss` / `["loss"]` is used; a tuple/list batch as `model(*batch)` when
            that returns a scalar loss (or an output with `.loss`).
        options: a `gradwatch.CheckOptions` (defaults in its table; here mode "auto", budget
            2000), or its fields as shorthands (each setting one way): mode, eps, budget,
            thresholds, seed, include, exclude (globs over `model.named_parameters()`), ...
        batching: "auto" measures vmap against a plain loop per tensor; "loop"/"vmap" force one.
        loss_scale: the size of the terms the loss is computed from (its value at
            initialisation is a good one; default: the loss itself). A loss near 0 made of
            larger terms — a cross-entropy the model has driven to 1e-9 — rounds at
            u·loss_scale, not at u·|J|; `GradWatch` passes the largest loss of its checks.
        autocast: the autocast dtype training runs under, for the training-kernels
            measurement (`options.kernels`): "auto" (the autocast active where
            check_module is called, if any), None, "bfloat16" or "float16". `GradWatch`
            passes the one its probe capture saw around the training forward.

    Besides central differences on the float64 copy ("backprop definition"), the check
    measures the gradient as training computes it — parameter dtypes, autocast, the compiled
    module, custom ops, device — against the float64 one ("training kernels",
    `report.kernels`; see `gradwatch.engine.kernels`). A float32 eager model on CPU without
    autocast or custom autograd ops trains on the float64 path's own code: then it says so
    (status "same") and spends nothing.

    Example:
        >>> import torch, gradwatch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 1))
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> report = gradwatch.check_module(
        ...     model, (x, y), lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> report.verdict, report.mode, report.coordinates
        ('ok', 'auto', 21)
    """
    torch = require_torch()
    options, settings = check_settings(
        "check_module", options, loss_scale=loss_scale, mode=mode, eps=eps, budget=budget,
        thresholds=thresholds, seed=seed, include=include, exclude=exclude, samples=samples,
        directions=directions, top_k=top_k,
    )
    if batching not in ("auto", "loop", "vmap"):
        raise ConfigError(f"batching must be 'auto', 'loop' or 'vmap', got {batching!r}.")
    if not isinstance(model, torch.nn.Module):
        raise InputError(
            f"model must be a torch.nn.Module, got {type(model).__name__}. For plain numpy "
            f"parameters use gradwatch.check(cost, params, grads)."
        )
    if batch is None:
        raise InputError(
            "batch is None: check_module evaluates the loss on a batch. Pass the inputs the "
            "model trains on (a tensor, a tuple (x, y), or a dict as a Hugging Face model "
            "takes), e.g. check_module(model, (x, y), loss_fn)."
        )
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(
            f"loss_fn must be a function loss_fn(model, batch) -> scalar tensor, got "
            f"{type(loss_fn).__name__} {loss_fn!r}. {LOSS_FN_HELP}"
        )
    live = unwrap_model(model)
    if sharding_of(live) is not None and _distributed(torch):
        return _check_sharded(live, batch, loss_fn, options, batching=batching,
                              progress=progress, loss_scale=loss_scale, autocast=autocast)
    refuse_sharded(live)
    names = select_parameters(live, options.include, options.exclude)
    path = None
    if options.kernels == "auto":
        from gradwatch.engine.kernels import training_path  # imports torch: not at gradwatch's

        path = training_path(model, names, autocast)
    with preserved_global_state(torch):
        shadow = float64_shadow(torch, live)
        shadow_batch = to_float64(torch, batch)
        resolved_loss = loss_fn if loss_fn is not None else default_loss
        objective = _ModuleObjective(torch, shadow, shadow_batch, resolved_loss, names, batching)
        # custom autograd ops decide whether a float32 CPU model is measured at all (the graph
        # walk is then the only cost), and are named in the reasons of any measurement
        objective.find_custom = path is not None
        with single_thread(torch):  # one backward on a probe batch: small ops
            analytic = _first_evaluation(objective, batch, loss_fn is not None)
        probe = {
            "source": "check_module",
            "model": type(live).__name__,
            "batch": describe_batch(batch),
            "parameters": int(sum(p.numel() for p in live.parameters() if p.requires_grad)),
            "loss_fn": "given" if loss_fn is not None else "model output .loss",
        }
        if objective.unused:
            probe["unused_parameters"] = objective.unused
        with resolve_progress(progress, "gradwatch check") as report_progress:
            report = run_check(objective, analytic, settings, probe=probe,
                               progress=report_progress)
        if path is not None:
            report.kernels = _measure_kernels(objective, path, analytic, batch, resolved_loss,
                                              settings)
            fold_kernels(report)
    for name in objective.unused:
        layer = report.layers[name]
        if layer.verdict == "ok":
            layer.notes.append("the loss does not depend on this parameter (autograd returned "
                               "no gradient and dθapprox agrees)")
        else:
            why = (f"autograd returned no gradient for '{name}', yet the loss changes with it: "
                   f"a stray .detach(), torch.no_grad() or a custom backward returning None")
            layer.notes.append(why)
            report.reasons.append(why)
    report.probe["batching"] = objective.batching_used()
    report.probe["casts_kept_float64"] = int(sum(objective.guard.prevented.values()))
    return report


# ---------------------------------------------------------------------- helpers
def _distributed(torch: Any) -> bool:
    """A process group is up with more than one rank (a sharded check is a collective)."""
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _check_sharded(live: Any, batch: Any, loss_fn: LossFn | None, options: CheckOptions,
                   **kwargs: Any) -> CheckReport:
    """An FSDP2 model: a collective of every rank (`gradwatch.engine.sharded`). Rank 0 checks
    the gathered copy; every rank returns rank 0's report (or raises its error)."""
    import torch.distributed as dist

    from gradwatch.engine.sharded import GATHER_TIMEOUT, gather_unsharded, share

    gathered = gather_unsharded(live, strategy=options.sharded)
    if gathered.error is not None:
        raise UnsupportedModelError(
            f"the sharded ({gathered.kind}) check could not gather the model: {gathered.error}")
    if gathered.strategy == "collective":
        from gradwatch.engine.collective import collective_check

        return collective_check(live, batch, loss_fn, options.settings(
            "check_module", loss_scale=kwargs.get("loss_scale")), timeout=GATHER_TIMEOUT,
            why=gathered.reason)
    outcome: Any = None
    if dist.get_rank() == 0:
        try:
            report = check_module(gathered.model, batch, loss_fn, options=options, **kwargs)
            report.probe["sharding"] = {"kind": gathered.kind, "strategy": gathered.strategy,
                                        "why": gathered.reason}
            outcome = report
        except Exception as exc:
            outcome = exc
    gathered.model = None  # the full copy: freed before the others go on
    outcome = share(outcome)
    if isinstance(outcome, BaseException):
        if dist.get_rank() == 0:
            raise outcome
        raise InputError(f"the check of the sharded model on rank 0 failed: "
                         f"{type(outcome).__name__}: {outcome}") from outcome
    return outcome


def _measure_kernels(
    objective: _ModuleObjective,
    path: Any,
    analytic: dict[str, Vector],
    batch: Any,
    loss_fn: LossFn,
    settings: Any,
) -> KernelReport:
    """The training-kernels measurement (`gradwatch.engine.kernels`), or "same"."""
    from gradwatch.engine import kernels

    thresholds = settings.kernel_thresholds
    if not path.differences(objective.custom_ops):
        return KernelReport(status="same", device=path.device, thresholds=thresholds, reasons=[
            "the training path is the float64 check's own (float32 eager on CPU, no autocast, "
            "no custom autograd op): central differences cover it, nothing more to measure"])

    def measure() -> Any:
        training, dtype, ops = kernels.training_gradients(
            path, loss_fn, batch, objective.names, objective._scalar)
        emulated = objective.emulated_gradients(dtype, kernels.loss_scale(dtype))
        shapes = {name: tuple(objective.parameters[name].shape) for name in objective.names}
        layers, distance, reference = kernels.judge(
            analytic, training, emulated, shapes, dtype, thresholds, settings.top_k)
        return layers, distance, reference, dtype, ops

    report: KernelReport = kernels.build_report(path, measure, objective.custom_ops,
                                                thresholds)
    report.reasons[:0] = [f"training kernels: {note}" for note in path.notes]
    return report


def fold_kernels(report: CheckReport) -> None:
    """Fold the training-kernels verdict into the check's (keeping the central-difference
    one as `definition_verdict`), with its reasons."""
    kernels = report.kernels
    if kernels is None or kernels.verdict is None:  # not measured: "same", "off"
        return
    report.definition_verdict = report.verdict
    if kernels.verdict == "ok":
        return
    report.verdict = worst_verdict(report.verdict, kernels.verdict)
    report.reasons += [reason for reason in kernels.reasons if reason not in report.reasons]


def _first_evaluation(objective: _ModuleObjective, batch: Any, given: bool) -> dict[str, Vector]:
    """dθ by backprop: the first call of the user's code, so its failures are explained."""
    try:
        return objective.analytic_gradients()
    except GradwatchError:
        raise
    except Exception as exc:
        call = "loss_fn(model, batch)" if given else "the model's own loss"
        raise LossError(
            f"{call} raised {type(exc).__name__}: {exc}. gradwatch evaluates it on a float64 "
            f"copy of the model with the batch {describe_batch(batch)} (floating tensors cast "
            f"to float64); the batch must be what the model's forward takes (shapes, keys) and "
            f"the loss must work in float64. Check the batch against a training step's, or "
            f"pass probe=/batch= with the right shapes. {LOSS_FN_HELP}"
        ) from exc


def _loss_module(torch: Any, shadow: Any, loss_fn: LossFn, batch: Any) -> Any:
    class LossModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = shadow

        def forward(self) -> Any:
            return loss_fn(self.model, batch)

    return LossModule()


class _ModuleObjective:
    """The engine's `Objective` over a float64 shadow module."""

    def __init__(
        self,
        torch: Any,
        shadow: Any,
        batch: Any,
        loss_fn: LossFn,
        names: list[str],
        batching: Batching,
    ) -> None:
        self.torch = torch
        self.shadow = shadow
        self.batch = batch
        self.loss_fn = loss_fn
        self.names = names
        self.parameters = dict(shadow.named_parameters())
        self.batching = batching
        self.choice: dict[str, str] = {}  # tensor → "loop" | "vmap", once measured
        self.used: dict[str, set[str]] = {}  # tensor → strategies actually used
        self.vmap_broken: str | None = None
        self.unused: list[str] = []
        self.calls = 0
        self.wrapper = _loss_module(torch, shadow, loss_fn, batch)
        self.device_type = _device_type(shadow)
        # Float64 end to end: the model's own casts to float32/16 stay float64 (`_precision`).
        # The guard costs a little per op; a model that makes no such conversion in its
        # first (analytic) evaluation runs without it afterwards.
        from gradwatch.engine.precision import Float64Guard  # imports torch: not at gradwatch's

        self.guard = Float64Guard()
        self.guard_needed = True
        self.originals: dict[str, Any] | None = None
        #: Tensors the joint screen left at θ ± δ: restored only when an evaluation other
        #: than the next joint one needs θ (a restore is a pass over the weights).
        self.perturbed: set[str] = set()
        self.reference: float | None = None  # J(θ) by a plain call, for vmap's control row
        self.find_custom = False  # walk the first evaluation's graph for custom autograd ops
        self.custom_ops: list[str] = []
        # The float64 shadow must not run under the trainer's autocast: when the check is
        # called inside one, each evaluation leaves it (entering the context costs as much as
        # a small op, so it is skipped when no autocast is active).
        self.under_autocast = _autocast_enabled(torch, self.device_type)

    # -------------------------------------------------------------- evaluation
    def _scalar(self, value: Any, where: str) -> Any:
        torch = self.torch
        if not isinstance(value, torch.Tensor):
            if isinstance(value, (int, float)):
                raise LossError(
                    f"{where} returned a Python {type(value).__name__}, not a tensor: it is "
                    f"cut off from autograd. Return the loss tensor itself (no .item())."
                )
            raise LossError(f"{where} returned {type(value).__name__}; expected a scalar tensor.")
        if value.numel() != 1:
            raise LossError(
                f"{where} returned a tensor of shape {list(value.shape)}; expected a scalar "
                f"loss. Reduce it with .mean() or .sum()."
            )
        if not (value.is_floating_point() or value.is_complex()):
            raise LossError(f"{where} returned dtype {value.dtype}; expected a float loss.")
        return value.reshape(())

    def _loss_tensor(self) -> Any:
        with self._full_precision(), self._guarded():
            return self._scalar(self.loss_fn(self.shadow, self.batch), "loss_fn(model, batch)")

    def _guarded(self) -> Any:
        return self.guard if self.guard_needed else nullcontext()

    def _full_precision(self) -> Any:
        if not self.under_autocast:
            return nullcontext()
        return self.torch.autocast(device_type=self.device_type, enabled=False)

    def loss(self) -> float:
        self._restore()
        return self._loss_here()

    def _loss_here(self) -> float:
        """J at the parameters as they are now (θ, or θ ± δ inside `joint_losses`)."""
        with self.torch.no_grad():
            return float(self._loss_tensor().item())

    def _restore(self) -> None:
        """Put back θ where the joint screen left θ ± δ (see `perturbed`)."""
        if self.perturbed and self.originals is not None:
            for name in self.perturbed:
                self.parameters[name].data.copy_(self.originals[name])
        self.perturbed.clear()

    def analytic_gradients(self) -> dict[str, Vector]:
        torch = self.torch
        self._restore()
        selected = [self.parameters[name] for name in self.names]
        with torch.enable_grad():
            loss = self._loss_tensor()
        if not loss.requires_grad:
            raise LossError(
                "loss_fn(model, batch) returned a tensor that does not require grad: it "
                "does not depend on any checked parameter (detached, or computed under "
                "torch.no_grad()). Return the loss built from model(...)'s output."
            )
        if self.find_custom:
            from gradwatch.engine.kernels import custom_autograd_nodes

            self.custom_ops = custom_autograd_nodes(loss)
        grads = torch.autograd.grad(loss, selected, allow_unused=True)
        # Nothing to keep at float64: the later evaluations may skip the guard.
        self.guard_needed = bool(self.guard.prevented or self.guard.escaped)
        analytic = {}
        for name, parameter, grad in zip(self.names, selected, grads):
            if grad is None:
                self.unused.append(name)
                grad = torch.zeros_like(parameter)
            # no copy: the gradient is autograd's fresh tensor, and the engine only reads it
            analytic[name] = grad.detach().to("cpu", torch.float64).numpy()
        return analytic

    def emulated_gradients(self, dtype: Any, scale: float) -> dict[str, Vector]:
        """g_E: dθ by the float64 path with every op rounded to `dtype` (`RoundingMode`),
        of the loss times `scale` (then divided), as the training gradient is taken."""
        from gradwatch.engine.kernels import RoundingMode

        torch = self.torch
        self._restore()
        selected = [self.parameters[name] for name in self.names]
        with torch.enable_grad(), RoundingMode(dtype):
            loss = self._loss_tensor()
            grads = torch.autograd.grad(loss * scale if scale != 1.0 else loss, selected,
                                        allow_unused=True)
        return {name: (torch.zeros_like(parameter) if grad is None else grad.detach())
                .to("cpu", torch.float64).numpy() / scale
                for name, parameter, grad in zip(self.names, selected, grads)}

    def coordinate_losses(
        self, layer: str, indices: NDArray[np.int64], eps: float
    ) -> tuple[Vector, Vector]:
        torch = self.torch
        self._restore()
        flat = self.parameters[layer].data.view(-1)
        index = torch.as_tensor(indices, device=flat.device)
        base = flat[index]

        def stacked(rows: slice) -> Any:
            count = rows.stop - rows.start
            chunk = flat.unsqueeze(0).repeat(2 * count, 1)
            position = torch.arange(count, device=flat.device)
            chosen = index[rows]
            chunk[position, chosen] = base[rows] + eps  # θ + ε·e_i, exactly as the recipe
            chunk[position + count, chosen] = base[rows] - eps
            return chunk

        def in_place(k: int) -> tuple[float, float]:
            i = int(indices[k])
            original = flat[i].item()  # float64 → Python float → float64: exact
            flat[i] = original + eps  # one IEEE double rounding, as in float64 tensors
            plus = self.loss()
            flat[i] = original - eps
            minus = self.loss()
            flat[i] = original  # restored exactly
            return plus, minus

        return self._evaluate(layer, indices.size, stacked, in_place)

    def direction_losses(
        self, layer: str, directions: Vector, steps: Vector
    ) -> tuple[Vector, Vector, Vector]:
        torch = self.torch
        self._restore()
        flat = self.parameters[layer].data.view(-1)
        signs = torch.as_tensor(directions, dtype=flat.dtype, device=flat.device)
        scale = torch.as_tensor(steps, dtype=flat.dtype, device=flat.device)[:, None]
        # The step each direction realises, ((θ + s·v) − (θ − s·v)) / 2, enters the analytic
        # projection; it is exact because the two points are close (Sterbenz).
        realised = torch.empty(directions.shape, dtype=flat.dtype, device=flat.device)
        original = flat.clone()
        up = torch.empty_like(flat)  # reused: no fresh multi-megabyte buffers per evaluation

        def stacked(rows: slice) -> Any:
            delta = signs[rows] * scale[rows]
            ups, downs = original + delta, original - delta
            torch.sub(ups, downs, out=realised[rows]).div_(2)
            return torch.cat([ups, downs])

        def in_place(k: int) -> tuple[float, float]:
            step = float(steps[k])  # s·(±1) is exact, so θ + s·v is rounded once, as above
            try:
                torch.add(original, signs[k], alpha=step, out=up)
                flat.copy_(up)
                plus = self.loss()
                torch.add(original, signs[k], alpha=-step, out=flat)
                minus = self.loss()
                torch.sub(up, flat, out=realised[k]).div_(2)
            finally:
                flat.copy_(original)
            return plus, minus

        plus, minus = self._evaluate(layer, directions.shape[0], stacked, in_place)
        return plus, minus, realised.to("cpu").numpy()

    def _evaluate(
        self,
        layer: str,
        count: int,
        stacked: Callable[[slice], Any],
        in_place: Callable[[int], tuple[float, float]],
    ) -> tuple[Vector, Vector]:
        """Evaluate `count` ± pairs, with vmap chunks or the loop, whichever measured faster."""
        plus, minus = np.empty(count), np.empty(count)
        numel = self.parameters[layer].numel()
        chunk = int(max(1, min(MAX_CHUNK, CHUNK_BYTES // (16 * max(numel, 1)))))

        def vmap_rows(start: int) -> int | None:
            rows = slice(start, min(start + chunk, count))
            values = self._vmapped(layer, stacked(rows))
            if values is None:
                return None
            plus[rows], minus[rows] = values
            return rows.stop

        choice = self.choice.get(layer)
        if self.batching == "loop" or self.vmap_broken is not None:
            choice = "loop"
        elif self.batching == "vmap":
            choice = "vmap"
        elif choice is None and count < 2 * chunk:
            choice = "loop"  # too few evaluations to amortise measuring
        done = 0
        if choice is None:
            # Measure: one untimed chunk (a process's first vmap call carries ~0.5 s of
            # set-up), one timed chunk, then a few timed loop evaluations. Results are kept.
            choice = "loop"
            warmed = vmap_rows(0)
            if warmed is not None:
                started = time.perf_counter()
                timed = vmap_rows(warmed) if warmed < count else None
                done = warmed if timed is None else timed
                if timed is not None:
                    vmap_cost = (time.perf_counter() - started) / (2 * (timed - warmed))
                    choice, done = self._measure_loop(vmap_cost, in_place, plus, minus, done)
            self.choice[layer] = choice
        while done < count and choice == "vmap":
            reached = vmap_rows(done)
            if reached is None:
                choice = "loop"
                break
            done = reached
        if done < count:
            with single_thread(self.torch):
                for k in range(done, count):
                    plus[k], minus[k] = in_place(k)
        self.used.setdefault(layer, set()).add(choice)
        return plus, minus

    @staticmethod
    def _measure_loop(
        vmap_cost: float,
        in_place: Callable[[int], tuple[float, float]],
        plus: Vector,
        minus: Vector,
        done: int,
    ) -> tuple[str, int]:
        """Time a few loop evaluations (their results are kept) against the vmap chunk."""
        trials = min(4, plus.size - done)
        if trials == 0:
            return "vmap", done
        started = time.perf_counter()
        for k in range(done, done + trials):
            plus[k], minus[k] = in_place(k)
        loop_cost = (time.perf_counter() - started) / (2 * trials)
        return ("vmap" if vmap_cost < loop_cost else "loop"), done + trials

    def _vmapped(self, layer: str, values: Any) -> tuple[Vector, Vector] | None:
        """J for each stacked copy of `layer` in one vmap call; None if vmap cannot run it."""
        torch = self.torch
        key = "model." + layer
        shape = self.parameters[layer].shape

        def one(value: Any) -> Any:
            output = torch.func.functional_call(self.wrapper, {key: value.view(shape)}, ())
            return self._scalar(output, "loss_fn(model, batch)")

        # A control row at θ itself: vmap must give the plain call's J(θ), or it evaluates a
        # different function (a loss that reads p.requires_grad, say, which functional_call's
        # stand-in tensors do not have) and the loop is used instead.
        control = self.parameters[layer].data.reshape(1, -1)
        try:
            with torch.no_grad(), self._full_precision(), self._guarded():
                losses = torch.func.vmap(one)(torch.cat([values, control]))
        except Exception as exc:  # vmap cannot run every model: fall back to the loop
            self.vmap_broken = f"{type(exc).__name__}: {str(exc)[:200]}"
            return None
        result = losses.detach().to("cpu", torch.float64).numpy()
        if self.reference is None:
            self.reference = self.loss()
        if abs(result[-1] - self.reference) > 64 * ROUNDING * abs(self.reference):
            self.vmap_broken = (f"vmap evaluates the loss differently from a plain call (J(θ) "
                                f"{result[-1]!r} vs {self.reference!r})")
            return None
        half = (result.size - 1) // 2
        return result[:half], result[half:-1]

    # -------------------------------------------------------------- joint screen
    def joint_losses(
        self, perturbation: Mapping[str, tuple[Signs, float]]
    ) -> tuple[float, float]:
        """J(θ + δ), J(θ − δ) with every tensor moved at once by step · signs.

        The tensors are left at θ − δ: the next joint evaluation overwrites them from θ
        anyway, and any other evaluation restores θ first (`_restore`)."""
        torch = self.torch
        if self.originals is None:
            self.originals = {n: p.data.clone() for n, p in self.parameters.items()
                              if n in self.names}
        deltas = {}
        for name, (signs, step) in perturbation.items():
            parameter = self.parameters[name]
            # int8 ±1 stays int8 (1 byte per element to move to the device): add()
            # converts it on the fly, and step·(±1) is exact in any float dtype
            deltas[name] = (torch.as_tensor(signs, device=parameter.device)
                            .view(parameter.shape), float(step))
        for name in self.perturbed - deltas.keys():
            self.parameters[name].data.copy_(self.originals[name])
        self.perturbed = set(deltas)  # from the first add on, whatever happens next
        values = []
        for sign in (1.0, -1.0):
            for name, (signs_t, step) in deltas.items():
                # θ ± s·v, rounded once (s·(±1) is exact)
                torch.add(self.originals[name], signs_t, alpha=sign * step,
                          out=self.parameters[name].data)
            values.append(self._loss_here())
        return values[0], values[1]

    def scales(self) -> dict[str, float]:
        """RMS value of each checked tensor (caps the joint screen's steps)."""
        torch = self.torch
        self._restore()
        return {name: float(torch.linalg.vector_norm(self.parameters[name].detach()))
                / math.sqrt(max(self.parameters[name].numel(), 1)) for name in self.names}

    def by_design(self) -> dict[str, tuple[NDArray[np.int64], str]]:
        """Elements autograd leaves without gradient on purpose: an nn.Embedding's
        padding_idx row (its gradient is zeroed by the embedding's backward)."""
        torch = self.torch
        excluded: dict[str, tuple[NDArray[np.int64], str]] = {}
        owners = {id(p): n for n, p in self.parameters.items() if n in self.names}
        for module_name, module in self.shadow.named_modules():
            padding = getattr(module, "padding_idx", None)
            if not isinstance(module, torch.nn.Embedding) or padding is None:
                continue
            name = owners.get(id(module.weight))
            if name is None:
                continue
            rows, columns = module.weight.shape
            row = int(padding) % rows
            indices = np.arange(row * columns, (row + 1) * columns, dtype=np.int64)
            excluded[name] = (indices, f"padding_idx row {row} of nn.Embedding "
                                       f"'{module_name}' (autograd gives it no gradient)")
        return excluded

    def precision_diagnosis(self) -> dict[str, Any]:
        """What the guard saw, and the modules that still lose float64 (see `_precision`)."""
        from gradwatch.engine.precision import find_lossy_modules

        torch = self.torch
        self._restore()
        generator = torch.Generator().manual_seed(0)
        with self._full_precision(), self.guard:
            lossy = find_lossy_modules(
                self.shadow, lambda: self.loss_fn(self.shadow, self.batch), generator=generator)
        return {"prevented": dict(self.guard.prevented), "escaped": dict(self.guard.escaped),
                "lossy_modules": [(m.name, m.kind, m.mismatch) for m in lossy if not m.kinked],
                "kinked_modules": [(m.name, m.kind, m.mismatch) for m in lossy if m.kinked]}

    def batching_used(self) -> dict[str, Any]:
        used: dict[str, Any] = {
            "mode": self.batching,
            "per_tensor": {name: "+".join(sorted(kinds)) for name, kinds in self.used.items()},
        }
        if self.vmap_broken is not None:
            used["vmap_unavailable"] = self.vmap_broken
        return used


def _autocast_enabled(torch: Any, device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())


def _device_type(module: Any) -> str:
    for parameter in module.parameters():
        return str(parameter.device.type)
    return "cpu"
