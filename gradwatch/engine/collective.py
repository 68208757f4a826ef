"""The collective strategy for FSDP2 models: a gradient check in which no rank gathers.

Every rank takes part, at the agreed step, as in a training step. Each rank perturbs only its
own shards (the local rows of each `Shard(0)` DTensor), along ±1 directions drawn from a seed
shared by all ranks (tensor t, direction j, rank r get generator seed (seed, j, t, r)); the
loss is evaluated through the sharded module by all ranks together (FSDP's forward gathers
layer by layer, as in training) and

    J = (1/W) Σ_r L_r          (each rank's loss on its own batch, all-reduced)

whose gradient is what FSDP2's reduce-scatter (average) leaves in each rank's `.grad` shard. The
directional derivative along δ is compared with Σ_r (local gradient shard · local δ shard),
all-reduced — no rank ever holds more than its shards.

Evaluations run in the parameters' own dtype (float32 on CPU; the sharded storage cannot be
upcast in place), so the maths of the float64 screen (`gradwatch.engine.screen`) is redone for
a coarse loss:

- Steps. Tensor t moves by s_t·v_t with s_t = c / ||dθ_t|| (equalised: every tensor adds ≈ c
  to the projection), capped at STEP_CAP × its rms value; c = SIGNAL · u · max(|J|, loss_scale)
  with u the dtype's unit roundoff. The perturbed value is rounded to the storage dtype, so the
  step actually taken, δ± = fl(θ ± s·v) − θ, is what the analytic projection uses:
  a = dθ·(δ₊ − δ₋)/2, n = (J(θ + δ₊) − J(θ + δ₋))/2.
- Truncation. With d(s) = n(s) − a(s) = B·s + T·s³ (B: a gradient error, linear in s; T: the
  third-order term) and the same direction at r·s, Richardson's combination
      B̂ = (d(r·s)/r − r²·d(s)) / (1 − r²)
  removes T·s³ and keeps a gradient error whole.
- Noise. The curvature-free combination D(r·s) − r²·D(s), D(s) = J₊ + J₋ − 2J, is rounding
  only (std NOISE_SPREAD · σ_J); its rms over the directions, floored at u·|J|, gives σ_J, and
  σ_B̂ = σ_J/√2 · √(1/r² + r⁴)/(1 − r²). A direction fires when |B̂| > SIGNIFICANCE · σ_B̂.
  A relative error ρ in one tensor adds ≈ 2ρ·c·|Z| to B̂, so the screen sees
  ρ ≥ SIGNIFICANCE · σ_B̂ / (2c) — the resolution each report states.
- Group testing. A firing direction is restricted to half of the tensors (4 evaluations);
  the other half's B̂ is the difference (linearity); halves that stay significant are split
  again, O(log K) levels per bug, down to single tensors. Each tensor found is measured along
  MEASURE_DIRECTIONS more directions of its own: ||e_t||² ≈ mean(B̂²) − σ_B̂², its distance
  ||e_t|| / (√(||dθ_t||² + ||e_t||²) + ||dθ_t||).

The live parameters are restored bit for bit from saved copies; `.grad`, the modules' training
flags and the RNG are restored; optimizer state is never touched. The check's own reductions
run on gradwatch's gloo group with a timeout and carry a failure flag, so a rank that fails
makes every rank stop at the same place; the forwards themselves are FSDP's collectives on
the training's process group (its timeout).

Imports: gradwatch.common, engine.report, engine.types, engine.sharded, engine.torch_model
(torch when a function is called).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from gradwatch.common.errors import InputError, UnsupportedModelError
from gradwatch.engine.report import CheckReport, LayerReport, Verdict, worst_verdict
from gradwatch.engine.types import CheckSettings

__all__ = ["collective_check"]

#: Each tensor's share of the projection, in units of the loss's rounding u·|J|: float64
#: evaluations (the twin), as in the float64 screen; evaluations in a lower training dtype.
SIGNAL = 1e6
SIGNAL_LOW = 1e5
#: The largest step, as a fraction of the tensor's rms value (or of 1e-2 for a tensor near 0).
STEP_CAP = 0.05
#: The second step of every direction, as a fraction of the first (not ½: see screen.RATIO).
RATIO = 0.6
#: Directions of the joint screen.
DIRECTIONS = 3
#: Extra directions measured per tensor that group testing found.
MEASURE_DIRECTIONS = 2
#: |B̂| above SIGNIFICANCE · σ_B̂ is a discrepancy.
SIGNIFICANCE = 10.0
#: A half of a firing set is split further when its |B̂| is above this many σ_B̂.
SPLIT_SIGNIFICANCE = 5.0
#: Std of D(r·s) − r²·D(s) in units of σ_J (J(θ) is shared by both second differences).
NOISE_SPREAD = math.sqrt(6 + 6 * RATIO**4 - 8 * RATIO**2)
#: σ_B̂ / σ_J.
B_SPREAD = math.sqrt(1 / RATIO**2 + RATIO**4) / (1 - RATIO**2) / math.sqrt(2)
#: Evaluations group testing may spend on localising in one check.
LOCALISE_LIMIT = 200


class _Abort(Exception):
    """Another rank failed: every rank stops the check at the same reduction."""


@dataclass
class _Tensor:
    name: str
    param: Any  # the live DTensor (or a replicated tensor)
    local: Any  # its local shard, a view of FSDP's storage
    saved: Any  # the shard's values before the check (restored bit for bit)
    grad: Any = None  # float64 local gradient
    norm: float = 0.0  # ||dθ_t|| over every rank
    rms: float = 0.0  # rms of θ_t over every rank
    numel: int = 0
    step: float = 0.0
    capped: bool = False
    shape: tuple[int, ...] = ()


@dataclass
class _Probe:
    """One direction (or its restriction to some tensors): Richardson's B̂ and its parts."""

    direction: int
    names: tuple[str, ...]
    b: float
    analytic: float
    numeric: float
    curvature_noise: float  # |D(r·s) − r²·D(s)| / NOISE_SPREAD, a sample of σ_J


@dataclass
class _Run:
    tensors: list[_Tensor]
    model: Any
    loss: Callable[[], Any]
    group: Any
    world: int
    rank: int
    seed: int
    dtype: Any
    names: list[str] = field(default_factory=list)  # agreed by every rank
    fallback: str | None = None  # why the evaluations run in the training dtype
    evaluations: int = 0
    evaluation_seconds: float = 0.0
    failure: str | None = None
    dirty: set[int] = field(default_factory=set)

    # ------------------------------------------------------------ reductions
    def reduce(self, values: list[float]) -> list[float]:
        """Σ over ranks of `values`, on gradwatch's group; a rank's failure travels as a flag
        in the same reduction, so every rank raises `_Abort` at the same place."""
        import torch
        import torch.distributed as dist

        packed = torch.tensor([*values, 1.0 if self.failure else 0.0], dtype=torch.float64)
        dist.all_reduce(packed, group=self.group)
        if packed[-1].item() > 0:
            raise _Abort(self.failure or "another rank failed")
        return [float(v) for v in packed[:-1].tolist()]

    # ------------------------------------------------------------ evaluations
    def signs(self, direction: int, index: int) -> Any:
        import torch

        tensor = self.tensors[index]
        key = ((self.seed * 1_000_003 + direction) * 1_000_003 + index) * 1_000_003 + self.rank
        generator = torch.Generator().manual_seed(key % (1 << 63))
        return (torch.randint(0, 2, tuple(tensor.local.shape), generator=generator,
                              dtype=torch.int8).to(torch.float64) * 2 - 1)

    def _place(self, moves: dict[int, Any]) -> float:
        """Set the shards to θ + moves (rounded to the storage dtype; the others to θ) and
        return this rank's dθ·δ for the step actually taken."""
        import torch

        projection = 0.0
        with torch.no_grad():
            for index in self.dirty - moves.keys():
                self.tensors[index].local.copy_(self.tensors[index].saved)
            for index, move in moves.items():
                tensor = self.tensors[index]
                moved = (tensor.saved.double() + move).to(tensor.local.dtype)
                tensor.local.copy_(moved)
                taken = moved.double() - tensor.saved.double()
                projection += float(torch.sum(tensor.grad * taken))
        self.dirty = set(moves)
        return projection

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            for tensor in self.tensors:
                tensor.local.copy_(tensor.saved)
        self.dirty = set()

    def _forward(self) -> float:
        import torch

        started = time.perf_counter()
        try:
            with torch.no_grad():
                value = float(self.loss().detach().double().item())
        except Exception as exc:
            self.failure = f"rank {self.rank}: {type(exc).__name__}: {exc}"
            value = math.nan
        finally:
            _reshard(self.model)
        self.evaluations += 1
        self.evaluation_seconds += time.perf_counter() - started
        return value

    def loss_at_center(self) -> float:
        self._place({})
        (total,) = self.reduce([self._forward()])
        return total / self.world

    def pair(self, moves: dict[int, Any]) -> tuple[float, float, float]:
        """(J₊ + J₋ − 2J to be completed by the caller, n, a): J(θ + δ₊), J(θ + δ₋) and the
        projections, each summed over the ranks."""
        import torch

        plus = self._place(moves)
        j_plus = self._forward()
        minus = self._place({i: torch.neg(m) for i, m in moves.items()})
        j_minus = self._forward()
        j_plus, j_minus, plus, minus = self.reduce([j_plus, j_minus, plus, minus])
        j_plus, j_minus = j_plus / self.world, j_minus / self.world
        return j_plus + j_minus, (j_plus - j_minus) / 2, (plus - minus) / 2

    def probe(self, direction: int, indices: list[int], center: float) -> _Probe:
        """Richardson's B̂ along `direction` restricted to `indices` (4 evaluations)."""
        signs = {i: self.signs(direction, i) for i in indices}
        parts = []
        for scale in (1.0, RATIO):
            moves = {i: signs[i] * (self.tensors[i].step * scale) for i in indices}
            parts.append(self.pair(moves))
        (sum_s, n_s, a_s), (sum_r, n_r, a_r) = parts
        d_s, d_r = n_s - a_s, n_r - a_r
        b = (d_r / RATIO - RATIO**2 * d_s) / (1 - RATIO**2)
        curvature = ((sum_r - 2 * center) - RATIO**2 * (sum_s - 2 * center))
        return _Probe(direction, tuple(self.tensors[i].name for i in indices), b, a_s, n_s,
                      abs(curvature) / NOISE_SPREAD)


def collective_check(
    model: Any,
    batch: Any,
    loss_fn: Callable[[Any, Any], Any] | None,
    settings: CheckSettings,
    *,
    timeout: float,
    failure: str | None = None,
    why: str = "",
) -> CheckReport:
    """Collective (call on every rank): check the FSDP2 `model` without gathering it. Every
    rank returns the same report, built from all-reduced values; a failure on any rank raises
    the same `InputError` on every rank. `failure` is this rank's reason for not taking part
    (its batch could not be found...): the others learn it at the first agreement.

    A reduction that times out (a rank stalled or gone) raises on the ranks waiting for it;
    at the end every rank learns, over the training's own group, whether any rank's check
    broke that way, and then all of them drop gradwatch's group (a new one is made, by every
    rank, at the next check)."""
    import torch.distributed as dist

    from gradwatch.engine.sharded import _any_rank, _groups

    rank = dist.get_rank()
    failed: Exception | None = None
    report = None
    try:
        report = _collective(model, batch, loss_fn, settings, timeout=timeout,
                             failure=failure, why=why)
    except Exception as exc:
        failed = exc
    if _any_rank(failed is not None and not isinstance(failed, InputError)):
        _groups.clear()
    if isinstance(failed, InputError):
        raise failed
    if failed is not None:
        raise InputError(f"rank {rank}: a collective of the check failed (timeout {timeout:g} "
                         f"s): {type(failed).__name__}: {str(failed)[:200]}") from None
    assert report is not None
    return report


def _collective(
    model: Any,
    batch: Any,
    loss_fn: Callable[[Any, Any], Any] | None,
    settings: CheckSettings,
    *,
    timeout: float,
    failure: str | None,
    why: str,
) -> CheckReport:
    import torch
    import torch.distributed as dist

    from gradwatch.engine.precision import Float64Guard
    from gradwatch.engine.sharded import _group
    from gradwatch.engine.torch_model import default_loss, to_float64

    started = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    group = _group(timeout)
    tensors: list[_Tensor] = []
    try:
        if failure is None:
            tensors = _tensors(model)
    except Exception as exc:
        failure = f"rank {rank}: {type(exc).__name__}: {exc}"
    # agreement 1: every rank's failure, and rank 0's settings (seed, thresholds, loss scale)
    box: list[Any] = [None] * world
    dist.all_gather_object(box, (failure, [t.name for t in tensors],
                                 settings if rank == 0 else None), group=group)
    failures = [f for f, _, _ in box if f]
    if not failures and any(names != box[0][1] for _, names, _ in box):
        failures = ["the ranks hold different parameter lists (the same model must be "
                    "sharded on every rank)"]
    if failures:
        raise InputError(f"the collective check could not start: {'; '.join(failures)}")
    settings = box[0][2]
    loss = loss_fn or default_loss
    # float64 evaluations on a twin when every rank can build it, else float32 in place
    twin, twin_failure = None, None
    try:
        twin = float64_twin(model)
    except Exception as exc:
        twin_failure = f"rank {rank}: {type(exc).__name__}: {exc}"
    flag = torch.tensor([1.0 if twin_failure else 0.0], dtype=torch.float64)
    dist.all_reduce(flag, group=group)
    target, used = (twin, to_float64(torch, batch)) if flag.item() == 0 else (model, batch)
    guard = Float64Guard if target is twin else nullcontext

    def evaluate() -> Any:
        with guard():
            return loss(target, used)

    run = _Run([], target, evaluate, group, world, rank, settings.seed,
               torch.float64 if target is twin else tensors[0].local.dtype,
               names=[t.name for t in tensors])
    run.fallback = twin_failure or ("another rank could not build the float64 twin"
                                    if target is not twin else None)
    try:
        with _frozen(target):
            try:
                center = _gradients(run)
                result = _screen_and_localise(run, center, settings)
            finally:
                run.restore()
    except _Abort as exc:
        raise InputError(f"the collective check failed: {exc}") from None
    seconds = time.perf_counter() - started
    return _report(run, result, settings, seconds=seconds, why=why)


# ---------------------------------------------------------------------- the float64 twin
def float64_twin(model: Any) -> Any:
    """Collective: a float64 FSDP2 twin of `model`, sharded like it (the same modules given
    to `fully_shard`, on the same mesh), each rank holding the float64 value of its own shards
    and nothing more. Built on the meta device (no full tensor is ever allocated), then
    materialised shard by shard; buffers are copied (in float64 when floating). The live model
    is only read. The twin's parameters and FQNs are the user's; a bug in the model's code is
    in the twin, which runs the same modules."""
    import torch
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from gradwatch.engine.sharded import _copy_module

    live = dict(model.named_parameters())
    meshes = {id(p.device_mesh): p.device_mesh for p in live.values()
              if type(p).__name__ == "DTensor"}
    if len(meshes) != 1:
        raise UnsupportedModelError(f"the collective strategy needs every parameter on one "
                                    f"FSDP2 mesh; found {len(meshes)}")
    (mesh,) = meshes.values()
    device = next(iter(live.values())).to_local().device
    meta: dict[int, Any] = {}
    for parameter in model.parameters():
        meta[id(parameter)] = torch.nn.Parameter(
            torch.empty(tuple(parameter.shape), dtype=torch.float64, device="meta"),
            requires_grad=parameter.requires_grad)
    twin = _copy_module(model, meta)
    sharded = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    for name in sorted(sharded, key=lambda n: -n.count(".") - (n != "")):  # leaves first
        fully_shard(twin.get_submodule(name), mesh=mesh)
    buffers = dict(model.named_buffers(remove_duplicate=False))
    twin.to_empty(device=device)
    with torch.no_grad():
        for name, parameter in twin.named_parameters():
            parameter.to_local().copy_(live[name].to_local().double())
        for prefix, module in twin.named_modules(remove_duplicate=False):
            for key, buffer in module._buffers.items():
                if buffer is not None:  # float64 like the parameters (BatchNorm's statistics)
                    value = buffers[f"{prefix}.{key}" if prefix else key].detach()
                    module._buffers[key] = value.to(
                        device, torch.float64 if value.is_floating_point() else value.dtype,
                        copy=True)
    return twin


# ---------------------------------------------------------------------- phases
def _tensors(model: Any) -> list[_Tensor]:
    import torch

    tensors = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or not parameter.is_floating_point():
            continue
        if type(parameter).__name__ == "DTensor":
            placements = tuple(parameter.placements)
            if len(placements) != 1 or type(placements[0]).__name__ != "Shard" or \
                    placements[0].dim != 0:
                raise UnsupportedModelError(
                    f"parameter {name!r} is sharded as {placements}; the collective strategy "
                    f"perturbs FSDP2's Shard(0) rows only (HSDP and tensor parallelism are "
                    f"not supported)")
            with torch.no_grad():
                local = parameter.to_local()
        else:
            raise UnsupportedModelError(
                f"parameter {name!r} is not an FSDP2 DTensor: the collective strategy checks "
                f"models sharded with fully_shard on every parameter")
        tensors.append(_Tensor(name, parameter, local, local.detach().clone(),
                               numel=int(math.prod(parameter.shape)),
                               shape=tuple(parameter.shape)))
    if not tensors:
        raise InputError("the model has no trainable floating-point parameters to check")
    return tensors


@contextmanager
def _frozen(model: Any) -> Iterator[None]:
    """Eval mode (dropout off), every `.grad` set aside, RNG saved; all restored after. The
    gradients are restored by name onto the parameters the model has then (FSDP2 may replace
    a parameter object at its lazy initialisation, in the first forward)."""
    import torch

    modes = [(module, module.training) for module in model.modules()]
    grads = {name: parameter.grad for name, parameter in model.named_parameters()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        model.eval()
        yield
    finally:
        for name, parameter in model.named_parameters():
            parameter.grad = grads.get(name)
        for module, training in modes:
            module.training = training
        _reshard(model)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _gradients(run: _Run) -> float:
    """dθ by the training's own backward through the sharded module (each rank keeps its
    shards of the averaged gradient), the norms and rms values over every rank, the steps; and
    J(θ) evaluated without gradients, as every other evaluation is."""
    import torch

    for parameter in run.model.parameters():
        parameter.grad = None
    try:
        run.loss().backward()
        run.tensors = _tensors(run.model)  # after the forward: FSDP2's own parameter objects
        for tensor in run.tensors:
            grad = tensor.param.grad
            tensor.grad = (torch.zeros_like(tensor.saved, dtype=torch.float64) if grad is None
                           else grad.to_local().detach().double().clone())
    except Exception as exc:
        run.failure = f"rank {run.rank}: {type(exc).__name__}: {exc}"
    finally:
        for parameter in run.model.parameters():
            parameter.grad = None
        _reshard(run.model)
    if run.failure is None and [t.name for t in run.tensors] != run.names:
        run.failure = f"rank {run.rank}: the parameters changed during the check's forward"
    sums = [0.0] * (2 * len(run.names))  # the same length on every rank, failed or not
    if run.failure is None:
        for index, tensor in enumerate(run.tensors):
            sums[2 * index] = float(torch.sum(tensor.grad**2))
            sums[2 * index + 1] = float(torch.sum(tensor.saved.double() ** 2))
    totals = run.reduce(sums)
    center = run.loss_at_center()
    for index, tensor in enumerate(run.tensors):
        tensor.norm = math.sqrt(totals[2 * index])
        tensor.rms = math.sqrt(totals[2 * index + 1] / max(tensor.numel, 1))
    return center


@dataclass
class _Result:
    center: float
    sigma_j: float
    sigma_b: float
    c: float
    probes: list[_Probe]
    fired: bool
    culprits: dict[str, list[_Probe]]
    localised: bool
    unit: float


def _screen_and_localise(run: _Run, center: float, settings: CheckSettings) -> _Result:
    import torch

    unit = float(torch.finfo(run.dtype).eps) / 2
    scale = max(abs(center), settings.loss_scale) if math.isfinite(center) else 0.0
    c = (SIGNAL if run.dtype == torch.float64 else SIGNAL_LOW) * unit * scale
    for tensor in run.tensors:
        cap = STEP_CAP * max(tensor.rms, 1e-2)
        tensor.step = c / tensor.norm if tensor.norm > 0 else cap
        tensor.capped = tensor.step > cap
        tensor.step = min(tensor.step, cap)
    everything = list(range(len(run.tensors)))
    probes = [run.probe(j, everything, center) for j in range(DIRECTIONS)]
    sigma_j = max(unit * scale,
                  math.sqrt(sum(p.curvature_noise**2 for p in probes) / len(probes)))
    sigma_b = B_SPREAD * sigma_j
    fired = [p for p in probes if abs(p.b) > SIGNIFICANCE * sigma_b]
    culprits: dict[str, list[_Probe]] = {}
    localised = True
    if fired and math.isfinite(center):
        strongest = max(fired, key=lambda p: abs(p.b))
        found, localised = _split(run, strongest, everything, center, sigma_b)
        for index, probe in found.items():
            measured = [probe] + [run.probe(DIRECTIONS + 1000 * (index + 1) + k, [index],
                                            center) for k in range(MEASURE_DIRECTIONS)]
            culprits[run.tensors[index].name] = measured
    return _Result(center, sigma_j, sigma_b, c, probes, bool(fired), culprits, localised, unit)


def _split(run: _Run, probe: _Probe, indices: list[int], center: float,
           sigma_b: float) -> tuple[dict[int, _Probe], bool]:
    """Group testing: the tensors of `indices` whose own B̂ along `probe`'s direction is
    significant (and whether the evaluation limit let the search finish)."""
    if len(indices) == 1:
        return {indices[0]: probe}, True
    if run.evaluations > LOCALISE_LIMIT:
        return {}, False
    half = len(indices) // 2
    left = run.probe(probe.direction, indices[:half], center)
    right = _Probe(probe.direction, tuple(run.tensors[i].name for i in indices[half:]),
                   probe.b - left.b, probe.analytic - left.analytic,
                   probe.numeric - left.numeric, left.curvature_noise)
    found: dict[int, _Probe] = {}
    complete = True
    for part, names in ((left, indices[:half]), (right, indices[half:])):
        if abs(part.b) > SPLIT_SIGNIFICANCE * sigma_b:
            more, done = _split(run, part, names, center, sigma_b)
            found.update(more)
            complete = complete and done
    return found, complete


# ---------------------------------------------------------------------- report
def _report(run: _Run, result: _Result, settings: CheckSettings, *, seconds: float,
            why: str) -> CheckReport:
    thresholds = settings.thresholds
    count = len(run.tensors)
    # tensor t adds ≈ 2ρ·s_t·||dθ_t|| for a relative error ρ: its resolution; the stated one
    # is the worst over the tensors with a gradient above the rounding of the projection
    contributions = [t.step * t.norm for t in run.tensors]
    seen = [x for x in contributions if x > SIGNIFICANCE * result.sigma_b / 2]
    resolution = (SIGNIFICANCE * result.sigma_b / (2 * min(seen)) if seen else math.inf)
    dtype = str(run.dtype).replace("torch.", "")
    common: dict[str, Any] = dict(
        mode="auto", strategy="collective", eps=statistics.median(t.step for t in run.tensors),
        thresholds=thresholds, evaluations=run.evaluations, seconds=seconds,
        evaluation_seconds=run.evaluation_seconds, loss=result.center,
        directions=len(result.probes), coordinates=0,
        precision={"evaluations": dtype, "unit_roundoff": result.unit,
                   "delta_j_relative": result.sigma_j / abs(result.center)
                   if result.center else math.nan, "resolution": resolution},
        coverage={"tensors": count, "screened": count, "localised": len(result.culprits),
                  "measured": len(result.culprits), "excluded_elements": 0},
        probe={"sharding": {"kind": "fsdp2", "strategy": "collective", "why": why,
                            "precision": dtype if run.fallback is None else
                            f"{dtype} (no float64 twin: {run.fallback})"}},
    )
    if not math.isfinite(result.center):
        return CheckReport(rel_distance=math.nan, verdict="alert", reasons=[
            f"non-finite: the loss J(θ) is {result.center!r} at the checked point"],
            layers={t.name: _layer(t, "alert", math.nan, 0, ["non-finite loss"])
                    for t in run.tensors}, **common)
    layers: dict[str, LayerReport] = {}
    reasons: list[str] = []
    verdict: Verdict = "ok"
    screened_note = (f"screened jointly with the other {count - 1} tensors in {dtype}: no "
                     f"discrepancy the screen could see (it sees a relative error of ≥ "
                     f"{resolution:.1e} in any one tensor)")
    for tensor in run.tensors:
        notes = [] if not tensor.capped else [
            f"step capped at {STEP_CAP:g} × its rms value: this tensor's share of the screen "
            f"is smaller, its resolution coarser"]
        probes = result.culprits.get(tensor.name)
        if probes is None:
            note = (screened_note if not result.fired else
                    "not localised as a source of the discrepancy")
            layers[tensor.name] = _layer(tensor, "ok", math.nan, 0, [note, *notes])
            continue
        # E[(eᵀv)²] = ||e||² for ±1 v: B̂/s along each direction is a sample of eᵀv
        mean_square = sum(p.b**2 for p in probes) / len(probes)
        error = math.sqrt(max(mean_square - result.sigma_b**2, 0.0)) / tensor.step
        distance = error / (math.hypot(tensor.norm, error) + tensor.norm) if error else 0.0
        layer_verdict = thresholds.classify(distance)
        layers[tensor.name] = _layer(tensor, layer_verdict, distance, len(probes), [
            f"localised by group testing over the tensors; ||dθapprox − dθ|| ≈ {error:.3g} "
            f"from {len(probes)} directions of its own", *notes])
        verdict = worst_verdict(verdict, layer_verdict)
        if layer_verdict != "ok":
            reasons.append(f"layer '{tensor.name}' rel_distance {distance:.3g} (estimated)")
    b = [p.b for p in result.probes]
    a = [p.analytic for p in result.probes]
    n = [p.numeric for p in result.probes]
    diff = _rms(b) if result.fired else min(_rms(b), result.sigma_b)
    denominator = _rms(a) + _rms(n)
    overall = diff / denominator if denominator else 0.0
    if result.fired:
        overall_verdict = thresholds.classify(overall)
        if overall_verdict != "ok":
            reasons.insert(0, f"overall rel_distance {overall:.3g} (estimated by the "
                              f"collective screen) ≥ {overall_verdict} threshold "
                              f"{thresholds.level(overall_verdict):.0e}")
        verdict = worst_verdict(verdict, overall_verdict)
        worst = max(abs(x) for x in b)
        reasons.append(
            f"collective screen: a discrepancy of {worst / result.sigma_b:.3g}× the rounding "
            f"noise over {count} tensors, "
            + (f"localised to {', '.join(result.culprits)}" if result.culprits else
               "not localised" + ("" if result.localised else
                                  f" within {LOCALISE_LIMIT} evaluations")))
    else:
        reasons.append(
            f"collective screen: all {count} tensors screened along {len(result.probes)} "
            f"directions through the sharded module in {dtype}, no discrepancy above rounding "
            f"(a relative error ≥ {resolution:.1e} in any one tensor would show)")
        if resolution >= thresholds.alert:
            verdict = "error"
            reasons.insert(0, f"error: the collective screen cannot see an error of the alert "
                              f"threshold {thresholds.alert:.0e} here (its resolution in "
                              f"{dtype} is {resolution:.1e}): not judged")
        elif verdict == "ok":
            reasons.insert(0, f"every distance is below the warn threshold "
                              f"{thresholds.warn:.0e}")
    return CheckReport(rel_distance=overall, estimated=True, verdict=verdict, reasons=reasons,
                       layers=layers, **common)


def _layer(tensor: _Tensor, verdict: Verdict, distance: float, directions: int,
           notes: list[str]) -> LayerReport:
    return LayerReport(rel_distance=distance, verdict=verdict, numel=tensor.numel, checked=0,
                       directions=directions, estimated=True, screened=True,
                       shape=tensor.shape, grad_norm=tensor.norm, notes=notes)


def _reshard(model: Any) -> None:
    """Every FSDP2 module back to its sharded state (the root keeps its parameters unsharded
    after a forward without backward; the next forward must gather the perturbed shards)."""
    for module in model.modules():
        reshard = getattr(module, "reshard", None)
        if reshard is not None and type(module).__name__.startswith("FSDP"):
            reshard()


def _rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else 0.0


