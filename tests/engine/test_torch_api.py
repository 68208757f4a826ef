"""check_module's calling conventions: default losses, modes, reproducibility, progress."""

from __future__ import annotations

import io
import itertools
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.common.progress import ProgressBar


class Regressor(nn.Module):
    """Computes its own loss, like a Hugging Face model: output has `.loss` or ["loss"]."""

    def __init__(self, style: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3, 1)
        self.style = style

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        prediction = self.linear(inputs)
        if labels is None:
            return prediction
        loss = nn.functional.mse_loss(prediction, labels)
        if self.style == "dict":
            return {"loss": loss, "prediction": prediction}
        if self.style == "attribute":
            return type("Output", (), {"loss": loss, "prediction": prediction})()
        return loss


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, generator=generator), torch.randn(6, 1, generator=generator)


@pytest.mark.parametrize("style", ["dict", "attribute"])
def test_dict_batch_uses_the_models_own_loss(style: str) -> None:
    inputs, labels = _data()
    model = Regressor(style)
    report = gradwatch.check_module(model, {"inputs": inputs, "labels": labels})
    with torch.no_grad():
        expected = nn.functional.mse_loss(model.linear.double()(inputs.double()), labels.double())
    assert report.verdict == "ok", report.summary()
    assert report.loss == pytest.approx(float(expected), rel=1e-12)
    assert report.probe["loss_fn"] == "model output .loss"


def test_tuple_batch_whose_model_returns_the_loss() -> None:
    report = gradwatch.check_module(Regressor("scalar"), _data())
    assert report.verdict == "ok", report.summary()


def test_dict_batch_without_labels_asks_for_loss_fn() -> None:
    inputs, _ = _data()
    with pytest.raises(gradwatch.LossError, match=r"without a 'loss'.*loss_fn="):
        gradwatch.check_module(Regressor("dict"), {"inputs": inputs})


class Pair(NamedTuple):
    inputs: torch.Tensor
    labels: torch.Tensor


def test_namedtuple_and_nested_list_batches() -> None:
    inputs, labels = _data()
    model = Regressor("scalar")

    def loss_fn(m: nn.Module, batch: list[Pair]) -> torch.Tensor:
        return sum(nn.functional.mse_loss(m.linear(p.inputs), p.labels) for p in batch)

    report = gradwatch.check_module(model, [Pair(inputs, labels), Pair(inputs * 2, labels)],
                                    loss_fn)
    assert report.verdict == "ok", report.summary()
    assert report.probe["batch"] == [["float32[6, 3]", "float32[6, 1]"]] * 2


def test_integer_parameter_named_in_include_is_refused() -> None:
    model = Regressor("scalar")
    model.steps = nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)
    with pytest.raises(gradwatch.InputError, match=r"'steps' has dtype torch.int64.*include="):
        gradwatch.check_module(model, _data(), include=["linear.*", "steps"])
    # not named: skipped like any frozen parameter
    assert "steps" not in gradwatch.check_module(model, _data()).layers


def _mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


BATCH = (torch.randn(10, 8, generator=torch.Generator().manual_seed(2)),
         torch.arange(10) % 4)


def _checked(report: gradwatch.CheckReport) -> list[tuple[int, ...]]:
    return [e.index for layer in report.layers.values() for e in layer.worst]


def test_sample_mode_is_reproducible_from_seed_and_reports_estimates() -> None:
    one = gradwatch.check_module(_mlp(), BATCH, _ce, mode="sample", samples=6, top_k=6, seed=7)
    again = gradwatch.check_module(_mlp(), BATCH, _ce, mode="sample", samples=6, top_k=6, seed=7)
    other = gradwatch.check_module(_mlp(), BATCH, _ce, mode="sample", samples=6, top_k=6, seed=8)
    assert _checked(one) == _checked(again)
    assert sorted(_checked(one)) != sorted(_checked(other))
    weight = one.layers["0.weight"]
    assert weight.checked == 6 and weight.estimated and weight.numel == 128
    # half of the sample are the largest |dθ| coordinates: the largest one is always in
    analytic = {e.index: abs(e.analytic) for e in weight.worst}
    full = gradwatch.check_module(_mlp(), BATCH, _ce, mode="full", top_k=128)
    largest = max(full.layers["0.weight"].worst, key=lambda e: abs(e.analytic)).index
    assert largest in analytic


def test_sketch_costs_two_evaluations_per_direction_whatever_the_size() -> None:
    small = gradwatch.check_module(_mlp(), BATCH, _ce, mode="sketch", directions=4)
    assert small.evaluations == 2 + 2 * 3 * 4 + 2 * 4  # 3 tensors sketched, the 4-bias exact
    assert small.layers["0.weight"].directions == 4
    assert small.layers["0.weight"].checked == 0 and small.layers["0.weight"].estimated
    assert small.layers["2.bias"].checked == 4 and not small.layers["2.bias"].estimated


def test_budget_bounds_every_budgeted_mode() -> None:
    for mode in ("sample", "sketch", "auto"):
        report = gradwatch.check_module(_mlp(), BATCH, _ce, mode=mode, budget=40)
        assert report.evaluations <= 40, (mode, report.evaluations)
        assert report.verdict == "ok", report.summary()


def test_auto_is_full_when_it_fits_the_budget() -> None:
    parameters = sum(p.numel() for p in _mlp().parameters())
    fits = gradwatch.check_module(_mlp(), BATCH, _ce, budget=2 * parameters + 2)
    assert fits.strategy == "full" and fits.coordinates == parameters
    tight = gradwatch.check_module(_mlp(), BATCH, _ce, budget=2 * parameters + 1)
    assert tight.strategy != "full" and tight.evaluations <= 2 * parameters + 1


def test_progress_callable_and_bar() -> None:
    seen: list[tuple[int, int]] = []
    gradwatch.check_module(_mlp(), BATCH, _ce, mode="full",
                           progress=lambda done, total: seen.append((done, total)))
    # 2P + 2 for the recipe, + 4 for the float64 verification along a joint direction
    assert seen[-1][0] == seen[-1][1] == 2 * 212 + 2 + 4
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))
    stream = io.StringIO()
    bar = ProgressBar("gradwatch check", stream=stream, rate=1e9)
    bar(5, 10)
    bar(10, 10)
    bar.close()
    assert "[###############" in stream.getvalue() and "10/10 evaluations" in stream.getvalue()


def test_the_summary_reads_as_a_table() -> None:
    report = gradwatch.check_module(_mlp(), BATCH, _ce, mode="full")
    text = str(report)
    assert text.splitlines()[0].startswith("gradwatch check: OK  rel_distance")
    assert "0.weight" in text and "128/128" in text
