"""Overhead of GradWatch on a training loop, measured in one run.

    python benchmarks/bench_overhead.py            # ~2-3 minutes
    python benchmarks/bench_overhead.py --quick    # smaller, for a smoke test

A ~269k-parameter MLP (784-256-256-10, ReLU, dropout, Adam, batch 64, float32) trains on
synthetic data three ways, interleaved in rounds so a slow spell of the shared machine hits all
alike: without gradwatch, with `GradWatch(every=1000)` and with `GradWatch(every=100)`, default
settings otherwise (adaptive budget, records spooled and delivered to MLflow). The MLflow run is
created before training, as a training script with MLflow logging would have it, so what is
measured is the cost of the checks and their record, not of creating a tracking store.

Table 2 plants a backward bug in one layer at a time and reports after how many checks the
default settings alert: the adaptive budget rotates through the tensors, so a bug in any one
layer is still caught, a few checks later when a single check cannot cover everything.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradwatch import GradWatch

WIDTHS = (784, 256, 256, 10)
BATCH = 64


class ScaledGradLinearFn(torch.autograd.Function):
    """Linear layer whose weight gradient is multiplied by `scale`: a planted bug."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                scale: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.scale = scale
        return x @ weight.T + bias

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        x, weight = ctx.saved_tensors
        return grad_out @ weight, (grad_out.T @ x) * ctx.scale, grad_out.sum(0), None


class Linear(nn.Linear):
    """nn.Linear whose backward can be made wrong by setting `scale` ≠ 1."""

    scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return super().forward(x)
        result: torch.Tensor = ScaledGradLinearFn.apply(x, self.weight, self.bias, self.scale)
        return result


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(WIDTHS)):
        if i:
            layers += [nn.ReLU(), nn.Dropout(0.1)]
        layers.append(Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def make_batches(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(WIDTHS[0], WIDTHS[-1], generator=generator)
    batches = []
    for _ in range(count):
        x = torch.randn(BATCH, WIDTHS[0], generator=generator)
        batches.append((x, (x @ teacher).argmax(dim=1)))
    return batches


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def train(steps: int, watch: GradWatch | None, batches: list[Any],
          model: nn.Module | None = None) -> tuple[float, nn.Module]:
    model = model if model is not None else make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        batch = batches[step % len(batches)]
        loss = loss_fn(model.train(), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if watch is not None:
            watch.step(model, batch, step=step)
    seconds = time.perf_counter() - started
    return seconds, model


def new_run(tracking_uri: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("overhead")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        "overhead")
    return str(client.create_run(experiment_id).info.run_id)


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def overhead_table(steps: int, rounds: int, root: Path) -> str:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    batches = make_batches(64)
    train(50, None, batches)  # warm up torch and the allocator
    configs: dict[str, Callable[[], GradWatch | None]] = {
        "no gradwatch": lambda: None,
        "GradWatch(every=1000)": lambda: GradWatch(
            every=1000, loss_fn=loss_fn, tracking_uri=uri, run_id=new_run(uri),
            spool_dir=root / "spool"),
        "GradWatch(every=100)": lambda: GradWatch(
            every=100, loss_fn=loss_fn, tracking_uri=uri, run_id=new_run(uri),
            spool_dir=root / "spool"),
    }
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    checks: dict[str, int] = {}
    evaluations: dict[str, list[int]] = {}
    for round_index in range(rounds):
        for name, make in configs.items():
            progress(f"round {round_index + 1}/{rounds}: {name}, {steps} steps")
            watch = make()
            elapsed, _ = train(steps, watch, batches)
            if watch is not None:
                close_started = time.perf_counter()
                watch.close()
                elapsed += time.perf_counter() - close_started  # delivering the record counts
                checks[name] = len(watch.reports)
                evaluations[name] = [r.evaluations for r in watch.reports]
            seconds[name].append(elapsed)
    base = min(seconds["no gradwatch"])
    lines = [
        f"Table 1 - overhead: MLP {'-'.join(map(str, WIDTHS))} "
        f"({sum(p.numel() for p in make_model().parameters()):,} parameters), batch {BATCH}, "
        f"Adam, {steps} steps, fastest of {rounds} interleaved rounds; MLflow: {uri}",
        "",
        f"{'configuration':<24} {'seconds':>8} {'overhead':>9} {'checks':>7}  "
        f"evaluations per check",
        f"{'-' * 24} {'-' * 8} {'-' * 9} {'-' * 7}  {'-' * 21}",
    ]
    for name in configs:
        best = min(seconds[name])
        ratio = (best - base) / base
        lines.append(
            f"{name:<24} {best:8.3f} {ratio:+9.2%} {checks.get(name, 0):7d}  "
            f"{evaluations.get(name, '-')}"
        )
    every_1000 = (min(seconds["GradWatch(every=1000)"]) - base) / base
    lines += [
        "",
        f"target: overhead <= 1% at every=1000 with default settings: measured "
        f"{every_1000:+.2%} -> {'PASS' if every_1000 <= 0.01 else 'MISS'}",
        f"(median of rounds: no gradwatch {statistics.median(seconds['no gradwatch']):.3f} s, "
        f"every=1000 {statistics.median(seconds['GradWatch(every=1000)']):.3f} s)",
    ]
    return "\n".join(lines)


def coverage_table(steps: int) -> str:
    batches = make_batches(64)
    lines = [
        f"Table 2 - a bug in one layer (dW x1.5 from step 1), GradWatch(every=100) default "
        f"settings, {steps} steps",
        "",
        f"{'buggy layer':<12} {'checks':>7} {'first alert at step':>20} {'checks until alert':>19}"
        f"  worst layer",
        f"{'-' * 12} {'-' * 7} {'-' * 20} {'-' * 19}  {'-' * 11}",
    ]
    model = make_model()
    linear_indices = [i for i, m in enumerate(model) if isinstance(m, Linear)]
    for index in linear_indices:
        progress(f"coverage: bug in layer {index}")
        buggy = make_model()
        planted: Any = buggy[index]
        planted.scale = 1.5
        watch = GradWatch(every=100, loss_fn=loss_fn, mlflow=False)
        train(steps, watch, batches, model=buggy)
        watch.close()
        alerts = [r for r in watch.reports if r.verdict == "alert"]
        first = alerts[0].probe["step"] if alerts else None
        until = watch.reports.index(alerts[0]) + 1 if alerts else None
        worst = alerts[0].worst_layers(1)[0][0] if alerts else "-"
        lines.append(f"{f'{index}.weight':<12} {len(watch.reports):7d} {first!s:>20} "
                     f"{until!s:>19}  {worst}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    logging.getLogger("gradwatch").setLevel(logging.ERROR)  # alerts are expected in table 2
    steps = args.steps or (1000 if args.quick else 4000)
    rounds = args.rounds or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory() as directory:
        one = overhead_table(steps, rounds, Path(directory))
    two = coverage_table(600 if args.quick else 1000)
    print(f"gradwatch overhead benchmark - torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print(one)
    print()
    print(two)
    return 0


if __name__ == "__main__":
    sys.exit(main())
