"""Wrapped models: torch.compile, Accelerate's mixed-precision forward, sharded parameters.

The check always runs on the module that holds the parameters, unwrapped, in float64 and
outside autocast; sharded models are refused with the reason instead of hanging.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import GradWatch
from tests.support.torch_models import bug_model, mse_loss, regression_batch, seeded


def small_model() -> nn.Module:
    with seeded(0):
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 3))


class WithLoss(nn.Module):
    """`model(x, y)` returns the loss: the probe captured from its forward has the labels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_model()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mse_loss(self.net, (x, y))


def train(model: Any, watch: GradWatch | None, steps: int = 8, capture: bool = False
          ) -> tuple[list[float], list[gradwatch.CheckReport]]:
    torch.manual_seed(0)
    parameters = (model._orig_mod if hasattr(model, "_orig_mod") else model).parameters()
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    losses, reports = [], []
    for step in range(1, steps + 1):
        batch = regression_batch(16, 4, 3, seed=step)
        loss = model(*batch) if capture else mse_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if watch is not None:
            report = watch.step(model, None if capture else batch, step=step)
            if report is not None:
                reports.append(report)
    if watch is not None:
        watch.close()
    return losses, reports


@pytest.mark.parametrize("capture", [False, True], ids=["batch given", "captured inputs"])
def test_torch_compile_is_unwrapped_and_training_unchanged(capture: bool) -> None:
    make = WithLoss if capture else small_model
    plain = torch.compile(make(), backend="aot_eager")
    watched = torch.compile(make(), backend="aot_eager")
    losses, _ = train(plain, None, capture=capture)
    watch = GradWatch(every=3, loss_fn=None if capture else mse_loss, mlflow=False)
    if capture:
        watch.setup(watched)  # capture the inputs of training forwards from the first step
    watched_losses, reports = train(watched, watch, capture=capture)
    assert watched_losses == losses
    for name, parameter in plain._orig_mod.state_dict().items():
        assert torch.equal(parameter, watched._orig_mod.state_dict()[name]), name
    assert [r.probe["step"] for r in reports] == [1, 3, 6]
    assert all(r.verdict == "ok" for r in reports), reports[0].summary()
    prefix = "net." if capture else ""
    assert set(reports[0].layers) == {f"{prefix}{n}" for n in
                                      ("0.weight", "0.bias", "3.weight", "3.bias")}


def test_compiled_model_with_a_backward_bug_is_caught() -> None:
    model = torch.compile(bug_model("scaled"), backend="aot_eager")
    report = gradwatch.check_module(model, regression_batch(8, 4, 3), mse_loss)
    assert report.verdict == "alert"
    assert report.worst_layers(1)[0][0] == "2.weight"


@pytest.fixture
def fresh_accelerate_state() -> Iterator[Any]:
    """Accelerate keeps one process-wide state (the HF Trainer tests set it up in fp32)."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield accelerate
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerate_mixed_precision_forward_is_bypassed(fresh_accelerate_state: Any) -> None:
    accelerator = fresh_accelerate_state.Accelerator(mixed_precision="bf16", cpu=True)
    model = accelerator.prepare(small_model())
    assert hasattr(model, "_original_forward")  # the autocast wrapper is in place
    batch = regression_batch(8, 4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # even when called inside autocast
        report = gradwatch.check_module(model, batch, mse_loss)
    # bf16 central differences would be off by ~1e-2; float64 ones agree to ~1e-8.
    assert report.verdict == "ok" and report.rel_distance < 1e-6, report.summary()
    assert model.training  # the live model is left as it was


def test_zero3_parameters_outside_a_process_group_are_refused_with_the_reason() -> None:
    model = small_model()
    # ZeRO-3 replaces each parameter's data by a shard and marks it with ds_id / ds_status; a
    # sharded check is a collective of the ranks (tests/watch/test_zero3.py): with no process
    # group there is none to gather from, so the marker set by hand is refused with the reason.
    model[0].weight.ds_id = 0  # type: ignore[union-attr]
    with pytest.raises(gradwatch.UnsupportedModelError, match=r"ZeRO-3.*unsharded copy"):
        gradwatch.check_module(model, regression_batch(8, 4, 3), mse_loss)
    watch = GradWatch(every=2, loss_fn=mse_loss, mlflow=False)
    _, reports = train(model, watch, steps=6)
    assert [(r.probe["step"], r.verdict) for r in reports] == [(1, "error")]  # then no more
    assert watch.unsupported is not None and "ZeRO-3" in watch.unsupported


class Doubled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = WithLoss()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.inner(x, y)


def test_first_check_waits_for_a_captured_forward_without_an_error_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A plain loop that never calls setup(): the hook is attached in the first step(), after
    # that step's forward. The first check is skipped quietly, the next one runs.
    watch = GradWatch(every=3, mlflow=False)
    with caplog.at_level("INFO", logger="gradwatch"):
        _, reports = train(Doubled(), watch, capture=True)
    assert [(r.probe["step"], r.verdict) for r in reports] == [(3, "ok"), (6, "ok")]
    assert "no training forward captured before step 1" in caplog.text
    assert watch.run_check(Doubled(), step=9).verdict == "error"  # explicit call: an error


def test_data_parallel_is_unwrapped() -> None:
    model = nn.DataParallel(small_model())  # on CPU it calls the module itself
    report = gradwatch.check_module(model, regression_batch(8, 4, 3), mse_loss)
    assert report.verdict == "ok"
    assert set(report.layers) == {"0.weight", "0.bias", "3.weight", "3.bias"}  # no "module."
