"""Benchmark gradwatch's engine against the hand-written recipe and torch's gradcheck.

    python benchmarks/bench_engine.py            # a few minutes
    python benchmarks/bench_engine.py --quick    # ~1 minute smoke test (CI)
    python benchmarks/bench_engine.py --json rows.json

The machine this runs on may be shared and noisy, so every number is measured in this one run
and the interesting outputs are *ratios* between rows measured side by side. Timed methods run
in interleaved rounds (each round runs every method once) and the fastest round of each method
is reported, so a slow spell of the machine hits all methods alike.

Table 1: one small float64 MLP, every method that checks the whole gradient (plus gradwatch's
         budgeted modes), on the clean model and on a twin with a planted backward bug.
Table 2: a ~265k-parameter MLP, gradwatch mode="auto" with budget=2000 on a clean model and on a
         twin whose second weight matrix has a backward bug in a single row.

Rows labelled "x. ... (extra)" are diagnostics outside the brief's rows a-g: gradwatch forced to
one batching strategy, the first (cold) gradwatch call of the process, one torch thread, and
clean ReLU twins in Table 2. Only the 1-thread rows touch a global setting
(torch.set_num_threads(1)), for the duration of that row; everything else runs with torch's
defaults.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

import gradwatch

EPS = 1e-7
DTYPE = torch.float64
Batch = tuple[Tensor, Tensor]


# ------------------------------------------------------------------ models
class _ScaledWeightGradLinear(torch.autograd.Function):
    """y = x Wᵀ + b whose backward multiplies dW by `scale` (broadcast to W): a planted bug.

    Written in the `setup_context` style with `generate_vmap_rule` so that `torch.func.vmap`
    (which gradwatch may use) can run it like any built-in layer.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, weight, _, scale = inputs
        ctx.save_for_backward(x, weight, scale)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> tuple[Tensor, Tensor, Tensor, None]:
        (grad_out,) = grad_outputs
        x, weight, scale = ctx.saved_tensors
        grad_x = grad_out @ weight
        grad_w = (grad_out.transpose(-1, -2) @ x) * scale  # the bug: dW scaled
        grad_b = grad_out.sum(0)
        return grad_x, grad_w, grad_b, None


class BuggyLinear(nn.Module):
    """A drop-in `nn.Linear` (same parameter names) whose weight gradient is scaled by
    `row_scale` (shape (out_features, 1)): all rows for a layer-wide bug, one row for a row bug.
    """

    def __init__(self, source: nn.Linear, row_scale: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(source.weight.detach().clone())
        self.bias = nn.Parameter(source.bias.detach().clone())
        self.register_buffer("row_scale", row_scale.to(source.weight.dtype).reshape(-1, 1))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.get_buffer("row_scale")
        function: Any = _ScaledWeightGradLinear  # Function.apply is untyped
        out: Tensor = function.apply(x, self.weight, self.bias, scale)
        return out


def make_mlp(widths: Sequence[int], activation: type[nn.Module], seed: int) -> nn.Sequential:
    """Linear layers with `activation` between them, float64, eval mode."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        if i:
            layers.append(activation())
        layers.append(nn.Linear(fan_in, fan_out, dtype=DTYPE))
    return nn.Sequential(*layers).eval()


def with_bug(model: nn.Sequential, index: int, row_scale: Tensor) -> nn.Sequential:
    """A twin of `model` (same weights, same parameter names) with layer `index` bugged."""
    twin = copy.deepcopy(model)
    source = twin[index]
    assert isinstance(source, nn.Linear)
    twin[index] = BuggyLinear(source, row_scale)
    return twin.eval()


def make_batch(n: int, features: int, classes: int, seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator, dtype=DTYPE)
    y = torch.randint(0, classes, (n,), generator=generator)
    return x, y


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ methods
@dataclass
class Outcome:
    """What one method measured (timing excluded)."""

    evaluations: int
    distance: float | None = None  # None: the method has no overall distance to show
    verdict: str = "-"
    extra: dict[str, Any] = field(default_factory=dict)


def analytic_gradient(model: nn.Module, batch: Batch) -> np.ndarray:
    """dθ by torch autograd in float64, concatenated in `named_parameters()` order."""
    params = [p for _, p in model.named_parameters()]
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, params)
    return np.array(torch.cat([g.reshape(-1) for g in grads]).detach().numpy(), dtype=np.float64)


def seed_loop(model: nn.Module, batch: Batch) -> Outcome:
    """The textbook recipe, by hand: perturb one coordinate of θ at a time."""
    x, y = batch
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()]).numpy()
    theta = theta.copy()
    calls = 0

    def cost(vector: np.ndarray) -> float:
        nonlocal calls
        calls += 1
        flat = torch.from_numpy(vector)
        params: dict[str, Tensor] = {}
        offset = 0
        for name, shape, size in zip(names, shapes, sizes, strict=True):
            params[name] = flat[offset : offset + size].view(shape)
            offset += size
        with torch.no_grad():
            return float(F.cross_entropy(functional_call(model, params, (x,)), y))

    grad = analytic_gradient(model, batch)
    gradapprox = np.empty_like(theta)
    for i in range(theta.size):
        theta_plus = theta.copy()
        theta_plus[i] += EPS
        j_plus = cost(theta_plus)
        theta_minus = theta.copy()
        theta_minus[i] -= EPS
        j_minus = cost(theta_minus)
        gradapprox[i] = (j_plus - j_minus) / (2 * EPS)
    numerator = np.linalg.norm(grad - gradapprox)
    denominator = np.linalg.norm(grad) + np.linalg.norm(gradapprox)
    return Outcome(evaluations=calls, distance=float(numerator / denominator))


_GRADCHECK: Any = importlib.import_module("torch.autograd.gradcheck")


def torch_gradcheck(model: nn.Module, batch: Batch, *, fast: bool) -> Outcome:
    """`torch.autograd.gradcheck` on fn(*params) -> loss; loss evaluations = calls to fn.

    In slow mode the numerical Jacobian gradcheck itself computes is captured (by wrapping its
    internal `_get_numerical_jacobian` for the duration of the call) and compared with the
    autograd gradient using the recipe's distance; the wrapper adds no loss evaluation.
    """
    x, y = batch
    names = [n for n, _ in model.named_parameters()]
    inputs = tuple(p.detach().clone().requires_grad_(True) for _, p in model.named_parameters())
    calls = 0

    def fn(*params: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        values = dict(zip(names, params, strict=True))
        return F.cross_entropy(functional_call(model, values, (x,)), y)

    captured: list[Any] = []
    original = getattr(_GRADCHECK, "_get_numerical_jacobian", None)  # private: may vanish

    def capture(*args: Any, **kwargs: Any) -> Any:
        assert original is not None
        result = original(*args, **kwargs)
        captured.append(result)
        return result

    if not fast and original is not None:
        _GRADCHECK._get_numerical_jacobian = capture
    try:
        passed = torch.autograd.gradcheck(
            fn, inputs, eps=EPS, atol=1e-5, rtol=1e-3, fast_mode=fast, raise_exception=False
        )
    finally:
        if original is not None:
            _GRADCHECK._get_numerical_jacobian = original
    distance: float | None = None
    if captured:
        # one tuple per input tensor, holding its Jacobian (numel × 1) for each output
        jacobian = torch.cat([per_input[0].reshape(-1) for per_input in captured[0]])
        numeric = jacobian.detach().numpy()
        grad = analytic_gradient(model, batch)
        if numeric.size == grad.size:
            distance = float(
                np.linalg.norm(grad - numeric) / (np.linalg.norm(grad) + np.linalg.norm(numeric))
            )
    return Outcome(evaluations=calls, distance=distance, verdict="pass" if passed else "FAIL")


def gradwatch_check(model: nn.Module, batch: Batch, **kwargs: Any) -> Outcome:
    report = gradwatch.check_module(model, batch, loss_fn, **kwargs)
    worst_name, worst_layer = report.worst_layers(1)[0]
    index = list(worst_layer.worst[0].index) if worst_layer.worst else None
    return Outcome(
        evaluations=report.evaluations,
        distance=report.rel_distance,
        verdict=report.verdict,
        extra={
            "report_seconds": report.seconds,
            "coordinates": report.coordinates,
            "strategy": report.strategy,
            "batching": report.probe.get("batching"),
            "worst_layer": worst_name,
            "worst_layer_verdict": worst_layer.verdict,
            "worst_index": index,
            "reasons": report.reasons,
        },
    )


def one_thread(run: Callable[[], Outcome]) -> Callable[[], Outcome]:
    """`run` with torch limited to one intra-op thread, restored afterwards (extra rows only)."""

    def wrapped() -> Outcome:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return run()
        finally:
            torch.set_num_threads(before)

    return wrapped


# ------------------------------------------------------------------ timing
@dataclass
class Method:
    key: str
    label: str
    run: Callable[[], Outcome]


@dataclass
class Row:
    table: str
    key: str
    label: str
    evaluations: int
    seconds: float
    seconds_all: list[float]
    distance: float | None
    verdict: str
    extra: dict[str, Any] = field(default_factory=dict)


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def measure(table: str, methods: Sequence[Method], rounds: int) -> dict[str, Row]:
    """Run every method `rounds` times, interleaved; keep the fastest time of each."""
    times: dict[str, list[float]] = {m.key: [] for m in methods}
    outcomes: dict[str, Outcome] = {}
    for r in range(rounds):
        for method in methods:
            progress(f"{table} round {r + 1}/{rounds}: {method.label} ...")
            started = time.perf_counter()
            outcome = method.run()
            elapsed = time.perf_counter() - started
            if not times[method.key] or elapsed < min(times[method.key]):
                outcomes[method.key] = outcome  # report what the fastest round did
            times[method.key].append(elapsed)
            progress(
                f"{table} round {r + 1}/{rounds}: {method.label}: {elapsed:.3f} s, "
                f"{outcome.evaluations} evaluations, distance {fmt_distance(outcome.distance)}"
            )
    return {
        m.key: Row(
            table=table,
            key=m.key,
            label=m.label,
            evaluations=outcomes[m.key].evaluations,
            seconds=min(times[m.key]),
            seconds_all=times[m.key],
            distance=outcomes[m.key].distance,
            verdict=outcomes[m.key].verdict,
            extra=outcomes[m.key].extra,
        )
        for m in methods
    }


# ------------------------------------------------------------------ output
def fmt_distance(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    return f"{value:.10e}"


def fmt_short(row: Row) -> str:
    return "-" if row.distance is None else f"{row.distance:.2e}"


def fmt_seconds(value: float) -> str:
    return f"{value:.3f}"


def render(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def verdict_flag(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def relative_difference(value: float | None, reference: float | None) -> float:
    if value is None or reference is None or reference == 0:
        return math.nan
    return abs(value - reference) / abs(reference)


# ------------------------------------------------------------------ tables
@dataclass
class Config:
    quick: bool
    small_widths: tuple[int, ...]
    small_batch: int
    big_widths: tuple[int, ...]
    big_batch: int
    bug_row: int
    budget: int
    rounds: int
    relu_seeds: tuple[int, ...]


def table_one(config: Config) -> tuple[list[Row], str]:
    widths = config.small_widths
    model = make_mlp(widths, nn.Tanh, seed=0)
    batch = make_batch(config.small_batch, widths[0], widths[-1], seed=1)
    # planted bug: the middle Linear's weight gradient scaled by 1.5 everywhere
    middle = 2 * ((len(widths) - 1) // 2)
    bug_layer = f"{middle}.weight"
    buggy = with_bug(model, middle, torch.full((widths[middle // 2 + 1],), 1.5))
    parameters = count_parameters(model)
    budget = config.budget

    def gw(target: nn.Module, **kwargs: Any) -> Callable[[], Outcome]:
        return lambda: gradwatch_check(target, batch, **kwargs)

    methods = [
        Method("seed", "a. seed loop (numpy reference)", lambda: seed_loop(model, batch)),
        Method(
            "gc_slow", "b. torch gradcheck slow", lambda: torch_gradcheck(model, batch, fast=False)
        ),
        Method(
            "gc_fast", "c. torch gradcheck fast", lambda: torch_gradcheck(model, batch, fast=True)
        ),
        Method("gw_full", "d. gradwatch full", gw(model, mode="full")),
        Method("gw_sample", "e. gradwatch sample", gw(model, mode="sample", budget=budget)),
        Method("gw_sketch", "f. gradwatch sketch", gw(model, mode="sketch", budget=budget)),
        Method(
            "gw_auto", f"g. gradwatch auto (budget {budget})", gw(model, mode="auto", budget=budget)
        ),
        Method(
            "gw_full_loop",
            "x. gradwatch full, batching=loop (extra)",
            gw(model, mode="full", batching="loop"),
        ),
        Method(
            "gw_full_vmap",
            "x. gradwatch full, batching=vmap (extra)",
            gw(model, mode="full", batching="vmap"),
        ),
        Method(
            "seed_1t",
            "x. seed loop, 1 torch thread (extra)",
            one_thread(lambda: seed_loop(model, batch)),
        ),
        Method(
            "gw_full_1t",
            "x. gradwatch full, 1 torch thread (extra)",
            one_thread(gw(model, mode="full")),
        ),
        Method(
            "seed_bug", "a. seed loop (numpy reference)  [bug]", lambda: seed_loop(buggy, batch)
        ),
        Method("gw_full_bug", "d. gradwatch full  [bug]", gw(buggy, mode="full")),
        Method(
            "gw_auto_bug",
            f"g. gradwatch auto (budget {budget})  [bug]",
            gw(buggy, mode="auto", budget=budget),
        ),
    ]
    # Before anything else in the process uses torch.func.vmap: the first vmap call of a
    # process pays a one-time setup cost, which gradwatch's batching="auto" probe also sees.
    progress("table 1: x. gradwatch full, first call in the process (cold) ...")
    started = time.perf_counter()
    cold = gradwatch_check(model, batch, mode="full")
    cold_seconds = time.perf_counter() - started
    progress(f"table 1: cold gradwatch full: {cold_seconds:.3f} s")
    rows = measure("table 1", methods, config.rounds)
    cold_row = Row(
        table="table 1",
        key="gw_full_cold",
        label="x. gradwatch full, first call in process (cold, extra)",
        evaluations=cold.evaluations,
        seconds=cold_seconds,
        seconds_all=[cold_seconds],
        distance=cold.distance,
        verdict=cold.verdict,
        extra=cold.extra,
    )
    keys = list(rows)
    keys.insert(keys.index("seed_bug"), cold_row.key)
    rows[cold_row.key] = cold_row
    rows = {key: rows[key] for key in keys}
    seed_seconds = rows["seed"].seconds
    seed_bug_seconds = rows["seed_bug"].seconds
    lines = []
    for row in rows.values():
        reference = seed_bug_seconds if row.key.endswith("_bug") else seed_seconds
        row.extra["speedup_vs_seed"] = reference / row.seconds
        lines.append(
            [
                row.label,
                str(row.evaluations),
                fmt_seconds(row.seconds),
                f"{reference / row.seconds:.2f}x",
                fmt_distance(row.distance),
                row.verdict,
            ]
        )
    headers = ["method", "loss evals", "seconds", "vs seed", "distance", "verdict"]
    out = [
        f"Table 1 - MLP {'-'.join(map(str, widths))} tanh, batch {config.small_batch}, "
        f"cross-entropy, float64, P = {parameters} parameters, eps = {EPS:g}",
        f"[bug] rows: twin model whose layer {bug_layer!r} has dW scaled by 1.5 in backward",
        "",
        render(headers, lines, right={1, 2, 3}),
        "",
    ]
    clean_diff = relative_difference(rows["gw_full"].distance, rows["seed"].distance)
    bug_diff = relative_difference(rows["gw_full_bug"].distance, rows["seed_bug"].distance)
    out += [
        f"gradwatch full vs seed loop, relative difference of distances: "
        f"bug model {bug_diff:.2e}, clean model {clean_diff:.2e}",
        f"  On the clean model both distances are rounding noise ({fmt_short(rows['seed'])} vs "
        f"{fmt_short(rows['gw_full'])}): central",
        "  differences evaluated differently (vmap chunks vs one at a time) round differently,",
        "  so they agree only in order of magnitude. On the [bug] model the distance is",
        "  bug-dominated, and there the two must agree to many digits.",
    ]
    loop_diff = relative_difference(rows["gw_full_loop"].distance, rows["seed"].distance)
    gc_diff = relative_difference(rows["gc_slow"].distance, rows["seed"].distance)
    out += [
        "  Clean model, same one-coordinate-at-a-time evaluation as the seed loop: relative",
        f"  difference to the seed loop's distance: gradwatch full batching=loop {loop_diff:.2e},",
        f"  torch gradcheck slow (its own numerical Jacobian) {gc_diff:.2e}.",
    ]
    gc_ratio = rows["gc_slow"].seconds / rows["gw_full"].seconds
    out += [
        "",
        "target: gradwatch full >= 3x faster than torch gradcheck slow",
        f"  measured gradcheck_slow_seconds / gradwatch_full_seconds = {gc_ratio:.2f}x  "
        f"-> {verdict_flag(gc_ratio >= 3.0)}",
    ]
    full_loop, full_vmap = rows["gw_full_loop"].seconds, rows["gw_full_vmap"].seconds
    threads = torch.get_num_threads()
    seed_1t, full_1t = rows["seed_1t"].seconds, rows["gw_full_1t"].seconds
    out += [
        "",
        "notes:",
        f"  times are the fastest of {config.rounds} interleaved round(s) (the cold row: one "
        "call);",
        "  'vs seed' is seed_seconds / method_seconds ([bug] rows: vs the [bug] seed loop).",
        "  loss evals: seed loop = 2P calls of J(theta +- eps e_i) (plus one autograd pass);",
        "  gradcheck = calls to fn (includes the forward it differentiates); gradwatch =",
        "  report.evaluations (2P + 2 in full mode: J(theta) is evaluated twice).",
        "  gradcheck fast checks a random projection only: no distance.",
        f"  gradwatch full batching: auto {rows['gw_full'].extra.get('batching')}",
        f"  cold first call batching: {rows['gw_full_cold'].extra.get('batching')}",
        f"  forced loop {fmt_seconds(full_loop)} s vs forced vmap {fmt_seconds(full_vmap)} s "
        f"(loop/vmap = {full_loop / full_vmap:.2f}x)",
        f"  threads: seed loop {fmt_seconds(seed_seconds)} s with {threads} vs "
        f"{fmt_seconds(seed_1t)} s with 1 torch thread; gradwatch full "
        f"{fmt_seconds(rows['gw_full'].seconds)} s vs {fmt_seconds(full_1t)} s",
        "  (the 1-thread rows set torch.set_num_threads(1) for that row only; every other row",
        f"  runs with the default {threads}).",
    ]
    return list(rows.values()), "\n".join(out)


def table_two(config: Config) -> tuple[list[Row], str]:
    widths = config.big_widths
    model = make_mlp(widths, nn.Tanh, seed=2)
    batch = make_batch(config.big_batch, widths[0], widths[-1], seed=3)
    row_scale = torch.ones(widths[2])
    row_scale[config.bug_row] = 1.5
    buggy = with_bug(model, 2, row_scale)  # the second Linear: widths[1] -> widths[2]
    bug_layer = "2.weight"
    budget = config.budget
    parameters = count_parameters(model)

    def auto(target: nn.Module, data: Batch) -> Callable[[], Outcome]:
        return lambda: gradwatch_check(target, data, mode="auto", budget=budget)

    methods = [
        Method("clean", "clean", auto(model, batch)),
        Method("row_bug", f"row bug (row {config.bug_row} of {bug_layer})", auto(buggy, batch)),
    ]
    # Extra: clean ReLU twins (no bug anywhere). A ReLU net has kinks; these rows show whether
    # auto's dense screening directions, which move many weights at once, read kinks as bugs.
    for seed in config.relu_seeds:
        relu = make_mlp(widths, nn.ReLU, seed=seed)
        relu_batch = make_batch(config.big_batch, widths[0], widths[-1], seed=seed + 1)
        methods.append(
            Method(
                f"relu_clean_{seed}", f"x. clean, ReLU, seed {seed} (extra)", auto(relu, relu_batch)
            )
        )
    rows = measure("table 2", methods, config.rounds)
    lines = [
        [
            row.label,
            str(row.evaluations),
            fmt_seconds(row.seconds),
            fmt_distance(row.distance),
            row.verdict,
            str(row.extra.get("worst_layer")),
            str(row.extra.get("worst_index")),
        ]
        for row in rows.values()
    ]
    headers = [
        "model",
        "evaluations",
        "seconds",
        "distance",
        "verdict",
        "worst layer",
        "worst element",
    ]
    clean, bug = rows["clean"], rows["row_bug"]
    relu_rows = [rows[f"relu_clean_{seed}"] for seed in config.relu_seeds]
    relu_quiet = sum(r.verdict != "alert" for r in relu_rows)
    index = bug.extra.get("worst_index")
    within = all(r.evaluations <= budget for r in rows.values())
    localised = (
        bug.verdict == "alert"
        and bug.extra.get("worst_layer") == bug_layer
        and isinstance(index, list)
        and len(index) == 2
        and index[0] == config.bug_row
    )
    quiet = clean.verdict != "alert"
    out = [
        f"Table 2 - MLP {'-'.join(map(str, widths))} tanh, batch {config.big_batch}, "
        f"cross-entropy, float64, P = {parameters} parameters, gradwatch auto, "
        f"budget {budget}",
        "",
        render(headers, lines, right={1, 2}),
        "",
        f"target: auto <= {budget} evaluations, alert on the row bug localised to row "
        f"{config.bug_row}, no alert on the clean twin",
        f"  evaluations within budget: {verdict_flag(within)} "
        f"({clean.evaluations} clean, {bug.evaluations} bug)",
        f"  row bug alerted and localised to {bug_layer} row {config.bug_row}: "
        f"{verdict_flag(localised)} (verdict {bug.verdict}, worst {bug.extra.get('worst_layer')}"
        f" {index})",
        f"  clean twin not alerted: {verdict_flag(quiet)} (verdict {clean.verdict})",
        f"  overall: {verdict_flag(within and localised and quiet)}",
        "",
        f"extra (not part of the target): clean ReLU twins not alerted: {relu_quiet} of "
        f"{len(relu_rows)} (verdicts {', '.join(r.verdict for r in relu_rows)})",
        "",
        "notes:",
        f"  strategy (bug): {bug.extra.get('strategy')}",
        f"  strategy (clean): {clean.extra.get('strategy')}",
        f"  batching (bug): {bug.extra.get('batching')}",
    ]
    for row in [clean, *relu_rows]:
        if row.verdict != "ok":
            out.append(f"  {row.label}: strategy {row.extra.get('strategy')}")
            out.append(f"    reasons: {row.extra.get('reasons')}")
    return list(rows.values()), "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, ~1 minute (CI)")
    parser.add_argument("--json", metavar="PATH", help="also write every row as JSON here")
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved timing rounds (default 3, --quick 1)"
    )
    args = parser.parse_args(argv)
    config = Config(
        quick=args.quick,
        small_widths=(20, 24, 16, 10) if args.quick else (20, 64, 48, 10),
        small_batch=32,
        big_widths=(784, 256, 256, 10),
        big_batch=64,
        bug_row=17,
        budget=2000,
        rounds=args.rounds if args.rounds is not None else (1 if args.quick else 3),
        relu_seeds=(0, 1, 2),
    )
    progress(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, gradwatch "
        f"{gradwatch.__version__}, {'quick' if config.quick else 'full'} run"
    )
    started = time.perf_counter()
    rows_one, text_one = table_one(config)
    rows_two, text_two = table_two(config)
    total = time.perf_counter() - started
    print(
        f"gradwatch {gradwatch.__version__} engine benchmark - torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, {'quick' if config.quick else 'full'} run\n"
    )
    print(text_one)
    print()
    print(text_two)
    print(f"\n(total {total:.1f} s)")
    if args.json:
        payload = {
            "config": asdict(config),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "gradwatch": gradwatch.__version__,
            "rows": [asdict(r) for r in rows_one + rows_two],
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
