"""`gradwatch demo`: a small PyTorch training run with GradWatch attached.

A 3-layer MLP learns a synthetic classification task; GradWatch checks it every `every` steps
and logs to MLflow (the embedded default, sqlite ./mlflow.db, unless MLFLOW_TRACKING_URI says
otherwise). `--bug KIND --bug-at STEP` swaps the backward of one layer for a wrong one from that
step on — the forward is untouched, so only a gradient check can tell — and the next check
catches it, points at the layer and element, and alerts.

Imports: gradwatch.watch, gradwatch.common (a top-level module: anything below it).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from gradwatch.common.progress import ProgressBar

__all__ = ["BUG_KINDS", "DemoResult", "run_demo", "validate_demo"]

#: kind → what the planted backward does to the weight gradient of the middle layer
BUG_KINDS = {
    "scale": "dW multiplied by 2",
    "sign": "dW with its sign flipped",
    "row": "row 5 of dW multiplied by 1.5",
    "element": "element [5, 7] of dW multiplied by 3",
    "transpose": "dW transposed",
    "detach": "no dW at all (a stray .detach())",
}


@dataclass
class DemoResult:
    run_id: str | None
    tracking_uri: str | None
    reports: list[Any]
    final_loss: float
    steps: int
    seconds: float


def _buggy_linear(torch: Any) -> Any:
    class PlantedFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, bias: Any, bug: str) -> Any:
            ctx.save_for_backward(x, weight)
            ctx.bug = bug
            return x @ weight.T + bias

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            x, weight = ctx.saved_tensors
            grad_w = grad_out.T @ x
            if ctx.bug == "scale":
                grad_w = grad_w * 2
            elif ctx.bug == "sign":
                grad_w = -grad_w
            elif ctx.bug == "row":
                grad_w = grad_w.clone()
                grad_w[5] *= 1.5
            elif ctx.bug == "element":
                grad_w = grad_w.clone()
                grad_w[5, 7] *= 3
            elif ctx.bug == "transpose":
                grad_w = grad_w.T.contiguous()
            elif ctx.bug == "detach":
                grad_w = None
            return grad_out @ weight, grad_w, grad_out.sum(0), None

    class DemoLinear(torch.nn.Linear):
        """nn.Linear whose backward can be swapped for a planted wrong one (`bug`)."""

        bug = "none"

        def forward(self, x: Any) -> Any:
            if self.bug == "none":
                return super().forward(x)
            return PlantedFunction.apply(x, self.weight, self.bias, self.bug)

    return DemoLinear


def _check_line(step: int, steps: int, elapsed: float, loss: float, report: Any) -> str:
    """One plain line per check, readable in a CI log without the table below it."""
    estimated = "≈" if report.estimated else ""  # the summary's mark for a sampled distance
    return (f"\n--- check at step {step}/{steps}, {elapsed:.1f} s into training: "
            f"{report.verdict.upper()}, rel_distance {estimated}{report.rel_distance:.2e} "
            f"(training loss {loss:.4f})")


def validate_demo(*, steps: int, every: int, bug: str | None, bug_at: int | None) -> None:
    """Refuse settings that would make the demo show nothing, saying what to change."""
    from gradwatch.common.errors import ConfigError

    if bug is not None and bug not in BUG_KINDS:
        raise ConfigError(f"--bug must be one of {', '.join(BUG_KINDS)}, got {bug!r}.")
    if steps < 1:
        raise ConfigError(f"--steps must be ≥ 1 (training steps), got {steps}.")
    if every < 1:
        raise ConfigError(f"--every must be ≥ 1 (steps between checks), got {every}.")
    if bug is None and bug_at is not None:
        raise ConfigError(f"--bug-at {bug_at} needs --bug KIND (one of "
                          f"{', '.join(BUG_KINDS)}): there is no bug to plant.")
    if bug is not None and bug_at is not None and not 1 <= bug_at < steps:
        raise ConfigError(
            f"--bug-at {bug_at} is outside the training (steps 1–{steps}): the bug would never "
            f"be planted. Use a step below --steps, e.g. --bug-at {max(1, steps // 2)}.")


def run_demo(
    *,
    steps: int = 600,
    every: int = 100,
    bug: str | None = None,
    bug_at: int = 300,
    seed: int = 0,
    mlflow: bool = True,
    tracking_uri: str | None = None,
    out: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
    **watch_options: Any,
) -> DemoResult:
    """Train the demo model; print a progress bar and one table per check to `out`.

    `out` (default stdout) gets a redrawn bar when it is a terminal, and plain lines (about ten
    for the bar, one per check, no carriage return) when it is a log, a pipe or a file. `clock`
    times the training (the bar's elapsed time and `DemoResult.seconds`).
    """
    import torch

    from gradwatch.watch.callback import GradWatch

    stream = out if out is not None else sys.stdout
    validate_demo(steps=steps, every=every, bug=bug, bug_at=bug_at if bug is not None else None)
    torch.manual_seed(seed)
    features, hidden, classes = 32, 64, 4
    linear = _buggy_linear(torch)
    model = torch.nn.Sequential(
        linear(features, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.1),
        linear(hidden, hidden), torch.nn.Tanh(), linear(hidden, classes),
    )
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((features, classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=0.0)

    def loss_fn(module: Any, batch: Any) -> Any:
        x, y = batch
        penalty = sum((p**2).sum() for n, p in module.named_parameters() if n.endswith("weight"))
        return torch.nn.functional.cross_entropy(module(x), y) + 1e-4 * penalty

    watch_options.setdefault("budget", 2000)  # enough to localise the planted bug
    watch = GradWatch(every=every, loss_fn=loss_fn, mlflow=mlflow, tracking_uri=tracking_uri,
                      experiment_name="gradwatch-demo", **watch_options)
    # one bar for the whole training: its elapsed time is the training's, across the checks
    bar = ProgressBar("training", stream=stream, rate=4.0, unit="steps", clock=clock)
    loss_value = float("nan")
    try:
        for step in range(1, steps + 1):
            x = rng.standard_normal((64, features))
            y = np.argmax(x @ teacher + 0.1 * rng.standard_normal((64, classes)), axis=1)
            batch = (torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y))
            if bug is not None and step == bug_at:
                planted: Any = model[3]
                planted.bug = bug
                bar.note(f"\n>>> step {step}: planted bug '{bug}' in layer 3 "
                         f"({BUG_KINDS[bug]}); the forward pass is unchanged")
            model.train()
            loss = loss_fn(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
            report = watch.step(model, batch, step=step)
            if report is not None:
                bar.note(_check_line(step, steps, bar.elapsed, loss_value, report))
                bar.note(report.summary(max_layers=8))
            bar(step, steps)
    finally:
        bar.close()
        watch.close()
    return DemoResult(
        run_id=watch.run_id, tracking_uri=getattr(watch.recorder, "resolved_uri", None),
        reports=watch.reports,
        final_loss=loss_value, steps=steps,
        seconds=bar.elapsed,
    )
